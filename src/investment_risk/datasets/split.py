"""Deterministic train/val/test split, de-duplicated by id and by normalised content before splitting."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.atomic import write_json_atomic, write_parquet_atomic
from ..core.errors import ConfigError, InputError
from ..core.logs import get_logger
from ..core.spec import DIMENSIONS
from .readers import read_articles

SPLITS = ("train", "val", "test")
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.1
    test: float = 0.1
    seed: int = 42

    def __post_init__(self) -> None:
        for name, value in (("--val", self.val), ("--test", self.test)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.val + self.test >= 1.0:
            raise ConfigError(f"--val + --test must be below 1 (got {self.val + self.test:g}): nothing left to train on")


def content_key(title: str | None, content: str | None) -> str:
    """Hash of the text with case, punctuation and whitespace removed: republished copies collide."""
    normalised = _NON_WORD.sub(" ", f"{title or ''} {content or ''}".lower()).strip()
    return hashlib.sha1(normalised.encode("utf-8")).hexdigest()


def deduplicate(table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Keep the first row of each id and of each normalised content; count what was dropped."""
    seen_ids: set[str] = set()
    seen_content: set[str] = set()
    keep: list[int] = []
    dropped = {"duplicate_id": 0, "duplicate_content": 0}
    titles, contents = table.column("title").to_pylist(), table.column("content").to_pylist()
    for i, id_ in enumerate(table.column("id").to_pylist()):
        if id_ in seen_ids:
            dropped["duplicate_id"] += 1
            continue
        key = content_key(titles[i], contents[i])
        if key in seen_content:
            dropped["duplicate_content"] += 1
            continue
        seen_ids.add(id_)
        seen_content.add(key)
        keep.append(i)
    return table.take(pa.array(keep, type=pa.int64())), dropped


def split_table(table: pa.Table, config: SplitConfig) -> dict[str, pa.Table]:
    """Shuffle (seeded, over rows sorted by id so input order does not matter) and cut into train/val/test."""
    table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
    n = table.num_rows
    order = np.random.default_rng(config.seed).permutation(n)
    n_val, n_test = int(round(n * config.val)), int(round(n * config.test))
    n_train = n - n_val - n_test
    if n_train < 1 or (config.val > 0 and n_val < 1) or (config.test > 0 and n_test < 1):
        raise InputError(f"{n} unique rows are too few for a split of val={config.val:g}, test={config.test:g}")
    bounds = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: table.take(pa.array(np.sort(idx))) for name, idx in bounds.items()}


def run_split(inputs: list[str], out_dir: str | Path, config: SplitConfig) -> dict[str, Any]:
    log = get_logger()
    table = read_articles(inputs, labels=DIMENSIONS)
    # Sorted by id first, so which copy of a duplicate survives does not depend on input order.
    unique, dropped = deduplicate(table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")])))
    for reason, count in dropped.items():
        if count:
            log.warning("duplicates_dropped", reason=reason, rows=count)
    parts = split_table(unique, config)
    out_dir = Path(out_dir)
    for name, part in parts.items():
        write_parquet_atomic(part, out_dir / f"{name}.parquet")
    summary = {
        "inputs": [str(p) for p in inputs], "rows_in": table.num_rows, "rows_unique": unique.num_rows,
        "dropped": dropped, "rows": {name: part.num_rows for name, part in parts.items()},
        "val": config.val, "test": config.test, "seed": config.seed,
        "files": {name: str(out_dir / f"{name}.parquet") for name in SPLITS},
    }
    write_json_atomic(summary, out_dir / "split_summary.json")
    log.info("split_written", out=str(out_dir), **summary["rows"], dropped=sum(dropped.values()))
    return summary
