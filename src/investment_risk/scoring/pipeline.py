"""Bulk scoring of article batches, one shard at a time (a datatrove-style pipeline).

    sorted files x row groups -> units[shard::count] -> read (bounded batches) -> validate (rejects) ->
    prefilter (NOISE, no model call) -> tokenise (background thread) -> predict (batches under a token budget) ->
    clip to the score range -> tiers + signal strength -> part file, rejects, metrics -> _done marker last

Every input row ends in exactly one of the part file (scored or prefiltered) and the rejects file. Outputs are
written to temporary names and renamed; the `_done` marker is written last, so a rerun skips a finished shard and
reads an unfinished one on from its last checkpoint (progress.py).
"""

from __future__ import annotations

import json
import math
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.atomic import atomic_path, remove_abandoned, write_json_atomic
from ..core.drift import DEFAULT_PSI_THRESHOLD, check_threshold
from ..core.errors import ConfigError, InputError, Terminated
from ..core.faults import fault_point
from ..core.logs import Progress, bound, current_stage, get_logger
from ..core.signals import StopRequest
from ..core.spec import DIMENSIONS, NUM_DIMENSIONS, default_spec
from ..datasets.readers import JSON_TEXT, Batch, is_jsonl, iter_file_batches, parquet_schema
from ..modeling.description import ModelDescription, describe_model
from ..modeling.predict import predict, token_budget_for
from .batch_inputs import check_same_batch, shard_inputs
from .ledger import input_root
from .progress import Position, SeenIds, ShardProgress, discard_checkpoints, discard_stale_checkpoints
from .prometheus import DEFAULT_METRICS_GROUP, METRICS_GROUP_PATTERN, push, write_textfile
from .shard_metrics import ShardMetrics, broken_shard, done_shard_metrics, merge_metrics
from .units import READ_COLUMNS, Unit, done_marker, parquet_rows, part_name, remove_shards_from, shard_files, shard_outputs
from .writer import REJECT_SCHEMA, ShardWriter, kept_columns, part_schema, provenance

MAX_ARTICLE_BYTES = 1_000_000
NONFINITE_REASON = "the model gave a non-finite score (NaN or infinity)"


@dataclass(frozen=True)
class ScoreConfig:
    model: Path
    inputs: tuple[str, ...]
    out: Path
    shard_index: int = 0
    shard_count: int = 1
    backend: str = "onnx"
    device: str = "auto"
    force: bool = False
    keep_columns: tuple[str, ...] = ()
    read_rows: int = 2048  # rows per read batch: the window inside which rows are sorted by length
    token_budget: int | None = None  # padded tokens per model call; None: by device (predict.token_budget_for)
    max_batch_rows: int = 256
    threads: int | None = None
    cpu_engine: str = "auto"  # on CPUs: the engine export chose, or a named one
    calibration: bool = True  # apply the model's calibration (where it has one)
    ledger: Path | None = None  # incremental: score only units this ledger does not list; the merge adds them
    psi_threshold: float = DEFAULT_PSI_THRESHOLD  # the merge warns about each dimension whose PSI is above it
    pushgateway: str | None = None  # Prometheus Pushgateway URL: the shard's and the batch's metrics go there
    checkpoint_seconds: float = 300.0  # a checkpoint at the first read batch's end this long after the last one
    metrics_group: str = DEFAULT_METRICS_GROUP  # the Pushgateway's batch_group label: nightly, or ad hoc

    @property
    def read_columns(self) -> tuple[str, ...]:
        """What scoring reads of an input file: the article, the labels, the kept columns."""
        return (*READ_COLUMNS, *self.keep_columns)

    def __post_init__(self) -> None:
        if self.shard_count < 1:
            raise ConfigError(f"--shard-count must be >= 1, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"--shard-index {self.shard_index} must be in [0, --shard-count {self.shard_count})")
        if not self.inputs:
            raise ConfigError("--input: give at least one file, directory or glob")
        if not re.fullmatch(METRICS_GROUP_PATTERN, self.metrics_group):
            raise ConfigError(f"--metrics-group {self.metrics_group!r}: lower-case letters, digits, '-' and '_', "
                              "at most 63, starting and ending with a letter or digit")
        if not self.checkpoint_seconds >= 0:
            raise ConfigError(f"--checkpoint-seconds must be >= 0, got {self.checkpoint_seconds}")
        try:
            check_threshold(self.psi_threshold)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        taken = set(part_schema(()).names) | set(REJECT_SCHEMA.names)
        bad = [c for c in self.keep_columns if c in taken]
        if bad:
            raise ConfigError(f"--keep-columns: {', '.join(bad)} would collide with an output column")


@dataclass
class Prepared:
    """One read batch after validation, prefilter and tokenisation (made on the reader thread)."""

    batch: Batch
    reject_reasons: dict[int, str]
    prefilter_reasons: dict[int, str]
    model_rows: list[int]
    tokens: list[np.ndarray]
    labels: np.ndarray | None  # (rows, 8), NaN where a row has no usable label
    labels_unusable: np.ndarray | None = None  # per row: label values that are not a number in the score range
    position: Position = Position()  # where reading stands once this batch is scored


def _reject_reasons(batch: Batch) -> dict[int, str]:
    """The reader's row problems, and articles over the size limit (empty ones are already a row problem)."""
    reasons = dict(batch.problems)
    titles, contents = batch.table.column("title").to_pylist(), batch.table.column("content").to_pylist()
    for i, (title, content) in enumerate(zip(titles, contents)):
        if i in reasons:
            continue
        size = len((content or "").encode("utf-8", "surrogatepass")) + len((title or "").encode("utf-8", "surrogatepass"))
        if size > MAX_ARTICLE_BYTES:
            reasons[i] = f"article over the {MAX_ARTICLE_BYTES}-byte limit ({size} bytes)"
    return reasons


def prepare(batch: Batch, tokenizer: Any, model: ModelDescription, has_labels: bool,
            position: Position = Position()) -> Prepared:
    spec = default_spec()
    rejects = _reject_reasons(batch)
    titles, contents = batch.table.column("title").to_pylist(), batch.table.column("content").to_pylist()
    reasons = spec.prefilter_reasons(batch.table.column("title"), batch.table.column("content"))
    prefiltered: dict[int, str] = {}
    model_rows: list[int] = []
    for i in range(batch.table.num_rows):
        if i in rejects:
            continue
        reason = reasons[i]
        if reason:
            prefiltered[i] = reason
        else:
            model_rows.append(i)
    tokens = model.token_rows(tokenizer, [titles[i] for i in model_rows], [contents[i] for i in model_rows])
    if not has_labels:
        return Prepared(batch, rejects, prefiltered, model_rows, tokens, None, position=position)
    labels, unusable = usable_labels(batch.table, spec)
    return Prepared(batch, rejects, prefiltered, model_rows, tokens, labels, unusable, position)


def usable_labels(table: Any, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """The eight labels as floats, NaN where missing, and where a value is not a number in the score range (a
    string, 42): such a label is left out of the MAE and tiers and counted, and its row is scored all the same.
    Returns the labels and, per row, how many were unusable."""
    low, high = spec.score_range
    labels = np.full((table.num_rows, len(DIMENSIONS)), np.nan)
    unusable = np.zeros((table.num_rows, len(DIMENSIONS)), dtype=bool)
    for d, dim in enumerate(DIMENSIONS):
        column = table.column(dim)
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls as NaN
            unusable[:, d] = ~np.isnan(values) & ((values < low) | (values > high))
            labels[:, d] = np.where(unusable[:, d], np.nan, values)
        elif (table.schema.field(dim).metadata or {}) == JSON_TEXT:  # JSONL's mixed kinds: numbers among them count
            values = np.array([_json_number(v) for v in column.to_pylist()], dtype=np.float64)
            unusable[:, d] = column.is_valid().to_numpy(zero_copy_only=False) & (
                np.isnan(values) | (values < low) | (values > high))
            labels[:, d] = np.where(unusable[:, d], np.nan, values)
        else:  # strings, booleans: every value present is unusable
            unusable[:, d] = column.is_valid().to_numpy(zero_copy_only=False)
    return labels, unusable.sum(axis=1)


def _json_number(text: str | None) -> float:
    """A JSON text's number (NaN for null, a string, a boolean, an object)."""
    if text is None:
        return math.nan
    value = json.loads(text)
    try:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer past a float's range: out of [0, 10] like any other
        return math.inf if value > 0 else -math.inf


class ShardScorer:
    """Scores one shard's units into the output directory."""

    def __init__(self, config: ScoreConfig, runner: Any, tokenizer: Any, model: ModelDescription) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.model = model
        self.pad_id = model.pad_id(tokenizer)
        self.columns_seen: set[str] = set()  # to name a --keep-columns column that no input had
        self.batches_scored = 0  # read batches, by this run
        self.calibrated = writes_calibrated(config, model)
        self.spec = default_spec()
        on_gpu = "cuda" in str(getattr(runner, "provider", "")).lower()  # CUDAExecutionProvider, torch-cuda
        self.token_budget = config.token_budget or token_budget_for("cuda" if on_gpu else "cpu")

    def _read(self, units: Sequence[Unit], start: Position) -> Iterator[tuple[Position, Batch]]:
        """The shard's read batches from `start` on, each with the position once it is done (a resumed shard
        reads the batches of its unit before `start` again, which costs no model call, and skips them)."""
        for index in range(start.unit, len(units)):
            unit = units[index]
            columns = list(self.config.read_columns)
            if not is_jsonl(unit.path):  # the file's own names, each as often as it has it (check_schema's doubles)
                columns = [c for c in parquet_schema(unit.path).names if c in columns]
            groups = None if unit.row_group is None else [unit.row_group]
            batches = iter_file_batches(unit.path, self.config.read_rows, columns=columns, lenient=True,
                                        row_groups=groups)
            for number, batch in enumerate(batches, start=1):
                if index > start.unit or number > start.batch:
                    yield Position(index, number), batch

    def _producer(self, units: Sequence[Unit], start: Position, out: queue.Queue, stop: threading.Event) -> None:
        """Reads, validates and tokenises ahead of the model, on its own thread (fast tokenizers drop the GIL)."""
        try:
            warned: set[Path] = set()
            for position, batch in self._read(units, start):
                labels = [d for d in DIMENSIONS if d in batch.table.column_names]
                has_labels = len(labels) == len(DIMENSIONS)
                if labels and not has_labels and batch.path not in warned:  # else its MAE is gone without a word
                    warned.add(batch.path)
                    get_logger().warning("labels_incomplete", file=str(batch.path),
                                         missing=[d for d in DIMENSIONS if d not in labels],
                                         consequence="its rows are scored but not in the label metrics")
                item = prepare(batch, self.tokenizer, self.model, has_labels, position)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put(exc)

    def fingerprint(self, units: Sequence[Unit]) -> dict[str, Any]:
        """What decides the rows a shard writes: a checkpoint resumes only the same work."""
        config = self.config
        return {"model_version": self.model.model_version, "provider": str(getattr(self.runner, "provider", "?")),
                "calibrated": self.calibrated,
                "filter": [self.spec.name, self.spec.version], "keep_columns": list(config.keep_columns),
                "read_rows": config.read_rows, "shard": [config.shard_index, config.shard_count],
                "units": [[str(unit.path), unit.row_group, unit.rows] for unit in units]}

    def run(self, units: Sequence[Unit], total_rows: int | None, progress: ShardProgress | None = None) -> ShardMetrics:
        """Score the shard's units into its part and rejects files; with `progress`, from its last checkpoint on,
        taking new ones as it goes."""
        metrics = ShardMetrics(shard=self.config.shard_index, shard_count=self.config.shard_count,
                               model_version=self.model.model_version, backend=self.config.backend,
                               provider=getattr(self.runner, "provider", "?"), reference=self.model.reference,
                               psi_threshold=self.config.psi_threshold, calibrated=self.calibrated,
                               metrics_group=self.config.metrics_group)
        # Rows in, from the input side: Parquet footers now, JSONL rows as they are read.
        metrics.rows_in = sum(unit.rows or 0 for unit in units)
        part, rejects = shard_files(self.config.out, self.config.shard_index)
        metadata = provenance(self.model, self.calibrated, self.config.shard_index, self.config.shard_count)
        resumed = progress.resume() if progress and not self.config.force else None
        if progress and self.config.force:
            progress.clear()
        seen_ids = SeenIds()
        start, segment = Position(), 0
        if resumed:
            metrics.resume(resumed.metrics)
            seen_ids, start, segment = resumed.seen_ids, resumed.position, resumed.segments[-1] + 1
            self.columns_seen.update(resumed.columns_seen)
        items: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()
        producer = threading.Thread(target=self._producer, args=(units, start, items, stop), daemon=True,
                                    name="tokenise")
        producer.start()
        done_rows = metrics.rows_prefiltered + metrics.rows_model + sum(metrics.reject_reasons.values())
        try:
            with Progress(total=total_rows, what="score", unit="rows", already_done=done_rows) as bar, \
                    StopRequest().catching() as stop_request:
                while True:
                    targets = progress.segment_files(segment) if progress else (part, rejects)
                    position = self._write_segment(items, targets, metadata, metrics, seen_ids, bar, stop_request,
                                                   checkpoints=progress is not None)
                    if progress:  # at the end too: a kill while the segments are joined leaves only the join to do
                        progress.commit(segment, position or Position(len(units)), metrics.state(), seen_ids,
                                        self.columns_seen)
                        segment += 1
                    if position is None:  # read to the end
                        break
                    if stop_request.requested:
                        get_logger().warning("checkpointed_on_sigterm", unit=position.unit, batch=position.batch,
                                             reason="SIGTERM: stopped at a read batch's end; a rerun reads on from it")
                        raise Terminated()
            if progress:
                progress.join(part, rejects, part_schema(self.config.keep_columns), metadata)
        finally:
            stop.set()
            producer.join(timeout=5)
        # Rows out, from what is on disk now that both files are in place.
        metrics.count_outputs(parquet_rows(part), parquet_rows(rejects))
        if self.columns_seen:  # a shard that read nothing has nothing to say about columns
            metrics.kept_columns_absent = [c for c in self.config.keep_columns if c not in self.columns_seen]
        if metrics.kept_columns_absent:  # a misspelt name, most likely: its output column is all null
            get_logger().warning("kept_columns_absent", columns=metrics.kept_columns_absent,
                                 reason="no input of this shard has them; their output columns are null")
        metrics.finish()
        return metrics

    def _write_segment(self, items: queue.Queue, targets: tuple[Path, Path], metadata: dict[str, str],
                       metrics: ShardMetrics, seen_ids: SeenIds, bar: Progress, stop_request: StopRequest,
                       checkpoints: bool) -> Position | None:
        """Score read batches into the part and rejects files `targets`, each renamed into place whole (the rejects
        first: a kill between the renames leaves the part missing, so the shard is not taken for done), until the
        reading ends (None) or, with `checkpoints`, one is due (where reading stands)."""
        began = time.monotonic()
        position = None
        with atomic_path(targets[0]) as part_tmp, atomic_path(targets[1]) as rejects_tmp:
            writer = ShardWriter(part_tmp, rejects_tmp, metadata)
            try:
                while (item := items.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    self._score_batch(item, writer, metrics, seen_ids)
                    bar.update(item.batch.table.num_rows)
                    self.batches_scored += 1
                    fault_point(f"read_batch_scored:{part_name(self.config.shard_index)}:{self.batches_scored}")
                    if stop_request.requested and not checkpoints:
                        raise Terminated()
                    if checkpoints and (stop_request.requested
                                        or time.monotonic() - began >= self.config.checkpoint_seconds):
                        position = item.position
                        break
            except BaseException:
                writer.close()
                raise
            writer.close(part_schema(self.config.keep_columns))
        return position

    @staticmethod
    def _reject_duplicates(item: Prepared, ids_col: list[Any], seen_ids: SeenIds, metrics: ShardMetrics,
                           earlier_only: bool = False) -> None:
        """A second row with an id already scored in this shard is rejected, never scored twice. `earlier_only`:
        only ids that earlier batches scored (before the model call, which they then cost nothing); otherwise the
        first row of this batch that is not rejected (its scores finite) takes the id."""
        batch = item.batch
        file = str(batch.path)
        duplicates = set()
        for i, id_ in enumerate(ids_col):
            if i in item.reject_reasons:
                continue
            if id_ in seen_ids:
                # The id goes after the colon, so metrics group all duplicates under one reason.
                item.reject_reasons[i] = f"duplicate id (first seen at {seen_ids.where(id_)}): {id_!r}"
                duplicates.add(i)
            elif not earlier_only:
                seen_ids.add(id_, file, batch.row_number(i))
        if duplicates:
            metrics.duplicate_ids += len(duplicates)
            pairs = [(r, t) for r, t in zip(item.model_rows, item.tokens) if r not in duplicates]
            item.model_rows, item.tokens = [r for r, _ in pairs], [t for _, t in pairs]

    @staticmethod
    def _reject_nonfinite(item: Prepared, raw: np.ndarray) -> np.ndarray:
        """A row whose scores are NaN or infinite (an fp16 overflow, a broken graph) has no score to give: it is a
        reject, not a BLUE row with NaN scores that the histograms and MAE would silently lose. Run before the
        duplicate check, so its id is not taken: a later row with it is scored, not called a duplicate."""
        finite = np.isfinite(raw).all(axis=1)
        if finite.all():
            return raw
        for row in np.asarray(item.model_rows)[~finite]:
            item.reject_reasons[int(row)] = NONFINITE_REASON
        get_logger().error("nonfinite_scores", rows=int((~finite).sum()), file=str(item.batch.path),
                           reason="the model's output is not finite; its rows are rejected")
        pairs = [(r, t) for r, t, ok in zip(item.model_rows, item.tokens, finite) if ok]
        item.model_rows, item.tokens = [r for r, _ in pairs], [t for _, t in pairs]
        return raw[finite]

    def _score_batch(self, item: Prepared, writer: ShardWriter, metrics: ShardMetrics, seen_ids: SeenIds) -> None:
        batch = item.batch
        n = batch.table.num_rows
        if is_jsonl(batch.path):
            metrics.rows_in += n
        metrics.blank_lines += batch.blank_lines
        self.columns_seen.update(batch.table.column_names)
        ids_col = batch.table.column("id").to_pylist()
        # Ids already scored in earlier batches are known now and cost no model call; within this batch the first
        # row with a score takes its id, which only the scores say.
        self._reject_duplicates(item, ids_col, seen_ids, metrics, earlier_only=True)
        scores = np.zeros((n, NUM_DIMENSIONS), dtype=np.float32)
        if item.model_rows:
            raw = predict(self.runner, item.tokens, self.pad_id, token_budget=self.token_budget,
                          max_rows=self.config.max_batch_rows,
                          on_batch=lambda b, seconds: metrics.record_batch(seconds, b.real_tokens, b.input_ids.size))
            raw = self._reject_nonfinite(item, raw)
            scores[item.model_rows] = self.model.calibrated(self.spec.clip(raw), self.config.calibration)
        self._reject_duplicates(item, ids_col, seen_ids, metrics)
        keep = [i for i in range(n) if i not in item.reject_reasons]
        prefiltered = np.array([i in item.prefilter_reasons for i in keep], dtype=bool)
        tiers, strength = self.spec.assign_tiers(scores[keep], prefiltered)
        # Prefiltered rows were never scored: their scores and strength are null, their tier is NOISE.
        score_mask = np.repeat(prefiltered[:, None], NUM_DIMENSIONS, axis=1)
        columns: dict[str, Any] = {"id": pa.array([ids_col[i] for i in keep], type=pa.string())}
        for d, dim in enumerate(DIMENSIONS):
            columns[dim] = pa.array(scores[keep, d], type=pa.float32(), mask=score_mask[:, d])
        columns["signal_tier"] = pa.array(list(tiers), type=pa.string())
        columns["signal_strength"] = pa.array(strength, type=pa.float32(), mask=prefiltered)
        columns["model_version"] = pa.array([self.model.model_version] * len(keep), type=pa.string())
        columns["prefilter_reason"] = pa.array([item.prefilter_reasons.get(i) for i in keep], type=pa.string())
        columns.update(kept_columns(batch, keep, self.config.keep_columns))
        writer.write_part(pa.table(columns))
        if item.reject_reasons:
            rows = sorted(item.reject_reasons)
            writer.write_rejects(pa.table({
                "id": pa.array([ids_col[i] for i in rows], type=pa.string()),
                "source_file": pa.array([str(batch.path)] * len(rows), type=pa.string()),
                "row_number": pa.array([batch.row_number(i) for i in rows], type=pa.int64()),
                "reason": pa.array([item.reject_reasons[i] for i in rows], type=pa.string()),
            }, schema=REJECT_SCHEMA))
            metrics.count_rejects(item.reject_reasons.values())
        metrics.rows_prefiltered += int(prefiltered.sum())
        metrics.rows_model += len(item.model_rows)
        model_scores = scores[item.model_rows]
        metrics.add_scores(model_scores, tiers)
        if item.labels is not None:
            labelled = sorted([*item.model_rows, *(i for i in keep if i in item.prefilter_reasons)])
            metrics.add_labels(scores[labelled], item.labels[labelled],
                               np.array([i in item.prefilter_reasons for i in labelled], dtype=bool))
            metrics.labels_unusable += int(item.labels_unusable[labelled].sum())


def score(config: ScoreConfig) -> dict[str, Any]:
    """Score this shard (unless already done) and merge every finished shard's metrics into OUT/metrics.json.
    Its events carry the shard, and the caller's stage (the demo's `demo:score`) or `score`; after it, the
    caller's lines do not (the demo's report is no shard's)."""
    with bound(stage=current_stage() or "score", shard=config.shard_index):
        return _score(config)


def writes_calibrated(config: ScoreConfig, model: ModelDescription) -> bool:
    """Whether the shard's scores go through the model's calibration."""
    return config.calibration and model.calibration is not None


def _score(config: ScoreConfig) -> dict[str, Any]:
    from ..modeling.loading import load_runner
    from ..modeling.presets import load_tokenizer

    log = get_logger()
    out = config.out
    marker = done_marker(out, config.shard_index)
    done = done_shard_metrics(out)  # what the finished shards were scored with
    # Before the skip: shard 0 of 1 done is not shard 0 of 2 done (a finished shard would hide the mismatch).
    if not config.force and (counts := {m["shard_count"] for m in done} - {config.shard_count}):
        raise InputError(f"--out {out} holds shards scored with --shard-count {', '.join(map(str, sorted(counts)))}, "
                         f"not {config.shard_count}: score into another --out, or redo every shard with --force")
    if config.force and (stale := remove_shards_from(out, config.shard_count)):
        log.warning("stale_shards_removed", shards=stale, reason=f"--force with --shard-count {config.shard_count}: "
                    "no shard of this count would replace them")
    check_same_batch(out, config.inputs, config.ledger)  # before the skip too: "already done" is no other batch's
    if marker.exists() and not config.force:
        if (problem := broken_shard(out, config.shard_index)) is None:
            log.info("shard_skipped", reason="already done (pass --force to redo)", marker=str(marker))
            for dest in shard_outputs(out, config.shard_index):  # what a killed twin (a replaced pod) left half-written
                remove_abandoned(dest)
            discard_checkpoints(out, config.shard_index)  # a kill between the marker and their removal left them
            return merge_metrics(out)
        log.warning("shard_redone", reason=f"marked done, but {problem}")
    model = describe_model(config.model)  # a model that cannot score stops the shard before it lists the batch
    calibrated = writes_calibrated(config, model)
    others = {bool(m.get("calibrated", False)) for m in done if m["shard"] != config.shard_index}
    if not config.force and (kinds := others - {calibrated}):
        raise InputError(f"--out {out} holds shards scored {'with' if kinds.pop() else 'without'} calibration, this "
                         f"one would be {'with' if calibrated else 'without'}: one batch is on one score scale; "
                         "score into another --out, or redo every shard with --force")
    tokenizer = load_tokenizer(model.tokenizer_dir)
    runner = load_runner(model, config.backend, config.device, config.threads, config.cpu_engine)
    units, shard_entries = shard_inputs(out, config.inputs, config.ledger, config.shard_index, config.shard_count,
                                        read=config.read_columns)
    total = _count_rows(units)
    log.info("shard_start", files=len({unit.path for unit in units}), units=len(units), rows=total, backend=config.backend,
             provider=runner.provider, model_version=model.model_version)
    if marker.exists():
        marker.unlink()  # redone (--force, or lost rows): not done until the new marker lands
    scorer = ShardScorer(config, runner, tokenizer, model)
    discard_stale_checkpoints(out, config.shard_count)
    progress = ShardProgress.claim(out, config.shard_index, scorer.fingerprint(units))
    marked = False
    try:
        metrics = scorer.run(units, total, progress)
        shard_metrics = _finish_shard(config, metrics, shard_entries)
        marked = True
    finally:
        if progress:
            progress.release(remove=marked)  # its checkpoints go once the marker is in place
    push(shard_metrics, f"{config.shard_index:05d}", config.pushgateway)
    return merge_metrics(out, config.pushgateway)


def _finish_shard(config: ScoreConfig, metrics: ShardMetrics, shard_entries: Any) -> dict[str, Any]:
    """The shard's metrics (JSON and Prometheus text), then its `_done` marker, last. Returns the metrics."""
    log = get_logger()
    out = config.out
    marker = done_marker(out, config.shard_index)
    if shard_entries is not None:  # what this shard scored, for the merge to add to the ledger once all are done
        # whole: the merge that records it may run from another folder
        metrics.ledger = {"path": str(Path(config.ledger).absolute()), "input_root": input_root(config.inputs),
                          "units": shard_entries}
    metrics_dir = out / "metrics"
    as_dict = metrics.to_dict()
    write_json_atomic(as_dict, metrics_dir / f"{part_name(config.shard_index)}.json")
    group = f"{config.shard_index:05d}"  # the shard's Prometheus group, as in its file names
    write_textfile(as_dict, group, metrics_dir / f"{part_name(config.shard_index)}.prom")
    fault_point(f"before_done:{part_name(config.shard_index)}")
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"rows_in": metrics.rows_in, "finished_at": as_dict["finished_at"]}) + "\n")
    log.info("shard_done", rows_in=metrics.rows_in, scored=metrics.rows_scored, rejected=metrics.rows_rejected,
             prefiltered=metrics.rows_prefiltered, blank_lines=metrics.blank_lines,
             rows_per_second=as_dict["rows_per_second"], invariant_holds=as_dict["invariant_holds"])
    return as_dict


def _count_rows(units: Sequence[Unit]) -> int | None:
    """Rows in this shard, or None when a JSONL file makes it unknown without reading it."""
    if any(unit.rows is None for unit in units):
        return None
    return sum(unit.rows for unit in units)
