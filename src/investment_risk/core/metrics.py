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


def calibration_metrics(pred: np.ndarray, target: np.ndarray, dimensions: tuple[str, ...] = DIMENSIONS
                        ) -> dict[str, object]:
    """How far scores are from calibrated, per dimension: `bias`, the mean of score minus label (a regressor shrunk
    towards the mean is under on high labels, over on low ones, and can sit near 0 all the same), and
    `calibration_error`, the expected calibration error for regression: rows binned by score, one bin per point of
    the scale, each bin's |mean score - mean label| weighted by its rows. 0 when the articles the model scores near 7
    the oracle scored 7 on average, in every bin: what a reader of a 7 (a RED) relies on. `reliability`: per
    dimension, each non-empty bin's [low, high), rows, mean score and mean label (the reliability diagram)."""
    from .drift import SCORE_EDGES

    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    edges = np.asarray(SCORE_EDGES)
    per_dimension: dict[str, dict[str, float]] = {}
    reliability: dict[str, list[dict[str, float]]] = {}
    for i, dim in enumerate(dimensions):
        scores, labels = pred[:, i], target[:, i]
        bins = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)  # 10.0 in the last bin
        points = []
        error = 0.0
        for b in np.unique(bins):
            inside = bins == b
            mean_score, mean_label = float(scores[inside].mean()), float(labels[inside].mean())
            error += inside.sum() / len(scores) * abs(mean_score - mean_label)
            points.append({"low": float(edges[b]), "high": float(edges[b + 1]), "rows": int(inside.sum()),
                           "mean_score": mean_score, "mean_label": mean_label})
        per_dimension[dim] = {"bias": float((scores - labels).mean()), "calibration_error": float(error)}
        reliability[dim] = points
    return {"calibration_error": float(np.mean([m["calibration_error"] for m in per_dimension.values()])),
            "per_dimension": per_dimension, "reliability": reliability}
