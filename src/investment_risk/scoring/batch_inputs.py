"""A batch's inputs, listed once: the first of its shards to start writes OUT/_inputs.json, and every shard, rerun
and `--force` redo scores its share of that list.

Shards that each listed the inputs themselves disagreed when a file arrived between their starts (an Indexed Job
whose pods start minutes apart over a live folder): one shard's share became another's, rows were scored twice and
others never, and the merge called the batch complete. With a ledger, a shard redone after the merge had recorded
the batch found nothing new against it and wrote an empty part. The list holds each file's size and modification
time, so a file changed after the listing stops its shard rather than being scored as another file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.atomic import read_json, remove_abandoned, write_json_atomic
from ..core.errors import InputError, unreadable
from ..core.logs import get_logger
from ..datasets.readers import expand_inputs, refuse_out_inside_inputs
from .ledger import input_root, read_ledger, same_root
from .units import READ_COLUMNS, Unit, list_units

INPUTS_FILE = "_inputs.json"
INPUTS_FORMAT = 1


def shard_inputs(out: Path, inputs: Sequence[str], ledger: Path | None, shard_index: int, shard_count: int,
                 read: Sequence[str] = READ_COLUMNS) -> tuple[list[Unit], list[dict[str, Any]] | None]:
    """This shard's units (`units[I::N]` of the batch's listing) and, with a ledger, their ledger entries: of the
    units no earlier batch scored when the batch was listed. Each unit's file must be as the listing saw it.
    `read`: the columns scoring reads (its kept ones too), checked in every Parquet file as the batch is listed."""
    path = out / INPUTS_FILE
    remove_abandoned(path)  # a listing whose writer was killed before it landed
    if not path.exists():  # a twin may have listed first
        write_json_atomic(_listing(inputs, ledger, out, read), path, first_wins=True)
    recorded = _same_batch(out, inputs, ledger)
    get_logger().info("batch_inputs", listing=str(path), listed_at=recorded["listed_at"],
                      units=len(recorded["units"]), known_units=recorded["known_units"])
    mine = recorded["units"][shard_index::shard_count]
    for record in {r["path"]: r for r in mine}.values():  # a file's row groups share its size and mtime
        _check_unchanged(record, recorded["listed_at"])
    units = [Unit(Path(r["path"]), r["row_group"], r["rows"]) for r in mine]
    return units, ([r["ledger_entry"] for r in mine] if ledger else None)


def check_same_batch(out: Path, inputs: Sequence[str], ledger: Path | None) -> None:
    """A batch already listed in `out` is of these inputs and this ledger. Checked before a finished shard is
    skipped: otherwise a run of other inputs into a finished --out ended "already done", exit 0, its rows never
    scored."""
    if (out / INPUTS_FILE).exists():
        _same_batch(out, inputs, ledger)


def _same_batch(out: Path, inputs: Sequence[str], ledger: Path | None) -> dict[str, Any]:
    path = out / INPUTS_FILE
    recorded = read_json(path)
    if recorded.get("format") != INPUTS_FORMAT or not isinstance(recorded.get("units"), list):
        raise InputError(f"{path}: not a batch listing this version wrote (delete it to list the inputs again)")
    root = input_root(inputs)
    if not same_root(recorded["input_root"], root):
        theirs, ours = (", ".join(text.split("\n")) for text in (recorded["input_root"], root))
        raise InputError(f"--out {out} holds a batch of the inputs {theirs}, not {ours}: score into another --out")
    if not _same_ledger(recorded["ledger"], ledger):
        raise InputError(f"--out {out} holds a batch listed with --ledger {recorded['ledger']}, not {ledger}: "
                         "score into another --out")
    return recorded


def _same_ledger(recorded: str | None, ledger: Path | None) -> bool:
    if recorded is None or ledger is None:
        return recorded is None and ledger is None
    return Path(recorded).absolute() == ledger.absolute()


def _check_apart(inputs: Sequence[str], files: Sequence[Path], out: Path) -> None:
    """Inputs and outputs kept apart: a scored part file read back as input is scored (or rejected) as articles.
    An --out inside an input folder is refused before its first batch; a scored file matched some other way (a
    glob, an earlier night's output beside the inputs) when it is listed."""
    refuse_out_inside_inputs(inputs, out)
    for path in files:
        if _SCORED_NAME.fullmatch(path.name) and (owner := _scoring_output(path.parent)):
            raise InputError(f"{path}: a scored file of the scoring output {owner}, not articles: leave that folder "
                             "out of --input")


_SCORED_NAME = re.compile(r"part-[0-9]{5}.*\.parquet")


def _scoring_output(folder: Path) -> Path | None:
    """The scoring output a part file's folder belongs to (OUT, or OUT/rejects), if it is one."""
    for candidate in (folder, folder.parent) if folder.name == "rejects" else (folder,):
        if (candidate / INPUTS_FILE).exists() or (candidate / "_done").is_dir():
            return candidate
    return None


def _check_unchanged(record: dict[str, Any], listed_at: str) -> None:
    path = Path(record["path"])
    try:
        stat = path.stat()
    except OSError as exc:
        raise unreadable(path, exc, f"listed for this batch at {listed_at}, now unreadable: score into another "
                         "--out") from None
    if (stat.st_size, stat.st_mtime_ns) != (record["size"], record["mtime_ns"]):
        raise InputError(f"{path}: changed since this batch listed it at {listed_at}: score into another --out "
                         "(a batch scores its files as they were listed)")


def _listing(inputs: Sequence[str], ledger: Path | None, out: Path, read: Sequence[str]) -> dict[str, Any]:
    import datetime as dt

    files = expand_inputs(inputs)
    _check_apart(inputs, files, out)
    units = list_units(files, read)
    entries, known = None, 0
    if ledger is not None:
        book = read_ledger(ledger, input_root(inputs))
        units, entries = book.new_units(units)
        known = len(book.entries)
    stats = {unit.path: unit.path.stat() for unit in units}  # once a file, not once a row group
    records = []
    for i, unit in enumerate(units):
        stat = stats[unit.path]
        # whole: a shard run from another folder (its --input absolute) reads the same files
        record = {"path": str(unit.path.absolute()), "row_group": unit.row_group, "rows": unit.rows,
                  "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if entries is not None:
            record["ledger_entry"] = entries[i]
        records.append(record)
    return {"format": INPUTS_FORMAT, "input_root": input_root(inputs),
            "ledger": str(ledger.absolute()) if ledger else None,
            "known_units": known, "listed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "units": records}
