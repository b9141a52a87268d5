"""Does tonight's batch look like what the model was trained on? Score distributions against a reference.

The reference is made at export from the validation split's (calibrated) predictions: per-dimension histograms on
fixed bins over [0, 10] and the tier shares. A batch is compared with the population stability index per
dimension, PSI = sum over bins of (current - reference) * ln(current / reference), on bin shares with a small
floor so an empty bin does not make it infinite. The usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .spec import DIMENSIONS, SCORE_RANGE, default_spec

# Ten bins of equal width over the score range ([0, 10]): shard histograms and references alike.
SCORE_EDGES = [float(x) for x in np.linspace(*SCORE_RANGE, 11)]
SCORE_BINS = len(SCORE_EDGES) - 1
PSI_FLOOR = 1e-4  # the share an empty bin counts as
DEFAULT_PSI_THRESHOLD = 0.2
REFERENCE_FILE = "reference.json"
NOISE_DRAWS = 4000  # same-distribution samples behind psi_noise
# The quantile of their PSI that a dimension must pass: 1 % over all eight dimensions a night (Bonferroni), so a
# batch with no drift raises drift_detected on about one night in a hundred, not one in twelve.
NOISE_QUANTILE = 1 - 0.01 / 8


def score_histograms(scores: np.ndarray) -> dict[str, list[int]]:
    """Counts per dimension on SCORE_EDGES (rows x 8 scores; NaN rows left out)."""
    out = {}
    for d, dim in enumerate(DIMENSIONS):
        column = scores[:, d]
        counts, _ = np.histogram(column[~np.isnan(column)], bins=SCORE_EDGES)
        out[dim] = [int(c) for c in counts]
    return out


def psi(reference: list[int] | np.ndarray, current: list[int] | np.ndarray) -> float | None:
    """Population stability index of `current` counts against `reference` counts (None when either is empty)."""
    ref, cur = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    if ref.sum() == 0 or cur.sum() == 0:
        return None
    return float(_psi_of_shares(ref / ref.sum(), cur / cur.sum()))


def _psi_of_shares(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """PSI of bin shares along the last axis, an empty bin counted as PSI_FLOOR."""
    p, q = np.maximum(p, PSI_FLOOR), np.maximum(q, PSI_FLOOR)
    return ((q - p) * np.log(q / p)).sum(axis=-1)


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total else {}


def model_tier_counts(tier_counts: dict[str, int], rows_prefiltered: int) -> dict[str, int]:
    """A batch's tier counts over the model-scored rows: prefiltered rows (the prefilter's tier, no model call) are
    not predictions, so they leave the comparison with a reference."""
    prefilter = default_spec().prefilter_tier
    counts = dict(tier_counts)
    counts[prefilter] = counts.get(prefilter, 0) - int(rows_prefiltered)
    return {tier: n for tier, n in counts.items() if n > 0}


def make_reference(scores: np.ndarray, tiers: list[str], source: str, calibrated: bool,
                   raw: np.ndarray) -> dict[str, Any]:
    """The reference of `scores`, keeping the `raw` (uncalibrated) scores they came from, so that a new calibration
    can redo it without the model or the data (`recalibrated_reference`). Kept whole (float32, as the model gave
    them): an isotonic map can climb steeply between two breakpoints, and rounding a score fitted at one of them to
    5 decimals moved it 7.9994 instead of 8.0, a bin lower than scoring puts the same article."""
    counts: dict[str, int] = {}
    for tier in tiers:
        counts[tier] = counts.get(tier, 0) + 1
    return {"source": source, "calibrated": calibrated, "rows": int(len(scores)), "edges": SCORE_EDGES,
            "histograms": score_histograms(scores), "tier_shares": shares(counts),
            "raw_scores": np.asarray(raw, dtype=np.float32).tolist()}


def reference_entry(reference: dict[str, Any]) -> dict[str, Any]:
    """What model.json says of its reference: the score distributions themselves (small: ten bins a dimension, the
    tier shares) beside where the whole file is; the raw scores stay in the file."""
    keep = ("rows", "source", "calibrated", "engine", "edges", "histograms", "tier_shares")
    return {"file": REFERENCE_FILE, **{key: reference[key] for key in keep if key in reference}}


def recalibrated_reference(reference: dict[str, Any], calibrate: Callable[[np.ndarray], np.ndarray]
                           ) -> dict[str, Any] | None:
    """The reference as a new calibration would have made it: its raw scores through `calibrate`. None for a
    reference that kept no raw scores (exported before they were kept): it cannot be redone."""
    if "raw_scores" not in reference:
        return None
    raw = np.asarray(reference["raw_scores"], dtype=np.float32).reshape(-1, len(DIMENSIONS))
    spec = default_spec()
    scores = spec.clip(calibrate(raw))
    tiers, _ = spec.assign_tiers(scores)
    redone = make_reference(scores, [str(t) for t in tiers], "validation split, recalibrated", True, raw)
    return {**redone, **({"engine": reference["engine"]} if "engine" in reference else {})}


def check_reference(raw: Any, where: str) -> dict[str, Any]:
    """A reference as stored, or ValueError saying what is wrong with it (the caller names the file)."""
    if not isinstance(raw, dict) or raw.get("edges") != SCORE_EDGES:
        raise ValueError(f"{where}: not a score reference (needs edges {SCORE_EDGES})")
    histograms = raw.get("histograms")
    if not isinstance(histograms, dict) or set(histograms) != set(DIMENSIONS) or not all(
            isinstance(h, list) and len(h) == len(SCORE_EDGES) - 1 and all(isinstance(c, int) and c >= 0 for c in h)
            for h in histograms.values()):
        raise ValueError(f"{where}: histograms must hold {len(SCORE_EDGES) - 1} counts for each of the eight dimensions")
    kept = raw.get("raw_scores")
    if kept is not None and not (isinstance(kept, list) and all(isinstance(r, list) and len(r) == len(DIMENSIONS)
                                                                 for r in kept)):
        raise ValueError(f"{where}: raw_scores must be rows of eight scores")
    return raw


def check_threshold(threshold: float) -> float:
    if not (0 < threshold <= 10) or math.isnan(threshold):
        raise ValueError(f"--psi-threshold must be in (0, 10], got {threshold}")
    return threshold


def calibration_mismatch(reference: dict[str, Any], calibrated: bool | None) -> str:
    """Why a batch's scores cannot be held against the reference ('' when they can): raw scores against a
    calibrated reference (or the other way) would report the calibration as drift. `None`: shards of both kinds."""
    if calibrated is None:
        return "the batch mixes calibrated and raw scores"
    if "calibrated" in reference and reference["calibrated"] is None:  # a scored batch of both kinds as reference
        return "the reference mixes calibrated and raw scores"
    if "calibrated" in reference and bool(reference["calibrated"]) != calibrated:
        kind = {True: "calibrated", False: "raw"}
        return f"the batch's scores are {kind[calibrated]} and the reference's are {kind[bool(reference['calibrated'])]}"
    return ""


def psi_noise(reference: list[int] | np.ndarray, rows: int, draws: int = NOISE_DRAWS) -> float | None:
    """The PSI that sampling alone gives (its NOISE_QUANTILE): a reference and a batch of `rows` drawn from the same
    distribution (the reference's shares) and compared as `psi` does. A small batch leaves bins empty and meets a
    large PSI with no drift at all (50 rows: median 0.26 against a 400-row reference), so a dimension is flagged
    only above this as well as above the threshold. Seeded: the same counts give the same answer every time."""
    ref = np.asarray(reference, dtype=np.int64)
    if ref.sum() == 0 or rows <= 0:
        return None
    rng = np.random.default_rng(0)
    p = ref / ref.sum()
    a = rng.multinomial(int(ref.sum()), p, size=draws) / ref.sum()
    b = rng.multinomial(rows, p, size=draws) / rows
    return float(np.quantile(_psi_of_shares(a, b), NOISE_QUANTILE))


def drift(reference: dict[str, Any], histograms: dict[str, list[int]], tier_counts: dict[str, int],
          threshold: float = DEFAULT_PSI_THRESHOLD) -> dict[str, Any]:
    """PSI per dimension against the reference, the dimensions over both `threshold` and the PSI of sampling noise
    at this batch's size, and the tier-share shift."""
    per_dim = {dim: psi(reference["histograms"][dim], histograms[dim]) for dim in DIMENSIONS}
    noise = {dim: psi_noise(reference["histograms"][dim], int(sum(histograms[dim]))) for dim in DIMENSIONS}
    current = shares(tier_counts)
    tiers = sorted(set(current) | set(reference.get("tier_shares", {})))
    shift = {t: current.get(t, 0.0) - reference.get("tier_shares", {}).get(t, 0.0) for t in tiers}
    return {"psi": per_dim, "psi_threshold": threshold, "psi_noise": noise, "psi_noise_quantile": NOISE_QUANTILE,
            "drifted_dimensions": [d for d, v in per_dim.items()
                                   if v is not None and v > threshold and v > (noise[d] or 0.0)],
            "rows": max(int(sum(h)) for h in histograms.values()),
            "tier_shares": current, "reference_tier_shares": reference.get("tier_shares", {}), "tier_share_shift": shift,
            "reference_rows": reference.get("rows"), "reference_source": reference.get("source")}
