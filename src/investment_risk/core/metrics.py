"""Regression metrics over the eight dimensions, in the names the run package uses."""

from __future__ import annotations

import numpy as np

from .spec import DIMENSIONS


def regression_metrics(pred: np.ndarray, target: np.ndarray, dimensions: tuple[str, ...] = DIMENSIONS) -> dict[str, float]:
    """mae, rmse, loss (MSE) overall and <dimension>_mae, <dimension>_rmse for each dimension."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    error = pred - target
    out = {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
           "loss": float((error ** 2).mean())}
    for i, dim in enumerate(dimensions):
        out[f"{dim}_mae"] = float(np.abs(error[:, i]).mean())
        out[f"{dim}_rmse"] = float(np.sqrt((error[:, i] ** 2).mean()))
    return out
