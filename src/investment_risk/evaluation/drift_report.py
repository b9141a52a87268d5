"""`report drift`: a scored batch against a model's reference or another batch, as markdown and histograms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.drift import (DEFAULT_PSI_THRESHOLD, SCORE_EDGES, calibration_mismatch, check_threshold, drift,
                          model_tier_counts)
from ..core.errors import ConfigError, InputError
from ..core.spec import DIMENSIONS
from ..modeling.description import describe_model


def read_merged_metrics(scored: Path) -> dict[str, Any]:
    """A scoring output directory's merged metrics.json, checked for what the reports read (exit 2 otherwise)."""
    path = scored / "metrics.json"
    if not path.exists():
        raise InputError(f"{scored}: not a scoring output directory (no metrics.json; run score or score-merge)")
    try:
        merged = json.loads(path.read_text())
        if not isinstance(merged, dict):
            raise ValueError("not an object")
        if bad := [k for k in MERGED_COUNTS if not _count(merged[k])]:
            raise ValueError(f"{', '.join(bad)} not a count")
        if not isinstance(merged["tier_counts"], dict) or not all(map(_count, merged["tier_counts"].values())):
            raise ValueError("tier_counts malformed")
        if not isinstance(merged["batch_latency_ms"], dict) or any(
                len(merged["score_histograms"][d]) != len(SCORE_EDGES) - 1 or not all(map(_count, merged["score_histograms"][d]))
                for d in DIMENSIONS):
            raise ValueError("batch_latency_ms or score_histograms malformed")
        if merged.get("calibrated") is not None and not isinstance(merged["calibrated"], bool):
            raise ValueError(f"calibrated is {merged['calibrated']!r}, not true, false or null")
        if not (isinstance(merged.get("model_versions", []), list)
                and all(isinstance(v, str) for v in merged.get("model_versions", []))):
            raise ValueError("model_versions is not a list of versions")
        if not (isinstance(merged.get("shards_done", []), list) and all(map(_count, merged.get("shards_done", [])))):
            raise ValueError("shards_done is not a list of shard numbers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a merged metrics file ({exc.__class__.__name__}: {exc})") from None
    return merged


# What the reports read of a merged metrics.json, checked once here (a damaged file was a traceback, exit 1).
MERGED_COUNTS = ("rows_in", "rows_scored", "rows_rejected", "rows_prefiltered", "shards", "shard_count")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def batch_distribution(scored: Path) -> dict[str, Any]:
    """A finished scoring directory's merged score histograms and tier counts (model-scored rows), reference-shaped."""
    merged = read_merged_metrics(scored)
    if not merged.get("complete"):  # as the merge: one shard of a night is no sample of it
        raise InputError(f"{scored}: the batch is incomplete ({merged['shards']} of {merged['shard_count']} shards "
                         "done): drift is measured on a whole batch; run it once score-merge says complete")
    histograms = {d: [int(c) for c in merged["score_histograms"][d]] for d in DIMENSIONS}
    counts = model_tier_counts(merged["tier_counts"], merged.get("rows_prefiltered", 0))
    total = sum(counts.values())
    return {"source": f"batch {scored}", "calibrated": merged.get("calibrated", False),
            "rows": int(merged.get("rows_model", total)), "edges": SCORE_EDGES,
            "histograms": histograms, "tier_shares": {t: n / total for t, n in sorted(counts.items())} if total else {},
            "tier_counts": counts, "model_versions": list(merged.get("model_versions") or []), "metrics": merged}


def load_reference_of(path: Path) -> tuple[dict[str, Any], list[str]]:
    """An exported model's reference, or a scored batch as one; with the model versions whose scores it holds."""
    if (path / "model.json").exists():
        model = describe_model(path)
        if model.reference is None:
            raise InputError(f"{path}: this model has no score reference (exported without a validation split)")
        return model.reference, [model.model_version]
    if (path / "metrics.json").exists():
        batch = batch_distribution(path)
        return batch, batch["model_versions"]
    raise InputError(f"--reference {path}: neither an exported model (model.json) nor a scoring output (metrics.json)")


def check_same_model(reference_path: Path, reference_versions: list[str], current_path: Path,
                     current_versions: list[str]) -> None:
    """Drift compares one model's scores over two sets of articles: scores of another model, or of the same model
    recalibrated since (a new model_version), differ by the model, and the PSI would flag that as drift."""
    for path, versions in ((reference_path, reference_versions), (current_path, current_versions)):
        if len(versions) > 1:
            raise InputError(f"{path}: scored by several model versions ({', '.join(versions)}), so its scores are no "
                             "one model's (as the merge, which measures no drift for it); score it again with one")
    if reference_versions and current_versions and reference_versions != current_versions:
        raise InputError(f"{current_path} was scored by model {current_versions[0]}, {reference_path} holds the "
                         f"scores of {reference_versions[0]}: compare batches of one model version (score the batch "
                         "with the reference's model, or take a batch that model scored as the reference)")


def plot_histograms(reference: dict[str, Any], current: dict[str, Any], psi: dict[str, float | None], dest: Path) -> None:
    from ..core.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5), sharex=True)
    centres = np.arange(len(SCORE_EDGES) - 1) + 0.5
    for ax, dim in zip(axes.flat, DIMENSIONS):
        for data, label, style in ((reference, "reference", {"color": "grey", "alpha": 0.5}),
                                   (current, "current", {"color": "tab:blue", "alpha": 0.6})):
            counts = np.asarray(data["histograms"][dim], dtype=np.float64)
            ax.bar(centres, counts / max(counts.sum(), 1), width=0.9, label=label, **style)
        value = psi[dim]
        ax.set_title(f"{dim.replace('_', ' ')}\nPSI {'n/a' if value is None else f'{value:.3f}'}", fontsize=9)
    axes.flat[0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("score")
    fig.suptitle("Score distributions: share of articles per score bin")
    fig.tight_layout()
    save_figure(fig, dest)


def drift_markdown(result: dict[str, Any], reference_name: str, current_name: str) -> str:
    lines = ["# Score drift", "", f"Reference: {reference_name} ({result['reference_rows']} rows, "
             f"{result['reference_source']}). Current: {current_name}.", "",
             f"PSI above {result['psi_threshold']} flags a dimension (< 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted),",
             f"when it is also above what sampling alone gives at {result['rows']} rows (the noise column: the "
             f"{result['psi_noise_quantile']:.5g} quantile of the PSI of same-distribution samples of these sizes).",
             "", "| dimension | PSI | noise | flag |", "|---|---|---|---|"]
    for dim, value in result["psi"].items():
        flag = "**drift**" if dim in result["drifted_dimensions"] else ""
        noise = result["psi_noise"][dim]
        lines.append(f"| {dim} | {'n/a' if value is None else f'{value:.4f}'} | "
                     f"{'n/a' if noise is None else f'{noise:.4f}'} | {flag} |")
    lines += ["", "| tier | reference share | current share | shift |", "|---|---|---|---|"]
    for tier, shift in result["tier_share_shift"].items():
        lines.append(f"| {tier} | {result['reference_tier_shares'].get(tier, 0):.3f} | "
                     f"{result['tier_shares'].get(tier, 0):.3f} | {shift:+.3f} |")
    lines += ["", "![score distributions](drift_histograms.png)", ""]
    return "\n".join(lines)


def write_drift_report(reference_path: Path, current_path: Path, out: Path,
                       threshold: float = DEFAULT_PSI_THRESHOLD) -> dict[str, Any]:
    try:
        check_threshold(threshold)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    reference, reference_versions = load_reference_of(reference_path)
    current = batch_distribution(current_path)
    check_same_model(reference_path, reference_versions, current_path, current["model_versions"])
    if mismatch := calibration_mismatch(reference, current["calibrated"]):
        raise InputError(f"{current_path} against {reference_path}: {mismatch}; compare batches scored alike")
    for path, side in ((reference_path, reference), (current_path, current)):
        if not any(sum(side["histograms"][d]) for d in DIMENSIONS):  # all prefiltered or rejected: no distribution
            raise InputError(f"{path}: no model-scored rows, so no score distribution to compare (as the merge, "
                             "which measures no drift for such a batch)")
    result = drift(reference, current["histograms"], current["tier_counts"], threshold)
    out.mkdir(parents=True, exist_ok=True)
    plot_histograms(reference, current, result["psi"], out / "drift_histograms.png")
    write_text_atomic(drift_markdown(result, str(reference_path), str(current_path)), out / "drift.md")
    write_json_atomic(result, out / "drift.json")
    return result
