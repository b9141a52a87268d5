"""Deterministic train/val/test split, de-duplicated by id and by normalised content before splitting.

Each article's place comes from a hash of the seed and its id, so the split depends only on the rows and the seed:
not on their order, and appending rows moves at most the few old ones at the splits' boundaries (a shuffle of all
rows would move any of them, an earlier test article into train among them). The split files are written first and
split_summary.json last, with their sha256: a rerun cut short leaves files that do not match the summary, which
training refuses rather than train on splits that share articles.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.atomic import read_json, sha256_file, write_json_atomic, write_parquet_atomic
from ..core.errors import ConfigError, InputError
from ..core.logs import get_logger
from ..core.spec import DIMENSIONS
from .readers import label_matrix, read_articles, refuse_out_inside_inputs

SPLITS = ("train", "val", "test")
SUMMARY_FILE = "split_summary.json"
DROPPED_FILE = "_dropped.parquet"  # "_": folder listings pass it over, as other markers
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
# A body this long names its article: a copy under a new headline ("UPDATE 1-...") is the same article. A shorter
# one (a teaser, "Click to read more.") is keyed with its title, or different articles would collide.
BODY_KEY_MIN_CHARS = 200
DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("kept_id", pa.string())])


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.1
    test: float = 0.1
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.val < 1.0:
            raise ConfigError(f"--val must be in (0, 1), got {self.val}: training picks its best epoch and fits "
                              "its calibration on the validation split")
        if not 0.0 <= self.test < 1.0:
            raise ConfigError(f"--test must be in [0, 1), got {self.test}")
        if self.val + self.test >= 1.0:
            raise ConfigError(f"--val + --test must be below 1 (got {self.val + self.test:g}): nothing left to train on")


def _normalised(text: str) -> str:
    """Case, accents, Unicode forms (NFC or NFD, full-width), punctuation and whitespace removed."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _NON_WORD.sub(" ", bare.casefold()).strip()


def content_key(title: str | None, content: str | None) -> str:
    """Hash of the normalised text, so republished copies collide: the body alone where it is long enough to name
    the article, else title and body."""
    body = _normalised(content or "")
    text = body if len(body) >= BODY_KEY_MIN_CHARS else f"{_normalised(title or '')} {body}".strip()
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def deduplicate(table: pa.Table) -> tuple[pa.Table, list[dict[str, str]]]:
    """One row per id and per content key. Rows are taken in (id, content key) order, so which copy survives does
    not depend on the input's order. Returns the kept rows (sorted by id) and a record of each dropped one."""
    ids = [str(i) for i in table.column("id").to_pylist()]
    keys = [content_key(t, c) for t, c in zip(table.column("title").to_pylist(), table.column("content").to_pylist())]
    labels = label_matrix(table)
    kept_by_id: dict[str, int] = {}
    kept_by_key: dict[str, str] = {}
    keep: list[int] = []
    dropped: list[dict[str, str]] = []
    conflicting: set[str] = set()
    for i in sorted(range(table.num_rows), key=lambda i: (ids[i], keys[i])):
        if ids[i] in kept_by_id:
            dropped.append({"id": ids[i], "reason": "duplicate_id", "kept_id": ids[i]})
            if not np.allclose(labels[i], labels[kept_by_id[ids[i]]]):
                conflicting.add(ids[i])
        elif keys[i] in kept_by_key:
            dropped.append({"id": ids[i], "reason": "duplicate_content", "kept_id": kept_by_key[keys[i]]})
        else:
            kept_by_id[ids[i]], kept_by_key[keys[i]] = i, ids[i]
            keep.append(i)
    if conflicting:
        get_logger().warning("conflicting_labels", ids=sorted(conflicting)[:20], count=len(conflicting),
                             reason="an id given twice with other labels: the row with the smaller content key is kept")
    return table.take(pa.array(keep, type=pa.int64())), dropped


def _sizes(n: int, config: SplitConfig) -> tuple[int, int]:
    """Val and test rows: each share of n rounded half up (2.5 rows is 3, whatever the parity)."""
    return int(np.floor(n * config.val + 0.5)), int(np.floor(n * config.test + 0.5))


def split_table(table: pa.Table, config: SplitConfig) -> dict[str, pa.Table]:
    """Rank the rows by a hash of the seed and their id; the first `test` share is test, the next `val` share val,
    the rest train. Each split is sorted by id."""
    table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
    n = table.num_rows
    n_val, n_test = _sizes(n, config)
    n_train = n - n_val - n_test
    if n_train < 1 or n_val < 1 or (config.test > 0 and n_test < 1):
        raise InputError(f"{n} unique rows are too few for a split of val={config.val:g}, test={config.test:g}")
    ids = table.column("id").to_pylist()
    ranks = sorted(range(n), key=lambda i: hashlib.sha256(f"{config.seed}:{ids[i]}".encode()).digest())
    bounds = {"test": ranks[:n_test], "val": ranks[n_test:n_test + n_val], "train": ranks[n_test + n_val:]}
    return {name: table.take(pa.array(sorted(bounds[name]), type=pa.int64())) for name in SPLITS}


def run_split(inputs: list[str], out_dir: str | Path, config: SplitConfig) -> dict[str, Any]:
    log = get_logger()
    out_dir = Path(out_dir)
    refuse_out_inside_inputs(inputs, out_dir)  # a rerun would read the split it wrote as more articles
    table = read_articles(inputs, labels=DIMENSIONS)
    unique, dropped = deduplicate(table)
    counts = {reason: sum(d["reason"] == reason for d in dropped) for reason in ("duplicate_id", "duplicate_content")}
    for reason, count in counts.items():
        if count:
            log.warning("duplicates_dropped", reason=reason, rows=count, listed=str(out_dir / DROPPED_FILE))
    parts = split_table(unique, config)
    # The summary last: until it lands, an earlier summary's sha256 disown the new files (check_split_file).
    for name, part in parts.items():
        write_parquet_atomic(part, out_dir / f"{name}.parquet")
    write_parquet_atomic(pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA), out_dir / DROPPED_FILE)
    summary = {
        "inputs": [str(p) for p in inputs], "rows_in": table.num_rows, "rows_unique": unique.num_rows,
        "dropped": counts, "rows": {name: part.num_rows for name, part in parts.items()},
        "val": config.val, "test": config.test, "seed": config.seed,
        "files": {name: str(out_dir / f"{name}.parquet") for name in SPLITS},
        "sha256": {name: sha256_file(out_dir / f"{name}.parquet") for name in SPLITS},
    }
    write_json_atomic(summary, out_dir / SUMMARY_FILE)
    log.info("split_written", out=str(out_dir), **summary["rows"], dropped=len(dropped))
    return summary


def check_split_file(path: Path) -> None:
    """A split file is the one its folder's split_summary.json describes (a `data split` rerun cut short between its
    files leaves a new train beside the old val and test: the same articles in two splits)."""
    summary_path = path.parent / SUMMARY_FILE
    name = path.name.removesuffix(".parquet")
    if name not in SPLITS or not summary_path.exists():  # another file, or a split made by hand
        return
    expected = read_json(summary_path).get("sha256", {}).get(name)
    if expected is not None and sha256_file(path) != expected:
        raise InputError(f"{path}: not the file {summary_path} describes (a `data split` cut short, or a file "
                         "replaced by hand): run `data split` again, or delete the summary to use files made by hand")
