"""The incremental ledger: which input units earlier batches scored, so a nightly batch scores only what is new.

A unit is known by its path, row group, file size and a fingerprint of the file's content (sha256; reused from the
ledger while the size and modification time are unchanged, recomputed otherwise), so a file rewritten in place
with new content counts as new. The batch's first shard to start reads the ledger when it lists the inputs
(batch_inputs.py), so all shards, and any shard redone later, agree on what is new. The merge adds the batch's
units only once every shard is done: a night that fails leaves the ledger as it was and the next night scores
those units again. The ledger is one JSON file, rewritten whole and atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.atomic import write_json_atomic
from ..core.errors import InputError, unreadable
from ..core.atomic import sha256_file
from .units import Unit

LEDGER_FORMAT = 1


def input_root(inputs: Sequence[str]) -> str:
    """What the ledger is about: the --input specs as absolute, normalised paths, glob characters kept (a ledger
    for another input is refused; `in7`, `in7/` and `$PWD/in7` are one input, from whatever folder)."""
    return "\n".join(sorted(_whole(spec) for spec in inputs))


def _whole(spec: str) -> str:
    return os.path.abspath(os.path.expanduser(spec))


def same_root(recorded: str, root: str) -> bool:
    """Whether two input roots are one. One recorded before roots were absolute (a ledger, a listing or a shard's
    record) holds the specs as typed: read from this folder."""
    def whole(text: str) -> list[str]:
        return sorted(_whole(spec) for spec in text.split("\n"))

    return whole(recorded) == whole(root)


def _key(entry: dict[str, Any]) -> tuple[str, int | None, int, str]:
    return entry["path"], entry["row_group"], entry["size"], entry["fingerprint"]


@dataclass
class Ledger:
    path: Path
    root: str
    entries: list[dict[str, Any]]

    def unit_entries(self, units: Sequence[Unit]) -> list[dict[str, Any]]:
        """Each unit as a ledger entry; a file's fingerprint is reused from the ledger while its size and mtime hold."""
        known = {(e["path"], e["size"], e["mtime_ns"]): e["fingerprint"] for e in self.entries}
        by_file: dict[Path, tuple[int, int, str]] = {}
        out = []
        for unit in units:
            if unit.path not in by_file:
                stat = unit.path.stat()
                path = str(unit.path.resolve())
                fingerprint = known.get((path, stat.st_size, stat.st_mtime_ns)) or sha256_file(unit.path)
                by_file[unit.path] = (stat.st_size, stat.st_mtime_ns, fingerprint)
            size, mtime_ns, fingerprint = by_file[unit.path]
            out.append({"path": str(unit.path.resolve()), "row_group": unit.row_group, "size": size,
                        "mtime_ns": mtime_ns, "fingerprint": fingerprint})
        return out

    def new_units(self, units: Sequence[Unit]) -> tuple[list[Unit], list[dict[str, Any]]]:
        """The units no earlier batch scored, with their entries."""
        done = {_key(e) for e in self.entries}
        pairs = [(u, e) for u, e in zip(units, self.unit_entries(units)) if _key(e) not in done]
        return [u for u, _ in pairs], [e for _, e in pairs]


def read_ledger(path: Path, root: str) -> Ledger:
    """The ledger at `path` (empty when there is none yet); one for another input, or unreadable, is an error."""
    if not path.exists():
        return Ledger(path, root, [])
    try:
        text = path.read_text()
    except OSError as exc:
        raise unreadable(f"--ledger {path}", exc, "not readable") from None
    try:
        raw = json.loads(text)
        entries = list(raw["units"])
        recorded_root = raw["input_root"]
        if not isinstance(recorded_root, str):
            raise ValueError("input_root is not text")
        if not all(isinstance(e["mtime_ns"], int) and len(_key(e)) == 4 for e in entries):
            raise ValueError("an entry without its mtime")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--ledger {path}: not a readable ledger ({exc.__class__.__name__}: {exc})") from None
    if not same_root(recorded_root, root):
        raise InputError(f"--ledger {path}: it records the input {recorded_root!r}, not {root!r}; "
                         "use one ledger per input root")
    return Ledger(path, recorded_root, entries)


def record_units(path: Path, root: str, entries: Sequence[dict[str, Any]]) -> int:
    """Add a finished batch's units to the ledger (idempotent: every shard's merge may call it). Returns how many
    were new to it."""
    ledger = read_ledger(path, root)
    have = {_key(e) for e in ledger.entries}
    added = [e for e in entries if _key(e) not in have]
    if added or not path.exists():
        write_json_atomic({"format": LEDGER_FORMAT, "input_root": ledger.root, "units": [*ledger.entries, *added]},
                          path)
    return len(added)
