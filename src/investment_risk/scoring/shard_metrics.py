"""Scoring metrics: what one shard measured, the merge of all shards, and Prometheus text for node-exporter.

The row invariant is checked against what is on disk: rows in the input units (Parquet footers, JSONL rows read)
against rows in the part and rejects files (their footers), per shard when it finishes and again at every merge.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.atomic import in_turn, read_json, write_json_atomic
from ..core.errors import InputError, RetryableError
from ..core.logs import Progress, get_logger
from ..core.decisions import tier_report
from ..core.drift import (DEFAULT_PSI_THRESHOLD, SCORE_BINS, SCORE_EDGES, calibration_mismatch, drift, model_tier_counts,
                          reference_entry)
from ..core.spec import DIMENSIONS, default_spec
from .prometheus import DEFAULT_METRICS_GROUP, push, remove_stale_shard_groups, write_textfile
from .units import parquet_rows, part_name, shard_files

LATENCY_EDGES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def histogram_quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile (0 < q <= 1) of the latencies counted in LATENCY_EDGES_MS's buckets, interpolated within its
    bucket as Prometheus' histogram_quantile does (the open last bucket answers its lower edge). A batch's
    percentile: the shards' own are of different sizes and cannot be combined."""
    total = sum(counts)
    if not total:
        return None
    bounds = [0.0, *LATENCY_EDGES_MS, float("inf")]
    rank, below = q * total, 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            low, high = bounds[i], bounds[i + 1]
            return float(low) if high == float("inf") else round(low + (high - low) * (rank - below) / count, 3)
        below += count
    raise ValueError(f"quantile {q} is not in (0, 1]")


def _between(pooled: float | None, shards: list[float]) -> float | None:
    """A quantile of all the shards' calls lies between the shards' own (exact) ones: the bucket interpolation can
    stray outside them (a p95 of 44.5 ms where the one shard's exact p95 was 28.0)."""
    if pooled is None or not shards:
        return pooled
    return min(max(pooled, min(shards)), max(shards))


# Set by each run from its settings and model, never restored from a checkpoint.
RUN_FIELDS = frozenset({"shard", "shard_count", "model_version", "backend", "provider", "ledger", "reference",
                        "psi_threshold", "calibrated", "started", "kept_columns_absent", "metrics_group"})
COUNTERS = frozenset({"reject_reasons", "tier_counts", "tier_pairs"})


@dataclass
class ShardMetrics:
    shard: int
    shard_count: int
    model_version: str
    backend: str
    provider: str
    rows_in: int = 0  # rows in the input units
    rows_scored: int = 0  # rows in the part file on disk (scored and prefiltered)
    rows_rejected: int = 0  # rows in the rejects file on disk
    blank_lines: int = 0  # JSONL blank lines skipped: not rows
    rows_prefiltered: int = 0
    rows_model: int = 0
    duplicate_ids: int = 0
    labels_unusable: int = 0  # label values that are not a number in the score range: left out of MAE and tiers
    kept_columns_absent: list[str] = field(default_factory=list)  # --keep-columns no input of the shard had
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    model_seconds: float = 0.0
    reject_reasons: Counter = field(default_factory=Counter)
    tier_counts: Counter = field(default_factory=Counter)
    histograms: dict[str, list[int]] = field(default_factory=lambda: {d: [0] * SCORE_BINS for d in DIMENSIONS})
    latencies_ms: list[float] = field(default_factory=list)
    label_sums: dict[str, list[float]] = field(default_factory=dict)  # dim -> [count, abs_sum, sq_sum]
    tier_pairs: Counter = field(default_factory=Counter)  # "label tier>predicted tier" -> rows with all 8 labels
    ledger: dict[str, Any] | None = None  # incremental batches: the ledger and this shard's units
    reference: dict[str, Any] | None = None  # the model's score reference, for the merge's drift
    psi_threshold: float | None = None
    calibrated: bool = False  # the scores went through the model's calibration
    metrics_group: str = DEFAULT_METRICS_GROUP  # the Pushgateway's batch_group: nightly, or an ad-hoc batch
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=_now)
    seconds: float = 0.0

    def record_batch(self, seconds: float, real: int, padded: int) -> None:
        self.batches += 1
        self.model_seconds += seconds
        self.latencies_ms.append(seconds * 1000)
        self.real_tokens += real
        self.padded_tokens += padded

    def count_outputs(self, part_rows: int, reject_rows: int) -> None:
        self.rows_scored, self.rows_rejected = part_rows, reject_rows

    def count_rejects(self, reasons: Iterable[str]) -> None:
        # Group by the kind of problem, not the row-specific detail after the first colon or parenthesis.
        self.reject_reasons.update(r.split(" (")[0].split(":")[0] for r in reasons)

    def add_scores(self, scores: np.ndarray, tiers: Iterable[str]) -> None:
        self.tier_counts.update(str(t) for t in tiers)
        for d, dim in enumerate(DIMENSIONS):
            counts, _ = np.histogram(scores[:, d], bins=SCORE_EDGES)
            self.histograms[dim] = [a + int(b) for a, b in zip(self.histograms[dim], counts)]

    def add_labels(self, scores: np.ndarray, labels: np.ndarray, prefiltered: np.ndarray) -> None:
        """MAE sums over the model's rows; tier pairs over every row with all eight labels, a `prefiltered` one as
        the NOISE it was given (so a false prefilter hit shows as a missed RED), as `evaluate` counts them."""
        scored = ~prefiltered
        for d, dim in enumerate(DIMENSIONS):
            ok = scored & ~np.isnan(labels[:, d])
            err = scores[ok, d] - labels[ok, d]
            count, abs_sum, sq_sum = self.label_sums.get(dim, [0, 0.0, 0.0])
            self.label_sums[dim] = [count + int(ok.sum()), abs_sum + float(np.abs(err).sum()), sq_sum + float((err ** 2).sum())]
        complete = ~np.isnan(labels).any(axis=1)
        if complete.any():  # tiers need every dimension: rows missing a label count in the MAE only
            spec = default_spec()
            true_tiers, _ = spec.assign_tiers(labels[complete])
            pred_tiers, _ = spec.assign_tiers(scores[complete], prefiltered[complete])
            self.tier_pairs.update(f"{t}>{p}" for t, p in zip(true_tiers, pred_tiers))

    def finish(self) -> None:
        self.seconds = time.monotonic() - self.started

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON): the counts and sums so far and the seconds spent (the model's reference
        and the run's settings come from the resumed run)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUN_FIELDS}
        out["seconds"] = time.monotonic() - self.started
        return out

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's `state`: its time counts, the gap until this run started does not."""
        for name, value in state.items():
            if name == "seconds":
                self.started = time.monotonic() - float(value)
            elif name in COUNTERS:
                setattr(self, name, Counter(value))
            elif name not in RUN_FIELDS:
                setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "shard": self.shard, "shard_count": self.shard_count, "model_version": self.model_version,
            "backend": self.backend, "provider": self.provider,
            "rows_in": self.rows_in, "rows_scored": self.rows_scored, "rows_rejected": self.rows_rejected,
            "rows_prefiltered": self.rows_prefiltered, "rows_model": self.rows_model, "duplicate_ids": self.duplicate_ids,
            "blank_lines": self.blank_lines, "labels_unusable": self.labels_unusable,
            "kept_columns_absent": self.kept_columns_absent,
            "invariant_holds": self.rows_in == self.rows_scored + self.rows_rejected,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_in / self.seconds, 2) if self.seconds else None,
            "model_rows_per_second": round(self.rows_model / self.model_seconds, 2) if self.model_seconds else None,
            "batches": self.batches,
            "batch_latency_ms": {"p50": _percentile(self.latencies_ms, 50), "p95": _percentile(self.latencies_ms, 95),
                                 "histogram_edges_ms": LATENCY_EDGES_MS,
                                 "histogram": np.histogram(self.latencies_ms, bins=[0, *LATENCY_EDGES_MS, float("inf")])[0].tolist()},
            "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
            "real_token_share": round(self.real_tokens / self.padded_tokens, 4) if self.padded_tokens else None,
            "tier_counts": dict(sorted(self.tier_counts.items())), "reject_reasons": dict(sorted(self.reject_reasons.items())),
            "score_histograms": {"edges": SCORE_EDGES, **self.histograms},
            "started_at": self.started_at, "finished_at": _now(),
        }
        out.update(label_metrics(self.label_sums))
        out.update(tier_metrics(self.tier_pairs))
        if self.ledger is not None:
            out["ledger"] = self.ledger
        if self.reference is not None:
            # its distributions, not its raw scores (a row per validation article, in every shard's file)
            out["reference"], out["psi_threshold"] = reference_entry(self.reference), self.psi_threshold
        out["calibrated"] = self.calibrated
        out["metrics_group"] = self.metrics_group
        return out


def label_metrics(sums: dict[str, list[float]]) -> dict[str, Any]:
    """MAE/RMSE overall and per dimension from running sums; empty when no labels were present."""
    if not sums or not any(v[0] for v in sums.values()):
        return {}
    total = sum(v[0] for v in sums.values())
    out: dict[str, Any] = {
        "label_sums": sums,
        "mae": sum(v[1] for v in sums.values()) / total,
        "rmse": float(np.sqrt(sum(v[2] for v in sums.values()) / total)),
        "labelled_rows": int(max(v[0] for v in sums.values())),
    }
    for dim, (count, abs_sum, sq_sum) in sums.items():
        if count:
            out[f"{dim}_mae"] = abs_sum / count
            out[f"{dim}_rmse"] = float(np.sqrt(sq_sum / count))
    return out


def tier_metrics(pairs: Counter | dict[str, int]) -> dict[str, Any]:
    """The decision metrics that sum across shards: the tier confusion (labels vs predictions), per-tier precision,
    recall and F1, RED recall. Empty when no row had every label."""
    if not pairs:
        return {}
    spec = default_spec()
    names = spec.tier_names
    index = {n: i for i, n in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for key, count in pairs.items():
        true, pred = key.split(">")
        matrix[index[true]][index[pred]] += int(count)
    return {"tier_pairs": dict(sorted(pairs.items())), "decisions": tier_report(matrix, names)}


def batch_drift(shards: list[dict[str, Any]], merged: dict[str, Any]) -> dict[str, Any]:
    """The batch against its model's score reference (carried by every shard): PSI per dimension, tier-share shift;
    a warning names each dimension over the threshold. Only over the model-scored rows (prefiltered NOISE is not a
    prediction). Empty when the model has no reference; `drift_skipped` with the reason when the batch's scores
    cannot be held against it (several models, no model-scored row, raw against calibrated)."""
    references = [s["reference"] for s in shards if "reference" in s]
    if not references:
        return {}
    if len(merged["model_versions"]) != 1:
        return {"drift_skipped": "the batch's shards were scored by different models or calibrations"}
    if not merged["rows_model"]:
        return {"drift_skipped": "the model scored no row of the batch (every one prefiltered or rejected)"}
    if reason := calibration_mismatch(references[0], merged["calibrated"]):
        get_logger().info("drift_skipped", reason=reason)
        return {"drift_skipped": reason}
    histograms = {d: merged["score_histograms"][d] for d in DIMENSIONS}
    threshold = max(s.get("psi_threshold") or DEFAULT_PSI_THRESHOLD for s in shards)
    tiers = model_tier_counts(merged["tier_counts"], merged["rows_prefiltered"])
    result = drift(references[0], histograms, tiers, threshold)
    for dim in result["drifted_dimensions"]:
        get_logger().warning("drift_detected", dimension=dim, psi=round(result["psi"][dim], 4), threshold=threshold)
    return {"drift": result}


def _done_shards(out_dir: Path) -> set[str]:
    return {p.name for p in (out_dir / "_done").glob("part-[0-9][0-9][0-9][0-9][0-9]")}


def merge_metrics(out_dir: Path, gateway: str | None = None, push_partial: bool = True) -> dict[str, Any]:
    """Merge every finished shard's metrics into OUT/metrics.json (and metrics.prom), and push them to `gateway`
    (a partial batch's only with `push_partial`); safe to run at any time.

    Shards finish concurrently and each merges: a merge that a shard finished during is done again, so a writer
    that saw fewer shards can never be the last word; and merges take turns (OUT/.merge.lock) with their pushes,
    so a partial merge's push, slow or retried, cannot land after the complete one's and say the night is
    unfinished (a merge that could not wait its turn pushes only a complete batch)."""
    with in_turn(out_dir / MERGE_LOCK, MERGE_TURN_WAIT_S) as in_order:
        for _ in range(10):
            done = _done_shards(out_dir)
            merged = _merge_once(out_dir, done)
            if _done_shards(out_dir) == done:
                break
        if merged.get("complete") or (push_partial and in_order):
            pushed = push(merged, "batch", gateway)
            if pushed and merged.get("complete") and "metrics_groups" not in merged and merged.get("started_at"):
                remove_stale_shard_groups(merged["metrics_group"], merged["shard_count"],
                                          dt.datetime.fromisoformat(merged["started_at"]).timestamp(), gateway)
    return merged


MERGE_LOCK = ".merge.lock"
MERGE_TURN_WAIT_S = 120.0  # a merge takes seconds, its push at most 3 tries of 5 s


def rows_on_disk(out_dir: Path, shard: int) -> tuple[int | None, int | None]:
    """(rows in the part file, rows in the rejects file) of one shard; None for a file that is missing or
    unreadable (a finished shard always writes both, an empty one too: such a shard is not done)."""
    def rows(path: Path) -> int | None:
        try:
            return parquet_rows(path) if path.exists() else None
        except (pa.ArrowException, OSError) as exc:
            get_logger().warning("part_unreadable", path=str(path), error=str(exc))
            return None
    part, rejects = shard_files(out_dir, shard)
    return rows(part), rows(rejects)


def _shard_metrics(out_dir: Path, name: str) -> dict[str, Any] | None:
    """A shard's metrics file as it wrote it, or None when it is missing or cannot be read."""
    try:
        metrics = read_json(out_dir / "metrics" / f"{name}.json")
    except InputError:
        return None
    return metrics if _usable(metrics) else None


def _usable(metrics: Any) -> bool:
    """Whether a shard's metrics hold what the merge reads, of the right kind: a file of another version, or edited
    by hand, was a KeyError traceback in every merge (exit 1, retried), and a rerun skipped the shard as done."""
    def number(value: Any) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    def counts(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(v, int) for v in value.values())

    if not isinstance(metrics, dict):
        return False
    latency, histograms = metrics.get("batch_latency_ms"), metrics.get("score_histograms")
    return (all(isinstance(metrics.get(k), int) for k in ("shard", "rows_in", "shard_count"))
            and number(metrics.get("rows_per_second")) and isinstance(metrics.get("model_version"), str)
            and counts(metrics.get("tier_counts")) and counts(metrics.get("reject_reasons"))
            and isinstance(latency, dict) and number(latency.get("p50")) and number(latency.get("p95"))
            and isinstance(latency.get("histogram"), list) and len(latency["histogram"]) == len(LATENCY_EDGES_MS) + 1
            and isinstance(histograms, dict)
            and all(isinstance(histograms.get(d), list) and len(histograms[d]) == SCORE_BINS for d in DIMENSIONS))


def _recount(out_dir: Path, metrics: dict[str, Any]) -> bool:
    """Count the shard's scored and rejected rows from its files (they may have changed since it wrote its metrics)
    into `metrics`; whether they still account for its rows in."""
    scored, rejected = rows_on_disk(out_dir, metrics["shard"])
    metrics["rows_scored"], metrics["rows_rejected"] = scored or 0, rejected or 0
    return None not in (scored, rejected) and metrics["rows_in"] == scored + rejected


def broken_shard(out_dir: Path, shard: int) -> str | None:
    """Why a done shard's files no longer account for its rows (a part file deleted or damaged since), or None
    when they do: such a shard is not done, whatever its marker says."""
    metrics = _shard_metrics(out_dir, part_name(shard))
    if metrics is None:
        return "its metrics file is missing or unreadable"
    scored, rejected = rows_on_disk(out_dir, shard)
    if None in (scored, rejected):
        return "its part or rejects file is missing or unreadable"
    if metrics["rows_in"] != scored + rejected:
        return f"rows in {metrics['rows_in']} != scored {scored} + rejected {rejected} in its files"
    return None


def _done_metrics(out_dir: Path, done: set[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """The metrics of the shards marked done, recounted from their files, and the shards marked done that are not
    done after all (a rerun redoes them): their metrics file is missing or unreadable, or their files lost rows."""
    shards, broken = [], []
    for name in sorted(done):
        metrics = _shard_metrics(out_dir, name)
        if metrics is None:
            get_logger().warning("shard_metrics_unreadable", shard=name)
            broken.append(int(name.removeprefix("part-")))
            continue
        if not _recount(out_dir, metrics):
            broken.append(metrics["shard"])
        shards.append(metrics)
    return shards, broken


def done_shard_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The metrics of the finished shards in OUT (what they were scored with: --shard-count, calibration)."""
    return [m for name in sorted(_done_shards(out_dir)) if (m := _shard_metrics(out_dir, name)) is not None]


def _merge_once(out_dir: Path, done: set[str]) -> dict[str, Any]:
    shards, broken = _done_metrics(out_dir, done)
    merged: dict[str, Any] = {"shards": len(shards), "shard_count": max((s["shard_count"] for s in shards), default=0),
                              "shards_done": sorted(s["shard"] for s in shards)}
    for key in ("rows_in", "rows_scored", "rows_rejected", "rows_prefiltered", "rows_model", "duplicate_ids",
                "blank_lines", "labels_unusable", "real_tokens", "padded_tokens", "batches"):
        merged[key] = sum(s.get(key, 0) for s in shards)
    counts = sorted({s["shard_count"] for s in shards})
    # A shard whose files lost rows is not done: the batch is incomplete (and its units stay out of the ledger) until
    # the shard is scored again, which a rerun does.
    merged["complete"] = (bool(shards) and merged["shards"] == merged["shard_count"] and len(counts) == 1
                          and not broken)
    if broken:
        get_logger().error("invariant_broken", out=str(out_dir), shards=sorted(broken),
                           remedy="score those shards again: a rerun redoes a shard whose files do not add up")
    if len(counts) > 1:  # shards of two different batchings: never one complete batch
        merged["shard_counts"] = counts
        get_logger().warning("shard_counts_mixed", out=str(out_dir), shard_counts=counts)
    merged["model_versions"] = sorted({s["model_version"] for s in shards})
    if len(merged["model_versions"]) > 1:  # a model exported or recalibrated while the batch ran: mixed scores
        get_logger().warning("model_versions_mixed", out=str(out_dir), model_versions=merged["model_versions"],
                             consequence="the batch's scores come from different models or calibrations; drift "
                                         "is not computed (score it again with --force for one)")
    groups = sorted({s.get("metrics_group", DEFAULT_METRICS_GROUP) for s in shards})
    merged["metrics_group"] = groups[0] if len(groups) == 1 else "mixed"  # pushed beside neither group's batches
    if len(groups) > 1:
        merged["metrics_groups"] = groups
    calibrations = {bool(s.get("calibrated", False)) for s in shards}
    merged["calibrated"] = calibrations.pop() if len(calibrations) == 1 else None  # None: shards of both kinds
    if merged["calibrated"] is None:  # one MAE, tier metrics and ledger night over two score scales: not a batch
        merged["complete"] = False
        get_logger().warning("calibrations_mixed", out=str(out_dir),
                             remedy="redo the shards of one kind with --force, with or without --no-calibration")
    merged["real_token_share"] = round(merged["real_tokens"] / merged["padded_tokens"], 4) if merged["padded_tokens"] else None
    merged["rows_per_second_sum"] = round(sum(s["rows_per_second"] or 0 for s in shards), 2)
    hist = np.sum([s["batch_latency_ms"]["histogram"] for s in shards], axis=0).tolist() if shards else []
    own = {q: [v for s in shards if (v := s["batch_latency_ms"][q]) is not None] for q in ("p50", "p95")}
    pooled = {q: _between(histogram_quantile(share, hist), own[q]) for q, share in (("p50", 0.5), ("p95", 0.95))}
    merged["batch_latency_ms"] = {**pooled, "p50_max": max(own["p50"], default=None),  # the worst shard's own
                                  "p95_max": max(own["p95"], default=None),
                                  "histogram_edges_ms": LATENCY_EDGES_MS, "histogram": hist}
    for key in ("tier_counts", "reject_reasons"):
        total: Counter = Counter()
        for s in shards:
            total.update(s[key])
        merged[key] = dict(sorted(total.items()))
    merged["score_histograms"] = {"edges": SCORE_EDGES, **{
        d: np.sum([s["score_histograms"][d] for s in shards], axis=0).astype(int).tolist() if shards else [0] * SCORE_BINS
        for d in DIMENSIONS}}
    sums: dict[str, list[float]] = {}
    for s in shards:
        for dim, values in s.get("label_sums", {}).items():
            sums[dim] = [a + b for a, b in zip(sums.get(dim, [0, 0.0, 0.0]), values)]
    merged.update(label_metrics(sums))
    pairs: Counter = Counter()
    for s in shards:
        pairs.update(s.get("tier_pairs", {}))
    merged.update(tier_metrics(pairs))
    merged["prefilter_rate"] = merged["rows_prefiltered"] / merged["rows_in"] if merged["rows_in"] else None
    merged["reject_rate"] = merged["rows_rejected"] / merged["rows_in"] if merged["rows_in"] else None
    # A partial batch is no sample of the night: its PSI would raise alarms that the whole batch does not.
    merged.update(batch_drift(shards, merged) if merged["complete"] else {})
    ledgers = {(s["ledger"]["path"], s["ledger"]["input_root"]) for s in shards if "ledger" in s}
    if merged["complete"] and ledgers:  # every shard done: the batch's units join the ledger (never before)
        from .ledger import record_units

        for path, root in sorted(ledgers):
            units = [u for s in shards if s.get("ledger", {}).get("path") == path for u in s["ledger"]["units"]]
            added = record_units(Path(path), root, units)
            merged["ledger"] = {"path": path, "units": len(units), "added": added}
            get_logger().info("ledger_updated", ledger=path, units=len(units), added=added)
    merged["invariant_holds"] = not broken
    merged["invariant_broken_shards"] = sorted(broken)
    merged["started_at"] = min((s["started_at"] for s in shards if s.get("started_at")), default=None)
    # when its last shard finished: the batch's success time, however late (or often) it is merged
    merged["finished_at"] = max((s["finished_at"] for s in shards if s.get("finished_at")), default=None)
    merged["merged_at"] = _now()
    if shards:
        write_json_atomic(merged, out_dir / "metrics.json")
        write_textfile(merged, "batch", out_dir / "metrics.prom")
    return merged


def merge_until_complete(out_dir: Path, expect_shards: int | None, wait_seconds: float = 0.0,
                         poll_seconds: float = 30.0, gateway: str | None = None) -> dict[str, Any]:
    """Merge once every expected shard is done: at least `expect_shards`, and every shard of the count the done
    shards were scored with, then push it to `gateway`. Waits up to `wait_seconds`, logging how many shards are
    done at least every 30 s meanwhile (a merge Job waits hours); a directory not made yet counts as no shard done."""
    deadline = time.monotonic() + wait_seconds

    markers: list[tuple[str, int]] | None = None  # the done markers the last merge was made of
    merged: dict[str, Any] = {}
    warned = False

    def merged_now() -> tuple[dict[str, Any], int]:
        nonlocal markers, merged, warned
        # merged again only when a shard finished or was redone since: a wait of hours over an unchanged batch
        # neither rewrites its files nor pushes and records it every poll
        try:
            seen = sorted((p.name, p.stat().st_mtime_ns) for p in (out_dir / "_done").glob("part-*"))
        except FileNotFoundError:  # a marker removed as it was listed (a shard being redone): merge again
            seen = None
        if seen is None or seen != markers or not merged:
            # pushed once complete: the shards pushed the partial merges as they finished
            markers, merged = seen, (merge_metrics(out_dir, gateway, push_partial=False) if out_dir.is_dir()
                                     else {"shards": 0, "shard_count": 0})
        if merged.get("complete") and (expect_shards or 0) > merged["shard_count"] and not warned:
            # a merge Job rendered with another --shards waits a day for shards that never come; or the batch is
            # being scored again with more (--force): said at once, and the wait goes on
            warned = True
            get_logger().warning("merge_expects_more_shards", out=str(out_dir), expect_shards=expect_shards,
                                 shard_count=merged["shard_count"], reason="the batch is complete with fewer shards "
                                 "(scored with another --shard-count?)")
        return merged, max(expect_shards or 0, merged["shard_count"], 1)

    merged, needed = merged_now()
    if merged["shards"] >= needed and merged.get("complete"):
        return merged
    if wait_seconds <= 0:
        raise _incomplete(out_dir, merged, needed)
    with Progress(total=needed, what="merge_wait", unit="shards", already_done=merged["shards"]) as waiting:
        while time.monotonic() < deadline:
            time.sleep(min(poll_seconds, max(deadline - time.monotonic(), 0.0)))
            merged, needed = merged_now()
            waiting.total = needed
            waiting.update(merged["shards"] - waiting.done)
            if merged["shards"] >= needed and merged.get("complete"):
                return merged
        raise _incomplete(out_dir, merged, needed)


def _incomplete(out_dir: Path, merged: dict[str, Any], needed: int) -> RetryableError:
    if broken := merged.get("invariant_broken_shards"):
        why = f"shards {broken} no longer add up (rows or metrics lost since they were scored): score them again"
    elif counts := merged.get("shard_counts"):
        why = f"its done shards were scored with --shard-count {counts}: redo every shard with one count"
    elif merged["shards"] and merged.get("calibrated", False) is None:
        why = "its done shards were scored both with and without calibration: redo the shards of one kind"
    elif merged.get("complete"):
        why = (f"the batch is complete with {merged['shard_count']} shards (scored with --shard-count "
               f"{merged['shard_count']}), not the {needed} expected")
    else:
        why = f"{merged['shards']} of {needed} shards are done"
    return RetryableError(f"{out_dir}: {why}")
