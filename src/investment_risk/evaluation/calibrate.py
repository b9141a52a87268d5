"""`calibrate`: refit a model's calibration on new labelled data, without retraining.

The model (a run, by PyTorch; an exported model, by its engine) scores the file raw, a new isotonic map per
dimension is fitted to the labels, and it replaces the old one. In an exported model the calibration is part of
what model.json hashes, so model.json is rewritten with the new sha256 and a new model_version, and the drift
reference, made of calibrated scores, is redone from the raw validation scores it keeps.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.atomic import atomic_path, read_json
from ..core.drift import REFERENCE_FILE, recalibrated_reference, reference_entry
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.metrics import regression_metrics
from ..core.spec import DIMENSIONS, default_spec
from ..datasets.readers import label_matrix, read_articles
from ..datasets.split import check_split_file
from ..modeling.calibration import CALIBRATION_FILE, MIN_ROWS, fit_calibration
from ..core.atomic import sha256_file
from ..modeling.description import describe_model, load_reference, model_version
from .evaluate import raw_scores


def recalibrate(model_path: Path, data: Path, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    model = describe_model(model_path)
    if Path(data).is_file():  # a split's file must be the one its summary describes
        check_split_file(Path(data))
    table = read_articles([data], labels=DIMENSIONS, unique_ids=True)  # a row without all eight labels is an error
    # Only the rows scoring applies the map to: prefiltered noise never gets a model score.
    scored = ~default_spec().prefiltered(table)
    left_out, table = int((~scored).sum()), table.filter(pa.array(scored))
    if table.num_rows < MIN_ROWS:
        raise InputError(f"{data}: {table.num_rows} labelled rows the prefilter lets through; calibrate needs at "
                         f"least {MIN_ROWS}")
    labels = label_matrix(table)
    raw, _, _, _ = raw_scores(model, table, device, batch_size, what="calibrate")
    calibration = fit_calibration(raw, labels, {"data": str(data), "split": "refit",
                                                "rows_prefiltered_left_out": left_out})
    target = model.path if model.exported else model.path / "model"
    text = json.dumps(calibration.to_json(), indent=2) + "\n"
    version = model.model_version
    if model.exported:
        version = _replace_exported(model.path, text, calibration.apply)
    else:
        with atomic_path(target / CALIBRATION_FILE) as tmp:
            tmp.write_text(text)
    before, after = regression_metrics(raw, labels), regression_metrics(calibration.apply(raw), labels)
    result = {"model": str(model_path), "data": str(data), "rows": int(len(labels)), "file": str(target / CALIBRATION_FILE),
              "previous_model_version": model.model_version, "model_version": version,
              "mae_raw": before["mae"], "mae_calibrated_in_sample": after["mae"]}
    get_logger().info("calibrated", **result)
    return result


def _replace_exported(model_dir: Path, text: str, calibrate: Callable[[np.ndarray], np.ndarray]) -> str:
    """Write the calibration, the drift reference redone with it (the old one holds the old calibration's scores:
    every batch would show drift) and the model.json that hashes them, all complete in temporary files first, then
    renames: a reader sees the old files or the new ones, but for the instant between the renames (when the sha256
    check refuses the model rather than trust a mismatched set)."""
    info = read_json(model_dir / "model.json")
    old_reference = load_reference(model_dir)
    reference = recalibrated_reference(old_reference, calibrate) if old_reference else None
    if old_reference and reference is None:
        get_logger().warning("reference_dropped", model=str(model_dir),
                             reason="exported before references kept their raw scores: it cannot be recalibrated, "
                                    "and the old one would report the new calibration as drift; re-export for one")
    with contextlib.ExitStack() as files:
        calibration_tmp = files.enter_context(atomic_path(model_dir / CALIBRATION_FILE))
        calibration_tmp.write_text(text)
        digests = {name: digest for name, digest in info["sha256"].items()
                   if name not in (CALIBRATION_FILE, REFERENCE_FILE)}
        digests[CALIBRATION_FILE] = sha256_file(calibration_tmp)
        if reference is not None:
            reference_tmp = files.enter_context(atomic_path(model_dir / REFERENCE_FILE))
            reference_tmp.write_text(json.dumps(reference, indent=2) + "\n")
            digests[REFERENCE_FILE] = sha256_file(reference_tmp)
            info["reference"] = reference_entry(reference)
        elif old_reference:
            info["reference"] = None
        meta_tmp = files.enter_context(atomic_path(model_dir / "model.json"))
        info.update({"sha256": digests, "model_version": model_version(digests), "calibrated": True})
        meta_tmp.write_text(json.dumps(info, indent=2) + "\n")
    if old_reference and reference is None:
        (model_dir / REFERENCE_FILE).unlink(missing_ok=True)
    return str(info["model_version"])
