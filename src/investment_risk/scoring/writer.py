"""A shard's part and rejects files: their schemas and a writer that streams both into temporary paths."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.spec import DIMENSIONS
from ..datasets.readers import Batch, as_text

REJECT_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("source_file", pa.string()),
                           pa.field("row_number", pa.int64()), pa.field("reason", pa.string())])


def part_schema(keep_columns: Sequence[str]) -> pa.Schema:
    fields = [pa.field("id", pa.string())] + [pa.field(d, pa.float32()) for d in DIMENSIONS] + [
        pa.field("signal_tier", pa.string()), pa.field("signal_strength", pa.float32()),
        pa.field("model_version", pa.string()), pa.field("prefilter_reason", pa.string())]
    return pa.schema(fields + [pa.field(c, pa.string()) for c in keep_columns])


PROVENANCE_PREFIX = "investment_risk."


def provenance(model: Any, calibrated: bool, shard: int, shard_count: int) -> dict[str, str]:
    """Key-value metadata for every file a shard writes: what made these scores, and when."""
    from .. import __version__
    from ..core.spec import default_spec

    spec = default_spec()
    values = {"model_version": model.model_version, "filter_name": spec.name, "filter_version": spec.version,
              "calibrated": "true" if calibrated else "false", "truncation": model.truncation,
              "package_version": __version__, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "shard": f"{shard}/{shard_count}"}
    return {PROVENANCE_PREFIX + key: value for key, value in values.items()}


class ShardWriter:
    """The part and rejects files of a shard, streamed into temporary paths (atomic_path renames them), each file
    carrying the shard's provenance in its Parquet key-value metadata."""

    def __init__(self, part_tmp: Path, rejects_tmp: Path, metadata: dict[str, str] | None = None) -> None:
        self.part_tmp, self.rejects_tmp = part_tmp, rejects_tmp
        self.metadata = metadata or {}
        self._part: Any = None
        self._rejects: Any = None

    def write_part(self, table: pa.Table) -> None:
        if self._part is None:
            self._part = pq.ParquetWriter(self.part_tmp, table.schema.with_metadata(self.metadata))
        self._part.write_table(table)

    def write_rejects(self, table: pa.Table) -> None:
        if self._rejects is None:
            self._rejects = pq.ParquetWriter(self.rejects_tmp, REJECT_SCHEMA.with_metadata(self.metadata))
        self._rejects.write_table(table)

    def close(self, empty_part: pa.Schema | None = None) -> None:
        """Close both files; with `empty_part`, first create whichever was never written (an empty shard)."""
        if empty_part is not None:
            self._part = self._part or pq.ParquetWriter(self.part_tmp, empty_part.with_metadata(self.metadata))
            self._rejects = self._rejects or pq.ParquetWriter(self.rejects_tmp, REJECT_SCHEMA.with_metadata(self.metadata))
        for writer in (self._part, self._rejects):
            if writer is not None:
                writer.close()


def kept_columns(batch: Batch, rows: Sequence[int], keep: Sequence[str]) -> dict[str, pa.Array]:
    """--keep-columns pass through as strings, so files with different types still make one part file."""
    index = pa.array(rows, type=pa.int64())
    out: dict[str, pa.Array] = {}
    for name in keep:
        if name not in batch.table.column_names:
            out[name] = pa.nulls(len(rows), pa.string())
            continue
        column = batch.table.column(name).take(index)
        try:
            out[name] = as_text(column)
        except (pa.ArrowException, NotImplementedError):  # no cast, or one value refused it: value by value
            out[name] = pa.array([_value_text(v) for v in column.to_pylist()], type=pa.string())
    return out


def _value_text(value: Any) -> str | None:
    """One kept value as text, the same whatever its batch holds: bytes as the cast gives them (invalid UTF-8
    escaped, b"\\xff" as "\\xff"), anything else without a text cast (a struct, a list) as JSON."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return json.dumps(value, default=str)
