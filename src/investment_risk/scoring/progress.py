"""A shard's checkpoints, so that a shard stopped part-way (a pod preempted, evicted, OOM-killed) resumes where
it stopped instead of scoring its share again from the first row.

    OUT/_progress/part-00003/.lock                  held by the scorer working on the shard (a twin runs without)
    OUT/_progress/part-00003/seg-00000.parquet      the scored rows of one stretch of the shard's read batches,
                             seg-00000.rejects.parquet   its rejects, and the ids it scored first (for duplicates)
                             seg-00000.ids.parquet
    OUT/_progress/part-00003/state.json             written last at each checkpoint: the segments, where reading
                                                    stopped (unit, read batch), the metrics so far, what made them

A checkpoint is taken at a read batch's end once `--checkpoint-seconds` passed since the last one, and when SIGTERM
comes. A rerun of the same work (same model, engine, units, settings: the fingerprint) reads on from there; other
work, or a damaged checkpoint, starts the shard afresh. At the end the part and rejects files are the segments
joined in order, as one unbroken run writes them; the folder goes once the `_done` marker is in place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import atomic_path, hold_named_lock, read_json, write_json_atomic, write_parquet_atomic
from ..core.errors import InputError
from ..core.faults import fault_point
from ..core.logs import get_logger
from .units import progress_dir
from .writer import REJECT_SCHEMA

STATE_FILE = "state.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Position:
    """Where reading stands: the unit (index in the shard's units) and how many of its read batches are done."""

    unit: int = 0
    batch: int = 0


class SeenIds:
    """The ids a shard scored, each with where it first was. A shard holds one entry per row it scored, so each is
    kept small: the place is the file's index and the row packed in one int, and those added since the last
    checkpoint are the dict's newest entries (nothing is ever removed), not a second list."""

    _ROW_BITS = 40  # rows per file below 2**40; the file's index above them

    def __init__(self) -> None:
        self._places: dict[str, int] = {}
        self._files: list[str] = []
        self._file_index: dict[str, int] = {}
        self._committed = 0  # the first this many entries are in a checkpoint

    def __contains__(self, id_: object) -> bool:
        return id_ in self._places

    def add(self, id_: str, file: str, row: int) -> None:
        if not 0 <= row < 1 << self._ROW_BITS:
            raise ValueError(f"{file}: row {row} is beyond the {self._ROW_BITS}-bit rows a shard's ids keep")
        index = self._file_index.setdefault(file, len(self._files))
        if index == len(self._files):
            self._files.append(file)
        self._places[id_] = index << self._ROW_BITS | row

    def where(self, id_: str) -> str:
        file, row = self._unpack(self._places[id_])
        return f"{file} row {row}"

    def _unpack(self, place: int) -> tuple[str, int]:
        return self._files[place >> self._ROW_BITS], place & ((1 << self._ROW_BITS) - 1)

    def take_fresh(self) -> pa.Table:
        """The entries since the last checkpoint, as its ids file holds them; they count as committed from now."""
        fresh = list(islice(self._places.items(), self._committed, None))
        self._committed = len(self._places)
        places = [self._unpack(place) for _, place in fresh]
        return pa.table({"id": pa.array([id_ for id_, _ in fresh], type=pa.string()),
                         "file": pa.array([file for file, _ in places], type=pa.string()),
                         "row": pa.array([row for _, row in places], type=pa.int64())})

    def load(self, table: pa.Table) -> None:
        """Entries from a checkpoint's ids file: committed already."""
        for id_, file, row in zip(*(table.column(c).to_pylist() for c in ("id", "file", "row"))):
            self.add(id_, file, row)
        self._committed = len(self._places)


@dataclass
class Resumed:
    """What the last checkpoint holds: where to read on from, the segments so far, the metrics and ids so far."""

    position: Position
    segments: list[int]
    metrics: dict[str, Any]
    seen_ids: SeenIds
    columns_seen: list[str] = field(default_factory=list)


class ShardProgress:
    """The checkpoints of one shard, held under the folder's lock for as long as the scorer runs."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], lock_fd: int) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self._lock_fd = lock_fd
        self.segments: list[int] = []  # committed, in order

    @classmethod
    def claim(cls, out: Path, shard: int, fingerprint: dict[str, Any]) -> ShardProgress | None:
        """The shard's checkpoints, or None (the shard is scored whole, as without them) when another scorer holds
        them (a twin: a replaced pod still running) or the filesystem has no locks to keep two apart."""
        folder = progress_dir(out, shard)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = hold_named_lock(folder / LOCK_FILE)  # a finishing scorer removes the folder, its lock file too
        except BlockingIOError:
            get_logger().warning("shard_checkpoints_off", reason="another scorer holds this shard's checkpoints; "
                                 "scoring it whole without them")
            return None
        if fd is None:  # nothing can have been written here without a lock: leave no trace
            (folder / LOCK_FILE).unlink(missing_ok=True)
            _remove_empty(folder, folder.parent)
            get_logger().info("shard_checkpoints_off", reason="the output's filesystem has no file locks")
            return None
        return cls(folder, fingerprint, fd)

    def segment_files(self, segment: int) -> tuple[Path, Path]:
        stem = self.folder / f"seg-{segment:05d}"
        return stem.with_suffix(".parquet"), stem.with_suffix(".rejects.parquet")

    def _ids_file(self, segment: int) -> Path:
        return self.folder / f"seg-{segment:05d}.ids.parquet"

    def resume(self) -> Resumed | None:
        """The last checkpoint, when it is of this same work; otherwise (none, other work, damaged) the folder is
        emptied and the shard starts from its first row."""
        path = self.folder / STATE_FILE
        if not path.exists():
            self.clear()
            return None
        try:
            state = read_json(path)
            if state.get("fingerprint") != self.fingerprint:
                raise InputError("made by other work (model, engine, inputs or settings differ)")
            segments = [int(s) for s in state["segments"]]
            seen = SeenIds()
            for segment in segments:
                for file in (*self.segment_files(segment), self._ids_file(segment)):
                    pq.ParquetFile(file).metadata  # each is whole (a footer), or the checkpoint is not used
                seen.load(pq.read_table(self._ids_file(segment)))
            resumed = Resumed(Position(*state["position"]), segments, state["metrics"], seen,
                              state.get("columns_seen", []))
        except (InputError, OSError, pa.ArrowException, KeyError, TypeError, ValueError, AttributeError) as exc:
            get_logger().warning("shard_checkpoint_unused", path=str(path), reason=str(exc),
                                 action="scoring the shard from its first row")
            self.clear()
            return None
        self._remove_uncommitted(segments)
        self.segments = segments
        get_logger().info("shard_resumed", unit=resumed.position.unit, batch=resumed.position.batch,
                          segments=len(segments), rows_done=resumed.metrics.get("rows_model", 0))
        return resumed

    def commit(self, segment: int, position: Position, metrics: dict[str, Any], seen_ids: SeenIds,
               columns_seen: Sequence[str]) -> None:
        """Add the segment just written to the checkpoint: its new ids, then the state naming it (the commit)."""
        write_parquet_atomic(seen_ids.take_fresh(), self._ids_file(segment))
        self.segments.append(segment)
        write_json_atomic({"fingerprint": self.fingerprint, "position": [position.unit, position.batch],
                           "segments": self.segments, "metrics": metrics, "columns_seen": sorted(columns_seen)},
                          self.folder / STATE_FILE)
        get_logger().info("shard_checkpoint", unit=position.unit, batch=position.batch, segments=len(self.segments))
        fault_point(f"after_checkpoint:{self.folder.name}")

    def join(self, part: Path, rejects: Path, part_schema: pa.Schema, metadata: dict[str, str]) -> None:
        """The shard's part and rejects files: the committed segments' rows in order, each renamed into place whole."""
        for dest, index, schema in ((rejects, 1, REJECT_SCHEMA), (part, 0, part_schema)):  # rejects first, as ever
            with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema.with_metadata(metadata)) as writer:
                for segment in self.segments:
                    source = pq.ParquetFile(self.segment_files(segment)[index])
                    for group in range(source.num_row_groups):
                        writer.write_table(source.read_row_group(group).cast(schema))

    def clear(self) -> None:
        """Everything in the folder but its lock."""
        for path in self.folder.iterdir():
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def _remove_uncommitted(self, segments: Sequence[int]) -> None:
        keep = {p.name for s in segments for p in (*self.segment_files(s), self._ids_file(s))} | {STATE_FILE, LOCK_FILE}
        for path in self.folder.iterdir():
            if path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)

    def release(self, remove: bool) -> None:
        """Let go of the lock; `remove`: the shard is done (its marker in place), the folder goes first."""
        if remove:
            _remove_and_let_go(self.folder, self._lock_fd)
        else:
            os.close(self._lock_fd)


def _remove_and_let_go(folder: Path, fd: int | None) -> None:
    """Remove a shard's checkpoints, their lock file with them, before letting go of the lock: the name then only
    ever leads to a held lock."""
    shutil.rmtree(folder, ignore_errors=True)
    _remove_empty(folder.parent)
    if fd is not None:
        os.close(fd)


def _remove_empty(*folders: Path) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another shard's checkpoints), or gone
            pass


def discard_stale_checkpoints(out: Path, shard_count: int) -> None:
    """Remove the checkpoints of shards numbered `shard_count` and above: a batch begun with more shards and
    redone with fewer leaves them, and no shard of this count would resume or remove them."""
    for folder in sorted((out / "_progress").glob("part-[0-9][0-9][0-9][0-9][0-9]")):
        if int(folder.name[5:]) >= shard_count:
            discard_checkpoints(out, int(folder.name[5:]))


def discard_checkpoints(out: Path, shard: int) -> None:
    """Remove a shard's checkpoints (a done shard's leftovers, or a --force redo), unless a live scorer holds them."""
    folder = progress_dir(out, shard)
    if not folder.is_dir():
        return
    try:
        fd = hold_named_lock(folder / LOCK_FILE)
    except BlockingIOError:
        return
    _remove_and_let_go(folder, fd)
