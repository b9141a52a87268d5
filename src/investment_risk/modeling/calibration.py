"""Per-dimension isotonic calibration: a monotone map from raw model scores to the oracle's scale.

A regressor trained on squared error pulls its predictions towards the mean, so the high scores that make a RED
are reached too rarely. A monotone map fitted on held-out predictions against their labels stretches them back
without reordering them. It is stored as JSON breakpoints (`calibration.json`, beside the weights or the ONNX
files) covering the whole score range, and applied with a plain linear interpolation, so scoring needs nothing
beyond numpy. Fitting uses scikit-learn's IsotonicRegression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import read_json
from ..core.errors import InputError
from ..core.spec import DIMENSIONS, SCORE_RANGE

CALIBRATION_FILE = "calibration.json"
MIN_ROWS = 30  # fewer labelled rows than this cannot support eight monotone fits


@dataclass(frozen=True)
class Calibration:
    """One monotone piecewise-linear map per dimension, x (raw) -> y (calibrated), both increasing over [0, 10]."""

    x: tuple[tuple[float, ...], ...]
    y: tuple[tuple[float, ...], ...]
    fitted_on: dict[str, Any]

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated scores (rows x 8), clipped to the score range."""
        out = np.empty_like(scores, dtype=np.float32)
        for d in range(scores.shape[1]):
            out[:, d] = np.interp(scores[:, d], self.x[d], self.y[d])
        return np.clip(out, *SCORE_RANGE)

    def to_json(self) -> dict[str, Any]:
        return {"method": "isotonic", "score_range": list(SCORE_RANGE), "fitted_on": self.fitted_on,
                "dimensions": {dim: {"x": list(self.x[i]), "y": list(self.y[i])} for i, dim in enumerate(DIMENSIONS)}}


def fit_calibration(predictions: np.ndarray, labels: np.ndarray, fitted_on: dict[str, Any]) -> Calibration:
    """Isotonic maps from raw predictions to labels, one per dimension, extended flat to both ends of the range."""
    from sklearn.isotonic import IsotonicRegression

    if len(predictions) < MIN_ROWS:
        raise InputError(f"calibration needs at least {MIN_ROWS} labelled rows, got {len(predictions)}")
    xs, ys = [], []
    for d in range(predictions.shape[1]):
        raw = np.clip(predictions[:, d].astype(np.float64), *SCORE_RANGE)
        fit = IsotonicRegression(y_min=SCORE_RANGE[0], y_max=SCORE_RANGE[1], increasing=True, out_of_bounds="clip")
        fit.fit(raw, labels[:, d].astype(np.float64))
        x, y = list(fit.X_thresholds_), list(fit.y_thresholds_)
        # Cover the whole range: flat beyond the fitted points, as `clip` would answer there.
        if x[0] > SCORE_RANGE[0]:
            x, y = [SCORE_RANGE[0], *x], [y[0], *y]
        if x[-1] < SCORE_RANGE[1]:
            x, y = [*x, SCORE_RANGE[1]], [*y, y[-1]]
        # x at full precision: neighbouring float32 predictions (5.0 and 5.00000048) would round to one breakpoint
        # and the file would fail its own strictly-increasing check. y may round: rounding keeps it non-decreasing.
        xs.append(tuple(float(v) for v in x))
        ys.append(tuple(round(float(v), 6) for v in y))
    return Calibration(tuple(xs), tuple(ys), {**fitted_on, "rows": int(len(predictions))})


def parse_calibration(raw: Any, source: Path) -> Calibration:
    """A calibration from its JSON, or an error naming the file: every dimension present, x strictly increasing and
    covering [0, 10], y non-decreasing within it, nothing NaN."""
    def bad(why: str) -> InputError:
        return InputError(f"{source}: not a usable calibration ({why})")

    dims = raw.get("dimensions") if isinstance(raw, dict) else None
    if not isinstance(dims, dict) or set(dims) != set(DIMENSIONS):
        raise bad(f"needs breakpoints for exactly the dimensions {', '.join(DIMENSIONS)}")
    xs, ys = [], []
    for dim in DIMENSIONS:
        try:
            x = [float(v) for v in dims[dim]["x"]]
            y = [float(v) for v in dims[dim]["y"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"{dim}: x and y must be lists of numbers") from None
        if len(x) != len(y) or len(x) < 2:
            raise bad(f"{dim}: x and y need the same length, at least 2")
        if any(math.isnan(v) or math.isinf(v) for v in x + y):
            raise bad(f"{dim}: NaN or infinite breakpoint")
        if any(b <= a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
            raise bad(f"{dim}: not monotone (x must increase, y must not decrease)")
        if x[0] > SCORE_RANGE[0] or x[-1] < SCORE_RANGE[1]:
            raise bad(f"{dim}: x covers [{x[0]}, {x[-1]}], not the score range {list(SCORE_RANGE)}")
        if y[0] < SCORE_RANGE[0] or y[-1] > SCORE_RANGE[1]:
            raise bad(f"{dim}: y leaves the score range {list(SCORE_RANGE)}")
        xs.append(tuple(x))
        ys.append(tuple(y))
    return Calibration(tuple(xs), tuple(ys), dict(raw.get("fitted_on") or {}))


def load_calibration(directory: Path) -> Calibration | None:
    """The calibration stored in a model directory (run/model or an exported model), or None when there is none."""
    path = directory / CALIBRATION_FILE
    if not path.exists():
        return None
    return parse_calibration(read_json(path), path)
