"""Decision metrics: what the people acting on the scores see. Tiers (a RED alert) and rankings (the top of
tonight's list), not only the distance of each score from its label.

Tiers come from the same filter spec for labels and predictions, so a confusion matrix says how often a true RED
was called RED. Signal strength (the spec's weighted score) ranks articles: Recall@k and NDCG@k compare the
model's top k with the labels' top k.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spec import DIMENSIONS, FilterSpec

ALERT_TIER = "RED"


def confusion_counts(true_tiers: np.ndarray, pred_tiers: np.ndarray, names: tuple[str, ...]) -> list[list[int]]:
    """Rows: the labels' tier; columns: the predictions' tier, both in `names` order."""
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(matrix, ([index[t] for t in true_tiers], [index[p] for p in pred_tiers]), 1)
    return matrix.tolist()


def tier_report(matrix: list[list[int]], names: tuple[str, ...]) -> dict[str, Any]:
    """Per-tier precision, recall, F1 and support from a confusion matrix, and the alert tier's recall and
    false-negative rate (None where a tier never occurs, rather than a made-up 0)."""
    counts = np.asarray(matrix, dtype=np.float64)
    per_tier: dict[str, dict[str, float | int | None]] = {}
    for i, name in enumerate(names):
        hit, called, actual = counts[i, i], counts[:, i].sum(), counts[i, :].sum()
        precision = hit / called if called else None
        recall = hit / actual if actual else None
        # 2TP / (2TP + FP + FN): 0 for a tier present or called but never hit (a model that never calls RED)
        f1 = 2 * hit / (called + actual) if called + actual else None
        per_tier[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
    out: dict[str, Any] = {"tiers": list(names), "confusion": matrix, "per_tier": per_tier,
                           "tier_accuracy": float(np.trace(counts) / counts.sum()) if counts.sum() else None}
    if ALERT_TIER in per_tier:
        recall = per_tier[ALERT_TIER]["recall"]
        out["red_recall"] = recall
        out["red_false_negative_rate"] = None if recall is None else 1.0 - recall
        out["red_support"] = per_tier[ALERT_TIER]["support"]
    return out


def spearman(pred: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Rank correlation per dimension (average ranks for ties); None where either side is constant."""
    from scipy.stats import rankdata

    out: dict[str, float | None] = {}
    for d, dim in enumerate(DIMENSIONS):
        a, b = rankdata(pred[:, d]), rankdata(labels[:, d])
        if a.std() == 0 or b.std() == 0:
            out[dim] = None
            continue
        out[dim] = float(np.corrcoef(a, b)[0, 1])
    return out


def ranking_quality(pred_strength: np.ndarray, true_strength: np.ndarray, k: int) -> dict[str, float | int]:
    """Recall@k: the share of the labels' top k that the model's top k holds. NDCG@k: the model's order scored
    with the labels' signal strength as the gain, over the best order's. Ties (a calibrated model gives many equal
    strengths) are taken in every order alike, as sklearn's ndcg_score does, so neither metric depends on the rows'
    order: both are their expected value over the tied rows' orders. A row without a strength (-inf: a
    prefiltered one) is never in the model's list, however short that leaves it."""
    k = min(k, len(pred_strength))
    if not k:
        return {"k": 0, "recall_at_k": 0.0, "ndcg_at_k": 0.0}
    ranked = np.isfinite(pred_strength)
    recall = float((_top_k_chance(pred_strength, k, ranked) * _top_k_chance(true_strength, k)).sum()) / k
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = float((np.sort(true_strength)[::-1][:k] * discount).sum())
    gains = _tied_gains(pred_strength[ranked], true_strength[ranked])[:k]
    return {"k": int(k), "recall_at_k": recall,
            "ndcg_at_k": float((gains * discount[:len(gains)]).sum()) / ideal if ideal > 0 else 0.0}


def _groups(values: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The rows in descending order of `values` and the [start, end) of each run of equal values in it."""
    order = np.argsort(-values, kind="stable")
    ordered = values[order]
    starts = [0, *np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]
    return order, list(zip(starts, [*starts[1:], len(values)]))


def _top_k_chance(values: np.ndarray, k: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Each row's chance of being in the top k when ties are ordered at random (1 above the k-th value, the share
    of the places left within the tie at it, 0 below); rows not `eligible` never are."""
    chance = np.zeros(len(values))
    rows = np.flatnonzero(eligible) if eligible is not None else np.arange(len(values))
    order, groups = _groups(values[rows])
    for start, end in groups:
        if start < k:
            chance[rows[order[start:end]]] = (min(end, k) - start) / (end - start)
    return chance


def _tied_gains(pred: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The expected gain at each place of the model's list: within a tie, the tied rows' mean."""
    order, groups = _groups(pred)
    out = np.empty(len(pred))
    for start, end in groups:
        out[start:end] = gain[order[start:end]].mean()
    return out


def decision_metrics(pred: np.ndarray, labels: np.ndarray, spec: FilterSpec, k: int,
                     prefiltered: np.ndarray | None = None) -> dict[str, Any]:
    """Tiers, per-dimension rank correlation and ranking quality of `pred` against `labels` (rows x 8), as the
    product decides: a `prefiltered` row is NOISE whatever its scores (a false hit is a missed RED), has no signal
    strength to rank by, and no scores to correlate."""
    names = spec.tier_names
    prefiltered = np.zeros(len(pred), dtype=bool) if prefiltered is None else np.asarray(prefiltered, dtype=bool)
    true_tiers, true_strength = spec.assign_tiers(labels)
    pred_tiers, pred_strength = spec.assign_tiers(pred, prefiltered)
    report = tier_report(confusion_counts(true_tiers, pred_tiers, names), names)
    ranked = np.where(prefiltered, -np.inf, np.asarray(pred_strength, dtype=np.float64))  # never in the top k
    return {**report, "spearman": spearman(pred[~prefiltered], labels[~prefiltered]),
            "ranking": ranking_quality(ranked, np.asarray(true_strength), k)}


def format_decisions(metrics: dict[str, Any]) -> str:
    """The confusion matrix and per-tier table as console text."""
    names = metrics["tiers"]
    width = max(8, *(len(n) for n in names)) + 1
    lines = ["tiers: rows = labels, columns = predictions",
             " " * width + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, metrics["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append(f"{'tier':<{width}}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}")
    fmt = lambda v: "    n/a" if v is None else f"{v:7.3f}"  # noqa: E731
    for name, m in metrics["per_tier"].items():
        lines.append(f"{name:<{width}}{fmt(m['precision']):>10}{fmt(m['recall']):>8}{fmt(m['f1']):>8}{m['support']:>9}")
    if "red_recall" in metrics:
        lines.append(f"RED recall {fmt(metrics['red_recall']).strip()}, false-negative rate "
                     f"{fmt(metrics['red_false_negative_rate']).strip()} over {metrics['red_support']} true REDs")
    ranking = metrics["ranking"]
    lines.append(f"signal strength ranking: Recall@{ranking['k']} {ranking['recall_at_k']:.3f}, "
                 f"NDCG@{ranking['k']} {ranking['ndcg_at_k']:.3f}")
    return "\n".join(lines)
