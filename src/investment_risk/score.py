"""Bulk scoring of article batches, one shard at a time (a datatrove-style pipeline).

    sorted files x row groups -> units[shard::count] -> read (bounded batches) -> validate (rejects) ->
    prefilter (NOISE, no model call) -> tokenise (background thread) -> batches by length under a token budget ->
    model -> clip to [0, 10] -> tiers + signal strength -> part file, rejects, metrics -> _done marker last

Every input row ends in exactly one of the part file (scored or prefiltered) and the rejects file. Outputs are
written to temporary names and renamed; the `_done` marker is written last, so a rerun skips a finished shard and
redoes an unfinished one whole.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .batching import article_text, encode, pad_batch
from .dataio import Batch, atomic_path, expand_inputs, is_jsonl, iter_file_batches, parquet_schema, write_json_atomic
from .errors import ConfigError, InputError
from .faults import fault_point
from .logs import Progress, bind, get_logger
from .metrics_io import ShardMetrics, merge_metrics, write_prometheus
from .spec import DIMENSIONS, default_spec

MAX_ARTICLE_BYTES = 1_000_000
REQUIRED = ("id", "title", "content")


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
    token_budget: int = 16384  # padded tokens per model call
    max_batch_rows: int = 256
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.shard_count < 1:
            raise ConfigError(f"--shard-count must be >= 1, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"--shard-index {self.shard_index} must be in [0, --shard-count {self.shard_count})")
        if not self.inputs:
            raise ConfigError("--input: give at least one file, directory or glob")
        bad = [c for c in self.keep_columns if c in OUTPUT_COLUMNS or c in ("source_file", "row_number")]
        if bad:
            raise ConfigError(f"--keep-columns: {', '.join(bad)} would collide with an output column")


OUTPUT_COLUMNS = ("id", *DIMENSIONS, "signal_tier", "signal_strength", "model_version")


@dataclass(frozen=True)
class Unit:
    """A slice of the input that belongs to one shard: a Parquet row group, or a whole JSONL file."""

    path: Path
    row_group: int | None
    rows: int | None = None  # known from Parquet metadata; None for JSONL until read


def list_units(files: Sequence[Path]) -> list[Unit]:
    units: list[Unit] = []
    for path in files:
        if is_jsonl(path):
            units.append(Unit(path, None))
            continue
        parquet_schema(path)  # a corrupt file fails here, naming itself, in every shard alike
        try:
            metadata = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        units.extend(Unit(path, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups))
    return units


def shard_units(units: Sequence[Unit], index: int, count: int) -> list[Unit]:
    return list(units[index::count])


def part_name(shard: int) -> str:
    return f"part-{shard:05d}"


@dataclass
class Prepared:
    """One read batch after validation, prefilter and tokenisation (made on the reader thread)."""

    batch: Batch
    reject_reasons: dict[int, str]
    prefilter_reasons: dict[int, str]
    model_rows: list[int]
    tokens: list[np.ndarray]
    labels: np.ndarray | None


def _reject_reasons(batch: Batch) -> dict[int, str]:
    reasons = dict(batch.problems)
    contents = batch.table.column("content").to_pylist()
    titles = batch.table.column("title").to_pylist()
    for i, (title, content) in enumerate(zip(titles, contents)):
        if i in reasons:
            continue
        size = len((content or "").encode("utf-8", "surrogatepass")) + len((title or "").encode("utf-8", "surrogatepass"))
        if size > MAX_ARTICLE_BYTES:
            reasons[i] = f"article is {size} bytes, over the {MAX_ARTICLE_BYTES}-byte limit"
        elif not (content or "").strip() and not (title or "").strip():
            reasons[i] = "title and content are both null or empty"
    return reasons


def prepare(batch: Batch, tokenizer: Any, max_length: int, has_labels: bool, input_format: str = "article") -> Prepared:
    spec = default_spec()
    rejects = _reject_reasons(batch)
    titles, contents = batch.table.column("title").to_pylist(), batch.table.column("content").to_pylist()
    prefiltered: dict[int, str] = {}
    model_rows: list[int] = []
    for i in range(batch.table.num_rows):
        if i in rejects:
            continue
        reason = spec.prefilter_reason(titles[i], contents[i])
        if reason:
            prefiltered[i] = reason
        else:
            model_rows.append(i)
    if input_format == "instruction":  # an instruction run's head reads the prompt (instruction + article)
        from .instruct_train import prompt_tokens

        tokens = prompt_tokens(tokenizer, [titles[i] for i in model_rows], [contents[i] for i in model_rows], max_length)
    else:
        tokens = encode(tokenizer, [article_text(titles[i], contents[i]) for i in model_rows], max_length)
    labels = None
    if has_labels:
        labels = np.stack([np.asarray(batch.table.column(d).to_pylist(), dtype=np.float64) for d in DIMENSIONS], axis=1)
    return Prepared(batch, rejects, prefiltered, model_rows, tokens, labels)


def length_batches(lengths: np.ndarray, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Rows sorted by length, cut so that rows x longest stays within the token budget."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)  # the longest row of this batch comes first
        rows = max(1, min(max_rows, token_budget // width))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def part_schema(keep_columns: Sequence[str]) -> pa.Schema:
    fields = [pa.field("id", pa.string())] + [pa.field(d, pa.float32()) for d in DIMENSIONS] + [
        pa.field("signal_tier", pa.string()), pa.field("signal_strength", pa.float32()),
        pa.field("model_version", pa.string()), pa.field("prefilter_reason", pa.string())]
    return pa.schema(fields + [pa.field(c, pa.string()) for c in keep_columns])


class ShardWriter:
    """The part and rejects files of a shard, streamed into temporary paths (atomic_path renames them)."""

    def __init__(self, part_tmp: Path, rejects_tmp: Path) -> None:
        self.part_tmp, self.rejects_tmp = part_tmp, rejects_tmp
        self._part: Any = None
        self._rejects: Any = None

    def write_part(self, table: pa.Table) -> None:
        if self._part is None:
            self._part = pq.ParquetWriter(self.part_tmp, table.schema)
        self._part.write_table(table)

    def write_rejects(self, table: pa.Table) -> None:
        if self._rejects is None:
            self._rejects = pq.ParquetWriter(self.rejects_tmp, REJECT_SCHEMA)
        self._rejects.write_table(table)

    def close(self, empty_part: pa.Schema | None = None) -> None:
        """Close both files; with `empty_part`, first create whichever was never written (an empty shard)."""
        if empty_part is not None:
            self._part = self._part or pq.ParquetWriter(self.part_tmp, empty_part)
            self._rejects = self._rejects or pq.ParquetWriter(self.rejects_tmp, REJECT_SCHEMA)
        for writer in (self._part, self._rejects):
            if writer is not None:
                writer.close()


REJECT_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("source_file", pa.string()),
                           pa.field("row_number", pa.int64()), pa.field("reason", pa.string())])


def _kept_columns(batch: Batch, rows: Sequence[int], keep: Sequence[str]) -> dict[str, pa.Array]:
    """--keep-columns pass through as strings, so files with different types still make one part file."""
    index = pa.array(rows, type=pa.int64())
    out: dict[str, pa.Array] = {}
    for name in keep:
        if name not in batch.table.column_names:
            out[name] = pa.nulls(len(rows), pa.string())
            continue
        column = batch.table.column(name).take(index)
        try:
            out[name] = column.cast(pa.string())
        except (pa.ArrowException, NotImplementedError):
            out[name] = pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()],
                                 type=pa.string())
    return out


class ShardScorer:
    """Scores one shard's units into the output directory."""

    def __init__(self, config: ScoreConfig, runner: Any, tokenizer: Any, info: dict[str, Any]) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_length = int(info["max_length"])
        self.pad_id = int(info["pad_token_id"]) if info.get("pad_token_id") is not None else tokenizer.pad_token_id
        self.model_version = str(info["model_version"])
        self.input_format = info.get("input_format", "article")
        self.spec = default_spec()
        self.log = get_logger()

    def _read(self, units: Sequence[Unit]) -> Iterator[Batch]:
        for unit in units:
            columns = None
            if not is_jsonl(unit.path):
                names = parquet_schema(unit.path).names
                columns = [c for c in names if c in (*REQUIRED, *DIMENSIONS, *self.config.keep_columns)]
            groups = None if unit.row_group is None else [unit.row_group]
            yield from iter_file_batches(unit.path, self.config.read_rows, columns=columns, lenient=True,
                                         row_groups=groups)

    def _producer(self, units: Sequence[Unit], out: queue.Queue, stop: threading.Event) -> None:
        """Reads, validates and tokenises ahead of the model, on its own thread (fast tokenizers drop the GIL)."""
        try:
            for batch in self._read(units):
                has_labels = all(d in batch.table.column_names for d in DIMENSIONS)
                item = prepare(batch, self.tokenizer, self.max_length, has_labels, self.input_format)
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

    def run(self, units: Sequence[Unit], total_rows: int | None) -> ShardMetrics:
        metrics = ShardMetrics(shard=self.config.shard_index, shard_count=self.config.shard_count,
                               model_version=self.model_version, backend=self.config.backend,
                               provider=getattr(self.runner, "provider", "?"))
        name = part_name(self.config.shard_index)
        items: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()
        producer = threading.Thread(target=self._producer, args=(units, items, stop), daemon=True, name="tokenise")
        producer.start()
        seen_ids: dict[str, str] = {}  # id -> where it was first scored
        try:
            # Both files are renamed into place only if the whole shard succeeds; a failure leaves neither.
            with atomic_path(self.config.out / f"{name}.parquet") as part_tmp, \
                    atomic_path(self.config.out / "rejects" / f"{name}.parquet") as rejects_tmp:
                writer = ShardWriter(part_tmp, rejects_tmp)
                try:
                    with Progress(total=total_rows, what="score", unit="rows") as progress:
                        while True:
                            item = items.get()
                            if item is None:
                                break
                            if isinstance(item, BaseException):
                                raise item
                            self._score_batch(item, writer, metrics, seen_ids)
                            progress.update(item.batch.table.num_rows)
                except BaseException:
                    stop.set()
                    writer.close()
                    raise
                writer.close(part_schema(self.config.keep_columns))
        finally:
            stop.set()
            producer.join(timeout=5)
        metrics.finish()
        return metrics

    @staticmethod
    def _reject_duplicates(item: Prepared, ids_col: list[Any], seen_ids: dict[str, str], metrics: ShardMetrics) -> None:
        """A second row with an id already scored in this shard is rejected, never scored twice."""
        batch = item.batch
        duplicates = set()
        for i, id_ in enumerate(ids_col):
            if i in item.reject_reasons:
                continue
            if id_ in seen_ids:
                # The id goes after the colon, so metrics group all duplicates under one reason.
                item.reject_reasons[i] = f"duplicate id (first seen at {seen_ids[id_]}): {id_!r}"
                duplicates.add(i)
            else:
                seen_ids[id_] = f"{batch.path.name} row {batch.start_row + i}"
        if duplicates:
            metrics.duplicate_ids += len(duplicates)
            pairs = [(r, t) for r, t in zip(item.model_rows, item.tokens) if r not in duplicates]
            item.model_rows, item.tokens = [r for r, _ in pairs], [t for _, t in pairs]

    def _score_batch(self, item: Prepared, writer: ShardWriter, metrics: ShardMetrics, seen_ids: dict[str, str]) -> None:
        batch = item.batch
        n = batch.table.num_rows
        metrics.rows_in += n
        ids_col = batch.table.column("id").to_pylist()
        self._reject_duplicates(item, ids_col, seen_ids, metrics)
        scores = np.zeros((n, len(DIMENSIONS)), dtype=np.float32)
        if item.model_rows:
            lengths = np.array([len(t) for t in item.tokens])
            raw = np.zeros((len(item.tokens), len(DIMENSIONS)), dtype=np.float32)
            for idx in length_batches(lengths, self.config.token_budget, self.config.max_batch_rows):
                ids, mask = pad_batch([item.tokens[i] for i in idx], self.pad_id)
                started = time.perf_counter()
                raw[idx] = self.runner(ids, mask)
                metrics.record_batch(time.perf_counter() - started, int(lengths[idx].sum()), ids.size)
            scores[item.model_rows] = np.clip(raw, 0.0, 10.0)
        keep = [i for i in range(n) if i not in item.reject_reasons]
        prefiltered = np.array([i in item.prefilter_reasons for i in keep], dtype=bool)
        tiers, strength = self.spec.assign_tiers(scores[keep], prefiltered)
        kept_ids = [ids_col[i] for i in keep]
        # Prefiltered rows were never scored: their scores and strength are null, their tier is NOISE.
        score_mask = np.repeat(prefiltered[:, None], len(DIMENSIONS), axis=1)
        columns: dict[str, Any] = {"id": pa.array(kept_ids, type=pa.string())}
        for d, dim in enumerate(DIMENSIONS):
            columns[dim] = pa.array(scores[keep, d], type=pa.float32(), mask=score_mask[:, d])
        columns["signal_tier"] = pa.array(list(tiers), type=pa.string())
        columns["signal_strength"] = pa.array(strength, type=pa.float32(), mask=prefiltered)
        columns["model_version"] = pa.array([self.model_version] * len(keep), type=pa.string())
        columns["prefilter_reason"] = pa.array([item.prefilter_reasons.get(i) for i in keep], type=pa.string())
        columns.update(_kept_columns(batch, keep, self.config.keep_columns))
        writer.write_part(pa.table(columns))
        if item.reject_reasons:
            rows = sorted(item.reject_reasons)
            writer.write_rejects(pa.table({
                "id": pa.array([ids_col[i] if ids_col[i] is None or isinstance(ids_col[i], str) else str(ids_col[i])
                                for i in rows], type=pa.string()),
                "source_file": pa.array([str(batch.path)] * len(rows), type=pa.string()),
                "row_number": pa.array([batch.start_row + i for i in rows], type=pa.int64()),
                "reason": pa.array([item.reject_reasons[i] for i in rows], type=pa.string()),
            }, schema=REJECT_SCHEMA))
            metrics.count_rejects(item.reject_reasons.values())
        metrics.rows_scored += len(keep)
        metrics.rows_prefiltered += int(prefiltered.sum())
        metrics.rows_model += len(item.model_rows)
        model_scores = scores[item.model_rows]
        metrics.add_scores(model_scores, tiers)
        if item.labels is not None and item.model_rows:
            metrics.add_labels(model_scores, item.labels[item.model_rows])


def done_marker(out: Path, shard: int) -> Path:
    return out / "_done" / part_name(shard)


def score(config: ScoreConfig) -> dict[str, Any]:
    """Score this shard (unless already done) and merge every finished shard's metrics into OUT/metrics.json."""
    from .export import verify_model_dir
    from .models import load_tokenizer

    log = get_logger()
    bind(stage="score", shard=config.shard_index)
    out = config.out
    marker = done_marker(out, config.shard_index)
    if marker.exists() and not config.force:
        log.info("shard_skipped", reason="already done (pass --force to redo)", marker=str(marker))
        return merge_metrics(out)
    files = expand_inputs(config.inputs)
    units = shard_units(list_units(files), config.shard_index, config.shard_count)
    model_path = config.model
    if config.backend == "onnx" or (model_path / "model.json").exists():
        info = verify_model_dir(model_path)
    else:  # --backend torch on a training run
        meta = json.loads((model_path / "training_metadata.json").read_text()) if (
            model_path / "training_metadata.json").exists() else None
        if meta is None:
            raise InputError(f"{model_path}: neither an exported model (model.json) nor a training run")
        from .instruct_train import prompt_budget

        info = {"max_length": prompt_budget(meta),
                "model_version": f"run:{model_path.name}", "pad_token_id": None,
                "input_format": "instruction" if meta.get("training_mode") == "instruction" else "article"}
    tokenizer = load_tokenizer(model_path if (model_path / "tokenizer_config.json").exists() else model_path / "model")
    from .runners import make_runner

    runner = make_runner(config.backend, model_path, config.device, config.threads)
    total = _count_rows(units)
    log.info("shard_start", files=len(files), units=len(units), rows=total, backend=config.backend,
             provider=runner.provider, model_version=info["model_version"])
    if marker.exists():
        marker.unlink()  # --force: the shard is redone, so it is not done until the new marker lands
    metrics = ShardScorer(config, runner, tokenizer, info).run(units, total)
    metrics_dir = out / "metrics"
    as_dict = metrics.to_dict()
    write_json_atomic(as_dict, metrics_dir / f"{part_name(config.shard_index)}.json")
    write_prometheus(as_dict, metrics_dir / f"{part_name(config.shard_index)}.prom")
    fault_point(f"before_done:{part_name(config.shard_index)}")
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"rows_in": metrics.rows_in, "finished_at": as_dict["finished_at"]}) + "\n")
    log.info("shard_done", rows_in=metrics.rows_in, scored=metrics.rows_scored, rejected=metrics.rows_rejected,
             prefiltered=metrics.rows_prefiltered, rows_per_second=as_dict["rows_per_second"])
    return merge_metrics(out)


def _count_rows(units: Sequence[Unit]) -> int | None:
    """Rows in this shard, or None when a JSONL file makes it unknown without reading it."""
    if any(unit.rows is None for unit in units):
        return None
    return sum(unit.rows for unit in units)
