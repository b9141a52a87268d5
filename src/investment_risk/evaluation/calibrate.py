"""`calibrate`: refit a model's calibration on new labelled data, without retraining.

The model (a run, by PyTorch; an exported model, by its engine) scores the file raw, a new isotonic map per
dimension is fitted to the labels, and it replaces the old one. In an exported model the calibration is part of
what model.json hashes, so model.json is rewritten with the new sha256 and a new model_version, and the drift
reference, made of calibrated scores, is redone from the raw validation scores it keeps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.atomic import (atomic_path, check_output_file, locked_dir, read_json, replace_files_together,
                           write_json_atomic)
from ..core.drift import REFERENCE_FILE, recalibrated_reference, reference_entry
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.metrics import calibration_metrics, regression_metrics
from ..core.spec import DIMENSIONS, default_spec
from ..datasets.readers import label_matrix, read_articles
from ..datasets.split import check_split_file
from ..modeling.calibration import CALIBRATION_FILE, MIN_ROWS, fit_calibration
from ..modeling.description import (data_sha256, describe_model, in_sample, load_reference, model_version,
                                    run_version)
from .evaluate import raw_scores


def recalibrate(model_path: Path, data: Path, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    with locked_dir(model_path):  # an export or another calibrate of the same model waits its turn (exit 2)
        return _recalibrate(model_path, data, batch_size, device)


def _recalibrate(model_path: Path, data: Path, batch_size: int, device: str) -> dict[str, Any]:
    model = describe_model(model_path)
    target = model.path if model.exported else model.path / "model"
    for written in (target / CALIBRATION_FILE, *(() if model.exported else (model.path / "training_metadata.json",))):
        check_output_file(written, "--model")  # a read-only model fails now, not after the scoring
    if Path(data).is_file():  # a split's file must be the one its summary describes
        check_split_file(Path(data))
    table = read_articles([data], labels=DIMENSIONS, unique_ids=True)  # a row without all eight labels is an error
    # Only the rows scoring applies the map to: prefiltered noise never gets a model score.
    scored = ~default_spec().prefiltered(table)
    left_out, table = int((~scored).sum()), table.filter(pa.array(scored))
    if table.num_rows < MIN_ROWS:
        raise InputError(f"{data}: {table.num_rows} labelled rows the prefilter lets through; calibrate needs at "
                         f"least {MIN_ROWS}")
    digest = data_sha256(data)
    if "trained on it" in in_sample(model, digest):
        # The model's errors on articles it learned are smaller than on new ones: the map would under-correct.
        get_logger().warning("calibration_on_training_data", data=str(data), model=str(model_path),
                             reason="the model was trained on this file; calibrate on labelled articles it has not "
                                    "seen (the validation split, or new ones)")
    labels = label_matrix(table)
    raw, _, _, _ = raw_scores(model, table, device, batch_size, what="calibrate")
    fitted_on = {"data": str(data), "split": "refit", "rows_prefiltered_left_out": left_out}
    if digest is not None:  # so that evaluate can tell metrics on this very file are in-sample
        fitted_on["sha256"] = digest
    calibration = fit_calibration(raw, labels, fitted_on)
    text = json.dumps(calibration.to_json(), indent=2) + "\n"
    calibrated = calibration.apply(raw)
    before, after = regression_metrics(raw, labels), regression_metrics(calibrated, labels)
    if model.exported:
        version = _replace_exported(model.path, text, calibration.apply)
    else:
        with atomic_path(target / CALIBRATION_FILE) as tmp:
            tmp.write_text(text)
        version = run_version(model.path)
        _record_in_run(model.path, fitted_on, int(len(labels)), before["mae"], after["mae"], version)
    result = {"model": str(model_path), "data": str(data), "rows": int(len(labels)), "file": str(target / CALIBRATION_FILE),
              "previous_model_version": model.model_version, "model_version": version,
              "mae_raw": before["mae"], "mae_calibrated_in_sample": after["mae"],
              "calibration_error_raw": calibration_metrics(raw, labels)["calibration_error"],
              "calibration_error_calibrated_in_sample": calibration_metrics(calibrated, labels)["calibration_error"]}
    get_logger().info("calibrated", **result)
    return result


def _record_in_run(run: Path, fitted_on: dict[str, Any], rows: int, mae_raw: float, mae_calibrated: float,
                   version: str) -> None:
    """training_metadata.json says which calibration the run's model/ holds now: `calibration` stays what training
    fitted, `recalibrated` the refit that replaced it."""
    path = run / "training_metadata.json"
    metadata = read_json(path)
    metadata["recalibrated"] = {**fitted_on, "rows": rows, "mae_raw": mae_raw,
                                "mae_calibrated_in_sample": mae_calibrated, "model_version": version,
                                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(metadata, path)


def _replace_exported(model_dir: Path, text: str, calibrate: Callable[[np.ndarray], np.ndarray]) -> str:
    """Write the calibration, the drift reference redone with it (the old one holds the old calibration's scores:
    every batch would show drift) and the model.json that hashes them as one change: a reader finds the old three
    files or the new three, even after a kill between the renames (`replace_files_together`)."""
    info = read_json(model_dir / "model.json")
    old_reference = load_reference(model_dir)
    reference = recalibrated_reference(old_reference, calibrate) if old_reference else None
    if old_reference and reference is None:
        get_logger().warning("reference_dropped", model=str(model_dir),
                             reason="exported before references kept their raw scores: it cannot be recalibrated, "
                                    "and the old one would report the new calibration as drift; re-export for one")
    digests = {name: digest for name, digest in info["sha256"].items() if name not in (CALIBRATION_FILE, REFERENCE_FILE)}
    digests[CALIBRATION_FILE] = _sha256_text(text)
    files: dict[str, str | None] = {CALIBRATION_FILE: text}
    if reference is not None:
        files[REFERENCE_FILE] = json.dumps(reference, indent=2) + "\n"
        digests[REFERENCE_FILE] = _sha256_text(files[REFERENCE_FILE])
        info["reference"] = reference_entry(reference)
    elif old_reference:
        files[REFERENCE_FILE] = None
        info["reference"] = None
    info.update({"sha256": digests, "model_version": model_version(digests), "calibrated": True})
    files["model.json"] = json.dumps(info, indent=2) + "\n"
    replace_files_together(model_dir, files)
    return str(info["model_version"])


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
