"""Input units and shards: sorted files x row groups, and shard i's share `units[i::count]` (datatrove's rule)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..core.spec import DIMENSIONS
from ..datasets.readers import REQUIRED_COLUMNS, check_schema, is_jsonl, parquet_footer, parquet_schema

READ_COLUMNS = (*REQUIRED_COLUMNS, *DIMENSIONS)  # what scoring reads of every file (and --keep-columns)


@dataclass(frozen=True)
class Unit:
    """A slice of the input that belongs to one shard: a Parquet row group, or a whole JSONL file."""

    path: Path
    row_group: int | None
    rows: int | None = None  # known from Parquet metadata; None for JSONL until read


def list_units(files: Sequence[Path], read: Sequence[str] = READ_COLUMNS) -> list[Unit]:
    units: list[Unit] = []
    for path in files:
        if is_jsonl(path):
            units.append(Unit(path, None))
            continue
        # A corrupt file, or one without the article columns, fails here, naming itself, in every shard alike: a
        # file of no row groups is no shard's unit, so no shard would read (and check) it.
        check_schema(path, parquet_schema(path), read=read)
        metadata = parquet_footer(path)[0]
        units.extend(Unit(path, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups))
    return units


def shard_units(units: Sequence[Unit], index: int, count: int) -> list[Unit]:
    return list(units[index::count])


def part_name(shard: int) -> str:
    return f"part-{shard:05d}"


def shard_files(out: Path, shard: int) -> tuple[Path, Path]:
    """A shard's part file and its rejects file."""
    name = f"{part_name(shard)}.parquet"
    return out / name, out / "rejects" / name


def done_marker(out: Path, shard: int) -> Path:
    return out / "_done" / part_name(shard)


def progress_dir(out: Path, shard: int) -> Path:
    """Where a shard keeps its checkpoints while it runs (progress.py)."""
    return out / "_progress" / part_name(shard)


def shard_outputs(out: Path, shard: int) -> tuple[Path, ...]:
    """Every file a shard writes: its part and rejects files, its metrics (JSON and Prometheus), its marker."""
    name = part_name(shard)
    return (*shard_files(out, shard), out / "metrics" / f"{name}.json", out / "metrics" / f"{name}.prom",
            done_marker(out, shard))


def remove_shards_from(out: Path, count: int) -> list[int]:
    """Remove the shards numbered `count` and above (their marker first): what a batch scored again with a smaller
    --shard-count (--force) leaves of the old one, which no shard of the new count would replace. Returns them."""
    found = {int(p.name[5:10]) for folder in (out, out / "rejects", out / "metrics", out / "_done")
             for p in folder.glob("part-[0-9][0-9][0-9][0-9][0-9]*")}
    stale = sorted(shard for shard in found if shard >= count)
    for shard in stale:
        for path in reversed(shard_outputs(out, shard)):
            path.unlink(missing_ok=True)
    return stale


def parquet_rows(path: Path) -> int:
    """Rows in a Parquet file, from its footer: what is on disk, not what a writer meant to write."""
    return pq.ParquetFile(path).metadata.num_rows
