"""`calibrate`: refit a model's calibration on new labelled data, without retraining.

The model (a run, by PyTorch; an exported model, by its engine) scores the file raw, a new isotonic map per
dimension is fitted to the labels, and it replaces the old one. In an exported model the calibration is part of
what model.json hashes, so model.json is rewritten with the new sha256 and a new model_version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_path, read_json
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.metrics import regression_metrics
from ..core.spec import DIMENSIONS
from ..datasets.readers import label_matrix, read_articles
from ..modeling.calibration import CALIBRATION_FILE, MIN_ROWS, fit_calibration
from ..modeling.description import describe_model, model_version, sha256_file
from .evaluate import raw_scores


def recalibrate(model_path: Path, data: Path, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    model = describe_model(model_path)
    table = read_articles([data], labels=DIMENSIONS)  # a row without all eight labels is an error naming it
    if table.num_rows < MIN_ROWS:
        raise InputError(f"{data}: {table.num_rows} labelled rows; calibrate needs at least {MIN_ROWS}")
    labels = label_matrix(table)
    raw, _, _, _ = raw_scores(model, table, device, batch_size)
    calibration = fit_calibration(raw, labels, {"data": str(data), "split": "refit"})
    target = model.path if model.exported else model.path / "model"
    text = json.dumps(calibration.to_json(), indent=2) + "\n"
    version = model.model_version
    if model.exported:
        version = _replace_exported(model.path, text)
    else:
        with atomic_path(target / CALIBRATION_FILE) as tmp:
            tmp.write_text(text)
    before, after = regression_metrics(raw, labels), regression_metrics(calibration.apply(raw), labels)
    result = {"model": str(model_path), "data": str(data), "rows": int(len(labels)), "file": str(target / CALIBRATION_FILE),
              "previous_model_version": model.model_version, "model_version": version,
              "mae_raw": before["mae"], "mae_calibrated_in_sample": after["mae"]}
    get_logger().info("calibrated", **result)
    return result


def _replace_exported(model_dir: Path, text: str) -> str:
    """Write the calibration and the model.json that hashes it, both complete in temporary files first, then two
    renames: a reader sees the old pair or the new pair, but for the instant between the renames (when the sha256
    check refuses the model rather than trust a mismatched pair)."""
    info = read_json(model_dir / "model.json")
    with atomic_path(model_dir / CALIBRATION_FILE) as calibration_tmp, atomic_path(model_dir / "model.json") as meta_tmp:
        calibration_tmp.write_text(text)
        digests = {name: digest for name, digest in info["sha256"].items() if name != CALIBRATION_FILE}
        digests[CALIBRATION_FILE] = sha256_file(calibration_tmp)
        info.update({"sha256": digests, "model_version": model_version(digests), "calibrated": True})
        meta_tmp.write_text(json.dumps(info, indent=2) + "\n")
    return str(info["model_version"])
