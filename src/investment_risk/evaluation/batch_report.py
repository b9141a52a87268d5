"""`report batch`: one self-contained HTML page for a scored batch, what an analyst opens in the morning.

Row accounting, throughput, tier shares, score histograms against the model's reference, the drift table, the
top articles by signal strength and the reject reasons. Images are embedded (base64 PNG): the page is one file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.atomic import read_json, write_text_atomic
from ..core.drift import SCORE_EDGES
from ..core.errors import ConfigError, InputError
from .drift_report import read_merged_metrics
from ..core.spec import DIMENSIONS

REPORT_FILE = "batch_report.html"


def _png(fig: Any) -> str:
    from ..core.plots import pyplot

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, bbox_inches="tight", format="png")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _histogram_figure(merged: dict[str, Any], reference: dict[str, Any] | None) -> str:
    from ..core.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15, 6), sharex=True)
    centres = np.arange(len(SCORE_EDGES) - 1) + 0.5
    for ax, dim in zip(axes.flat, DIMENSIONS):
        counts = np.asarray(merged["score_histograms"][dim], dtype=np.float64)
        ax.bar(centres, counts / max(counts.sum(), 1), width=0.9, color="tab:blue", alpha=0.7, label="tonight")
        if reference is not None:
            ref = np.asarray(reference["histograms"][dim], dtype=np.float64)
            ax.step(SCORE_EDGES, [*(ref / max(ref.sum(), 1)), 0], where="post", color="black", label="reference")
        ax.set_title(dim.replace("_", " "), fontsize=9)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Score distributions (share of model-scored articles per bin)")
    fig.tight_layout()
    return _png(fig)


def _tier_figure(tiers: dict[str, int]) -> str:
    from ..core.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(tiers)
    total = max(sum(tiers.values()), 1)
    colours = {"RED": "tab:red", "YELLOW": "gold", "GREEN": "tab:green", "BLUE": "tab:blue", "NOISE": "grey"}
    ax.barh(names, [tiers[n] / total for n in names], color=[colours.get(n, "tab:purple") for n in names])
    ax.set_xlabel("share of scored rows")
    ax.invert_yaxis()
    return _png(fig)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _read_part(path: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable part file ({exc}): score its shard again") from None


def top_articles(parts: list[Path], k: int) -> pa.Table:
    """The k rows with the highest signal strength across the part files `parts`."""
    columns = ["id", "signal_tier", "signal_strength", *DIMENSIONS]
    tables = [_read_part(p, columns) for p in parts]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
    table = table.filter(pc.is_valid(table.column("signal_strength")))
    return table.sort_by([("signal_strength", "descending"), ("id", "ascending")]).slice(0, k)


def _read_metrics(scored: Path) -> tuple[dict[str, Any], dict[str, Any] | None, list[Path]]:
    """The merged metrics, the model's reference as the shards carried it (none where the merge found the batch's
    scores not comparable with it) and the part files the merge counted: done shards of the batch's shard count
    (not a shard killed before its marker, nor one of another --shard-count, whose rows another part holds too)."""
    merged = read_merged_metrics(scored)
    reference = None
    parts = []
    for number in sorted(set(merged.get("shards_done") or [])):  # each shard the merge counted, its file or exit 2
        shard = scored / "metrics" / f"part-{number:05d}.json"
        if not shard.exists():  # the page would count rows and leave out their top articles without a word
            raise InputError(f"{shard}: missing, though metrics.json counts shard {number} done: score it again")
        metrics = read_json(shard)
        if not isinstance(metrics, dict):
            raise InputError(f"{shard}: not a shard's metrics (score its shard again)")
        if metrics.get("shard") != number or metrics.get("shard_count") != merged["shard_count"]:
            continue
        part = scored / f"{shard.stem}.parquet"
        if not part.exists():  # the page would count rows no file holds
            raise InputError(f"{part}: missing, though {shard.name} says the shard was scored: score it again")
        parts.append(part)
        reference = metrics.get("reference") or reference
    if merged.get("drift_skipped") or (reference is not None and
                                       bool(reference.get("calibrated")) != bool(merged.get("calibrated"))):
        reference = None  # raw scores against a calibrated reference would draw the calibration as drift
    return merged, reference, parts


def write_batch_report(scored: Path, out: Path, top_k: int = 20) -> dict[str, Any]:
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    merged, reference, parts = _read_metrics(scored)
    top = top_articles(parts, top_k)
    fmt = lambda v, spec="": "n/a" if v is None else format(v, spec)  # noqa: E731
    accounting = [["rows in", merged["rows_in"]], ["scored", merged["rows_scored"]],
                  ["rejected", merged["rows_rejected"]], ["prefiltered (NOISE, no model call)", merged["rows_prefiltered"]],
                  ["JSONL blank lines skipped", merged.get("blank_lines", 0)],
                  ["rows in = scored + rejected", "yes" if merged["invariant_holds"] else
                   f"NO (shards {merged['invariant_broken_shards']})"],
                  ["shards done", f"{merged['shards']} of {merged['shard_count']}" + (
                      f" (scored with --shard-count {', '.join(map(str, merged['shard_counts']))}: not one batch)"
                      if merged.get("shard_counts") else "")]]
    throughput = [["rows per second (sum over shards)", merged.get("rows_per_second_sum")],
                  ["model call p95 (ms, every shard's calls)", fmt(merged["batch_latency_ms"].get("p95"), ".1f")],
                  ["model call p95 (ms, worst shard)", fmt(merged["batch_latency_ms"].get("p95_max"), ".1f")],
                  ["real-token share", fmt(merged.get("real_token_share"), ".3f")],
                  ["model versions", ", ".join(merged.get("model_versions", []))]]
    tiers = merged.get("tier_counts", {})
    total = max(sum(tiers.values()), 1)
    tier_rows = [[t, n, f"{n / total:.1%}"] for t, n in tiers.items()]
    drift = merged.get("drift")
    skipped = merged.get("drift_skipped")
    drift_html = (f"<p>Drift not measured: {html.escape(skipped)}.</p>" if skipped else
                  f"<p>Drift not measured: the batch is incomplete ({merged['shards']} of {merged['shard_count']} "
                  "shards done); a part of a night is no sample of it.</p>" if not merged.get("complete") else
                  "<p>No reference in this model: drift not measured.</p>")
    if drift:
        noise = drift.get("psi_noise", {})  # absent from batches merged before it was measured
        drift_rows = [[d, fmt(v, ".4f"), fmt(noise.get(d), ".4f"), "DRIFT" if d in drift["drifted_dimensions"] else ""]
                      for d, v in drift["psi"].items()]
        drift_html = (f"<p>PSI threshold {drift['psi_threshold']}, and above the PSI that sampling alone gives at this "
                      f"batch's size (noise); reference: {html.escape(str(drift['reference_source']))}"
                      f" ({drift['reference_rows']} rows).</p>" + _table(["dimension", "PSI", "noise", ""], drift_rows))
    top_rows = [[r["id"], r["signal_tier"], f"{r['signal_strength']:.2f}",
                 *(f"{r[d]:.1f}" for d in DIMENSIONS)] for r in top.to_pylist()]
    rejects = [[reason, n] for reason, n in merged.get("reject_reasons", {}).items()]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>investment-risk batch {html.escape(scored.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}} th{{background:#eee}} img{{max-width:100%}}</style></head>
<body><h1>Batch {html.escape(scored.name)}</h1>
<h2>Rows</h2>{_table(["", "count"], accounting)}
<h2>Throughput</h2>{_table(["", "value"], throughput)}
<h2>Tiers</h2>{_table(["tier", "rows", "share"], tier_rows)}<img alt="tier shares" src="{_tier_figure(tiers)}">
<h2>Scores against the reference</h2><img alt="score histograms" src="{_histogram_figure(merged, reference)}">
<h2>Drift</h2>{drift_html}
<h2>Top {len(top_rows)} by signal strength</h2>{_table(["id", "tier", "strength", *DIMENSIONS], top_rows)}
<h2>Rejects</h2>{_table(["reason", "rows"], rejects) if rejects else "<p>None.</p>"}
</body></html>
"""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(page, out / REPORT_FILE)
    return {"report": str(out / REPORT_FILE), "rows_in": merged["rows_in"], "top": len(top_rows)}
