"""Reading articles in bounded batches (Parquet files, directories, globs; JSONL) and validating them.

Readers stream: a Parquet file is read a record batch at a time, JSONL a bounded number of lines at a time, so
memory stays flat however large the input. Problems are reported with the file and row (0-based row index for
Parquet, 1-based line number for JSONL). Integer ids are read as their decimal strings; blank JSONL lines are
skipped and counted, as other JSON Lines readers do.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.errors import InputError, unreadable
from ..core.logs import get_logger
from ..core.spec import DIMENSIONS, default_spec

REQUIRED_COLUMNS = ("id", "title", "content")
OPTIONAL_STRING_COLUMNS = ("source", "url", "published_at", "language", "reasoning")
# Of those, the ones no stage reads as text (kept as they are): any value is fine, a JSONL one kept as its text.
PASS_THROUGH_COLUMNS = ("source", "url", "published_at", "language")
# The one a stage reads as text (instruction training): checked by the readers of labelled data, never by scoring
LABEL_TEXT_COLUMNS = tuple(c for c in OPTIONAL_STRING_COLUMNS if c not in PASS_THROUGH_COLUMNS)
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")  # not read: a folder's batch.jsonl.gz is refused
DEFAULT_BATCH_ROWS = 1024


@dataclass
class Batch:
    """A bounded slice of one input file. `problems` maps a row offset within the batch to why it is unusable."""

    path: Path
    start_row: int
    table: pa.Table
    problems: dict[int, str] = field(default_factory=dict)
    unreadable_rows: int = 0  # JSONL lines that could not be parsed at all (lenient reading)
    line_numbers: list[int] | None = None  # JSONL: each row's 1-based line (blank lines are not rows)
    blank_lines: int = 0  # JSONL: blank or whitespace-only lines skipped in this batch's span

    def row_number(self, offset: int) -> int:
        """0-based: the Parquet row, or the JSONL line index (line number - 1)."""
        if self.line_numbers is not None:
            return self.line_numbers[offset] - 1
        return self.start_row + offset

    def where(self, offset: int) -> str:
        if self.line_numbers is not None:
            return f"{self.path} line {self.line_numbers[offset]}"
        return f"{self.path} row {self.start_row + offset}"


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _supported(path: Path, named: bool = True) -> bool:
    """A Parquet or JSONL file; a `.json` one only where it is `named` (a path, or a glob ending in .json): in a
    folder, .json files are metadata (a split's split_summary.json, a model's model.json), not JSON Lines."""
    suffix = path.suffix.lower()
    return suffix in PARQUET_SUFFIXES + JSONL_SUFFIXES and (named or suffix != ".json")


def _screen(candidates: Sequence[Path], where: str, named: bool) -> list[Path]:
    """The article files among a folder's or a glob's `candidates`. A compressed article file is refused (exit 2:
    skipped, its rows would be lost without a word); other files are skipped with a warning naming them."""
    keep, skipped, articles_json = [], [], []
    for path in candidates:
        if _supported(path, named):
            keep.append(path)
        elif path.suffix.lower() in COMPRESSED_SUFFIXES and _supported(Path(path.stem)):
            raise InputError(f"{path}: a compressed article file is not read; decompress it")
        elif path.suffix.lower() != ".json":  # a folder's .json files are metadata (split_summary.json, model.json)
            skipped.append(path)
        elif _holds_articles(path):  # JSON lines of articles named .json: metadata by name, but say so
            articles_json.append(path)
    if skipped:
        get_logger().warning("inputs_skipped", input=where, files=[str(p) for p in skipped[:10]], count=len(skipped),
                             reason="not a Parquet or JSONL file")
    if articles_json:
        get_logger().warning("inputs_skipped", input=where, files=[str(p) for p in articles_json[:10]],
                             count=len(articles_json), reason="JSON lines of articles named .json, which a folder "
                             "or glob reads as metadata: rename them .jsonl, or name each file")
    return keep


def _holds_articles(path: Path) -> bool:
    """Whether a .json file's first line is an article object (id, title, content): JSON lines, not metadata."""
    try:
        with path.open("rb") as handle:
            first = json.loads(handle.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and set(REQUIRED_COLUMNS) <= set(first)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, directories (their Parquet/JSONL files, recursively) and globs -> a sorted, de-duplicated file list."""
    found: list[Path] = []
    for raw in inputs:
        text = str(raw)
        if not text.strip():  # Path("") is the current directory: an unset variable would score all of it
            raise InputError("an empty path was given as input (name a file, directory or glob)")
        if _has_glob(text):
            if matches := sorted(_screen(_glob_files(text), text, named=text.lower().endswith(".json"))):
                found.extend(matches)
                continue
            if not os.path.lexists(text):  # else the name itself, as a shell passes a pattern matching nothing
                raise InputError(f"{text}: no Parquet or JSONL file matches this pattern")
        if Path(text).is_dir():
            matches = sorted(_regular_files(_screen(_directory_files(Path(text)), text, named=False)))
            if not matches:
                raise InputError(f"{text}: directory holds no .parquet or .jsonl file")
            found.extend(matches)
        elif Path(text).is_file():
            if not _supported(Path(text)):
                raise InputError(f"{text}: unsupported file type (expected .parquet or .jsonl)")
            found.append(Path(text))
        elif os.path.lexists(text):
            _refuse_irregular(Path(text))
        else:
            raise InputError(f"{text}: no such file or directory")
    for path in found:
        try:
            str(path).encode()
        except UnicodeEncodeError:  # Arrow's file system takes UTF-8 names only
            raise InputError(f"{str(path)!r}: the file name is not valid UTF-8; rename it") from None
    # One file named twice (a folder and a path inside it, a relative and an absolute path) is listed once.
    return sorted({path.resolve(): path for path in reversed(found)}.values())


def refuse_out_inside_inputs(inputs: Sequence[str | Path], out: Path) -> None:
    """An output folder inside an input folder: the next run would read what this one writes as input."""
    target = out.resolve()
    for text in inputs:
        folder = Path(text)
        if folder.is_dir() and target.is_relative_to(folder.resolve()):
            raise InputError(f"--out {out} is inside the input folder {text}: the next run would read its files "
                             "as input; put --out outside the inputs")


def _refuse(exc: OSError) -> None:
    raise unreadable(exc.filename, exc, "cannot list this directory")


def _regular_files(paths: list[Path]) -> list[Path]:
    """The files among `paths` (folders are passed over); a broken link or a pipe among them is an error, not a
    silent gap in the batch."""
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif not path.is_dir():
            _refuse_irregular(path)
    return files


def _refuse_irregular(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: a broken symbolic link (its target {os.readlink(path)} is gone)")
    raise InputError(f"{path}: not a regular file (a pipe or a device: write the input to a file first)")


def _glob_files(pattern: str) -> list[Path]:
    """The files a glob matches, by the shell's rules as `glob.glob(recursive=True)` applies them (`**` spans
    folders; a name starting with `.` matches only a pattern that starts with `.`). Unlike glob.glob, a folder the
    pattern needs that cannot be listed is an error: skipping it would drop its rows without a word."""
    if pattern.endswith(("/", os.sep)):  # matches folders only, as for glob.glob: never a file
        return []
    parts = Path(pattern).parts
    literal = next(i for i, part in enumerate(parts) if _has_glob(part))
    found: list[Path] = []
    _glob_walk(Path(*parts[:literal]) if literal else Path("."), parts[literal:], found, set())
    return _regular_files(found)


def _glob_walk(folder: Path, parts: tuple[str, ...], found: list[Path], seen: set[tuple[str, tuple]]) -> None:
    key = (os.path.realpath(folder), parts)
    if key in seen:  # a symlink loop under `**`, or a folder reached twice
        return
    seen.add(key)
    head, rest = parts[0], parts[1:]
    if not _has_glob(head):
        try:
            os.lstat(folder / head)
            names = [head]
        except (FileNotFoundError, NotADirectoryError):
            names = []
        except OSError as exc:  # a folder that cannot be searched hides what it holds
            raise InputError(f"{folder}: cannot search this directory ({exc.strerror})") from None
    else:
        try:
            names = sorted(entry.name for entry in os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):  # nothing there to match, as for glob.glob
            return
        except OSError as exc:
            _refuse(exc)
        names = [n for n in names if not n.startswith(".") or head.startswith(".")]
    if head == "**":  # zero folders, then one more folder and `**` again
        if rest:
            _glob_walk(folder, rest, found, seen)
        else:
            found += [folder / name for name in names]
        for name in names:
            if (folder / name).is_dir():
                _glob_walk(folder / name, parts, found, seen)
        return
    for name in names:
        if _has_glob(head) and not fnmatch.fnmatchcase(name, head):
            continue
        if rest:
            _glob_walk(folder / name, rest, found, seen)
        else:
            found.append(folder / name)


def _directory_files(root: Path) -> list[Path]:
    """The files under `root`, recursively, skipping `_`/`.` names (markers, temporary files). A
    subdirectory that cannot be listed is an error: skipping it would drop its rows without a word."""

    found, seen = [], set()
    for folder, dirs, files in os.walk(root, onerror=_refuse, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        found += [Path(folder) / f for f in files if not f.startswith(("_", "."))]
    return sorted(found)


def _string_type(t: pa.DataType) -> bool:
    """Text, however stored: plain, large, a view, or dictionary-encoded (a pandas category)."""
    if pa.types.is_dictionary(t):
        return _string_type(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _castable_to_string(t: pa.DataType) -> bool:
    try:
        pa.array([], type=t).cast(pa.string())
        return True
    except (pa.ArrowException, NotImplementedError):
        return False


def _numeric_type(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)


def check_schema(path: Path, schema: pa.Schema, labels: Sequence[str] = (), read: Sequence[str] | None = None) -> None:
    """Whole-file problems: a required column missing or of the wrong type (integer ids are fine: they cast). Of
    the other columns only those the caller reads must appear once: `read`, as scoring gives them (the article's,
    the labels, the kept ones, any type: none is read as text), or None for every column some stage reads, and then
    `reasoning` must have a text form too."""
    names = set(schema.names)
    known = {*REQUIRED_COLUMNS, *OPTIONAL_STRING_COLUMNS, *labels, *DIMENSIONS}
    text = LABEL_TEXT_COLUMNS if read is None else ()
    read = {*REQUIRED_COLUMNS, *labels, *(known if read is None else read)}  # a doubled unread column is no matter
    if twice := sorted({n for n in schema.names if n in read and schema.names.count(n) > 1}):
        raise InputError(f"{path}: column(s) {', '.join(twice)} appear more than once")
    missing = [c for c in (*REQUIRED_COLUMNS, *labels) if c not in names]
    if missing:
        raise InputError(f"{path}: missing required column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")
    for name in REQUIRED_COLUMNS:
        t = schema.field(name).type
        if _string_type(t) or pa.types.is_null(t) or (name == "id" and pa.types.is_integer(t)):
            continue
        expected = "string or integer" if name == "id" else "string"
        raise InputError(f"{path}: column '{name}' has type {t}, expected {expected}")
    for name in text:
        if name in names and not _castable_to_string(schema.field(name).type):
            raise InputError(f"{path}: column '{name}' has type {schema.field(name).type}, which has no text form")
    for name in labels:
        t = schema.field(name).type
        if not _numeric_type(t) and not pa.types.is_null(t):
            raise InputError(f"{path}: label column '{name}' has type {t}, expected a number")


def as_text(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A column as strings; a timestamp in ISO 8601, as JSON writes it (Arrow's cast puts a space before the time)."""
    text = column.cast(pa.string())
    if pa.types.is_timestamp(column.type):
        text = pc.replace_substring(text, " ", "T", max_replacements=1)
    return text


def as_plain_strings(table: pa.Table) -> pa.Table:
    """An integer `id` column as its decimal strings (lossless) and dictionary-encoded text as plain strings, so
    every later step sees string id, title and content."""
    for name in REQUIRED_COLUMNS:
        if name in table.column_names:
            t = table.schema.field(name).type
            if (name == "id" and pa.types.is_integer(t)) or pa.types.is_dictionary(t):
                table = table.set_column(table.column_names.index(name), name, table.column(name).cast(pa.string()))
    return table


def invalid_text_rows(table: pa.Table) -> tuple[pa.Table, dict[int, str]]:
    """Rows whose text columns are not valid UTF-8 (Parquet does not check what a writer stored as a string): each
    a row problem naming the column and byte, its value nulled so that the rest of the batch can be read. Every
    text column read counts, a kept one too: written on as it came, it made a part file no reader could open."""
    problems: dict[int, str] = {}
    for name in table.column_names:
        if not _string_type(table.schema.field(name).type):
            continue
        column = table.column(name)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        values = column.cast(pa.binary()).to_pylist() if not pa.types.is_dictionary(column.type) else \
            column.combine_chunks().dictionary_decode().cast(pa.binary()).to_pylist()
        clean = []
        for i, raw in enumerate(values):
            try:
                clean.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problems.setdefault(i, f"column '{name}' is not valid UTF-8 ({exc.reason} at byte {exc.start})")
                clean.append(None)
        table = table.set_column(table.column_names.index(name), name, pa.array(clean, pa.string()))
    return table, problems


def row_problems(table: pa.Table, labels: Sequence[str] = ()) -> dict[int, str]:
    """Per-row problems: null/empty id, missing title and content, labels null, NaN or outside the score range."""
    spec = default_spec()
    problems: dict[int, str] = {}
    ids = table.column("id").to_pylist()
    titles = table.column("title").to_pylist()
    contents = table.column("content").to_pylist()
    for i, (id_, title, content) in enumerate(zip(ids, titles, contents)):
        if id_ is None or not str(id_).strip():
            problems[i] = "id is null or empty"
        elif not (title or "").strip() and not (content or "").strip():
            problems[i] = "title and content are both null or empty"
    for name in labels:
        for i, value in enumerate(table.column(name).to_pylist()):
            if i in problems:
                continue
            if value is None or (isinstance(value, float) and math.isnan(value)):
                problems[i] = f"label '{name}' is null or NaN"
            elif not spec.in_range(float(value)):
                low, high = spec.score_range
                problems[i] = f"label '{name}' = {value} is outside [{low:g}, {high:g}]"
    return problems


def _iter_parquet(path: Path, batch_rows: int, columns: Sequence[str] | None,
                  row_groups: Sequence[int] | None = None) -> Iterator[Batch]:
    metadata, starts = parquet_footer(path)
    try:
        parquet = pq.ParquetFile(path, metadata=metadata)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, exc, "not a readable Parquet file") from None
    start = starts[min(row_groups)] if row_groups else 0
    try:
        for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns, row_groups=row_groups):
            table, problems = invalid_text_rows(pa.Table.from_batches([record_batch]))
            yield Batch(path, start, as_plain_strings(table), problems)
            start += record_batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, exc, f"corrupt Parquet data after row {start}") from None


def parquet_schema(path: Path) -> pa.Schema:
    return parquet_footer(path)[0].schema.to_arrow_schema()


def parquet_footer(path: Path) -> tuple[pq.FileMetaData, tuple[int, ...]]:
    """A Parquet file's footer and each row group's first row, parsed once per version of the file (its size and
    mtime): a shard reads a file of many row groups a unit at a time, and parsing the whole footer for each unit
    made a file's time grow with the square of its row groups (3,000 of them: 210 s, against 3.8 s in one)."""
    stat = path.stat()
    if stat.st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not a Parquet file")
    return _footer(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _footer(path: Path, size: int, mtime_ns: int) -> tuple[pq.FileMetaData, tuple[int, ...]]:
    try:
        metadata = pq.read_metadata(path)
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, exc, "not a readable Parquet file") from None
    rows = (metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return metadata, tuple(itertools.accumulate(rows, initial=0))


_JSON_KINDS = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
               dict: "an object", type(None): "null"}
# Field metadata of a JSONL label column (scoring's optional labels) with a value that is not a number: each value
# is its JSON text, so a number among them is still a number and only the bad value is unusable, not its batch.
JSON_TEXT = {b"investment_risk.json_text": b"1"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _jsonl_table(path: Path, start: int, rows: list[dict[str, Any]], labels: Sequence[str],
                 read: Sequence[str] | None = None) -> Batch:
    """Rows -> a typed table. A value of the wrong type becomes null and a row problem (JSONL has no schema);
    `reasoning` must be text only for a caller that reads every column (`read` None, as for `check_schema`)."""
    problems: dict[int, str] = {}
    for i, row in enumerate(rows):
        # A row without a required key is that row's reject however its neighbours look (an unreadable line's
        # reason replaces this one in the caller).
        if missing := [c for c in (*REQUIRED_COLUMNS, *labels) if c not in row]:
            problems[i] = f"no {', '.join(repr(c) for c in missing)} key"
    names = list(dict.fromkeys(k for row in rows for k in row))
    string_cols = set(REQUIRED_COLUMNS + OPTIONAL_STRING_COLUMNS)
    # kept as they come (a non-string as its JSON text, in its own row only): reasoning too where no stage reads it
    pass_through = set(PASS_THROUGH_COLUMNS) | (set(LABEL_TEXT_COLUMNS) if read is not None else set())
    columns: dict[str, pa.Array] = {}
    json_text: set[str] = set()
    for name in names:
        values = [row.get(name) for row in rows]
        if name in string_cols or name in labels:
            want_number = name in labels
            clean = []
            for i, value in enumerate(values):
                if name == "id" and isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)  # integer ids cast losslessly, as in Parquet
                ok = value is None or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) if want_number else isinstance(value, str)
                )
                if not ok and name in pass_through:  # a number, a NewsAPI-style source object
                    value, ok = json.dumps(value, ensure_ascii=False), True
                if not ok:
                    kind = _JSON_KINDS.get(type(value), type(value).__name__)
                    problems.setdefault(i, f"column '{name}' is {kind}, expected {'a number' if want_number else 'a string'}")
                    value = None
                if want_number and value is not None:
                    try:
                        value = float(value)
                    except OverflowError:
                        problems.setdefault(i, f"column '{name}' is a number too large for a float")
                        value = None
                clean.append(value)
            columns[name] = pa.array(clean, type=pa.float64() if want_number else pa.string())
        elif name in DIMENSIONS:  # an optional label (scoring): numbers as numbers, else every value as JSON text
            numbers = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
            try:
                columns[name] = pa.array(values, type=pa.float64()) if numbers else None
            except (pa.ArrowException, OverflowError):
                columns[name] = None
            if columns[name] is None:  # a string, a boolean, an int past a float: each value's JSON text, marked
                columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
                json_text.add(name)
        elif read is not None:  # a kept column (scoring writes it as text): each value its own text, whatever
            # its neighbours hold (typed over the batch, an object gained its neighbours' keys as nulls, and a
            # string became JSON text beside an object)
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                                      for v in values], type=pa.string())
        else:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowException, TypeError, OverflowError):
                # Mixed types in a pass-through column: keep them as JSON text rather than drop them.
                columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    fields = [pa.field(name, array.type, metadata=JSON_TEXT if name in json_text else None)
              for name, array in columns.items()]
    if not columns:  # every line unreadable: keep the rows, so they are counted and rejected
        columns["id"] = pa.nulls(len(rows), pa.string())
        fields = [pa.field("id", pa.string())]
    return Batch(path, start, pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields)), problems)


def _iter_jsonl(path: Path, batch_rows: int, labels: Sequence[str], lenient: bool = False,
                read: Sequence[str] | None = None) -> Iterator[Batch]:
    """JSON lines in bounded batches. A bad line is an error, or with `lenient` an empty row with its reason.

    Blank lines are not rows: they are skipped and counted in `Batch.blank_lines` (a final batch with no rows
    still carries the count)."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    bad: dict[int, str] = {}
    blank = 0
    start = 0
    first_line, json_suffix = True, path.suffix.lower() == ".json"
    object_like = False  # a line of the first batch begins as a JSON object

    def flush() -> Batch:
        if start == 0 and rows and len(bad) == len(rows) and not object_like:
            # No line of the file's first batch is, or begins as, a JSON object: the file is not JSON Lines (a
            # Parquet or CSV file named .jsonl), a whole-file problem as a Parquet file without the columns is, not
            # a reject a line. A truncated or otherwise bad object is its row's reject, however few rows there are.
            what = f"its first {len(rows)} lines" if len(rows) == batch_rows else \
                "its only line" if len(rows) == 1 else f"its {len(rows)} lines"
            raise InputError(f"{path}: not JSON Lines: no JSON object in {what} (line {lines[0]}: {bad[0]})")
        batch = _jsonl_table(path, start, rows, labels, read)
        batch.problems.update(bad)
        batch.unreadable_rows = len(bad)
        batch.line_numbers, batch.blank_lines = lines, blank
        return batch

    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as some Windows tools write
            if not raw.strip():
                blank += 1
                continue
            if first_line and json_suffix and raw.lstrip().startswith(b"["):  # a .json file holding an array
                raise InputError(f"{path}: a JSON array, not JSON Lines (one object per line); convert it first, "
                                 "e.g. with jq -c '.[]'")
            first_line = False
            object_like = object_like or raw.lstrip().startswith(b"{")
            obj, reason = _parse_line(raw)
            if reason is not None:
                if not lenient:
                    raise InputError(f"{path} line {line_no}: {reason}")
                bad[len(rows)] = reason
                obj = {}
            rows.append(obj)
            lines.append(line_no)
            if len(rows) == batch_rows:
                yield flush()
                start += len(rows)
                rows, lines, bad, blank = [], [], {}, 0
    if rows or blank:
        yield flush()


def _one_value_a_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: with two ids (or two titles) which one is the article's is a
    guess, and json.loads would take the last without a word."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice")
            seen.add(key)
    return obj


def _parse_line(raw: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")  # else a line cut short is "at column 1" of the next
    except UnicodeDecodeError as exc:
        return {}, f"invalid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        obj = json.loads(text, object_pairs_hook=_one_value_a_key)
        if _SURROGATE_ESCAPE.search(text):  # a lone one decodes but cannot be written as UTF-8
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        return {}, f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
    except UnicodeEncodeError:
        return {}, "invalid JSON (a lone UTF-16 surrogate escape)"
    except ValueError as exc:  # an integer of over 4,300 digits
        return {}, f"invalid JSON ({exc})"
    except RecursionError:
        return {}, "invalid JSON (nested too deep)"
    if not isinstance(obj, dict):
        return {}, f"expected a JSON object, got {_JSON_KINDS.get(type(obj), 'a value')}"
    return obj, None


def iter_file_batches(path: Path, batch_rows: int = DEFAULT_BATCH_ROWS, labels: Sequence[str] = (),
                      columns: Sequence[str] | None = None, lenient: bool = False,
                      row_groups: Sequence[int] | None = None) -> Iterator[Batch]:
    """Bounded batches of one file, schema-checked; row problems are attached, not raised.

    `columns`: the columns the caller reads (None: all); Parquet reads only these, JSONL checks only these types.
    `lenient` (scoring): an unparseable JSONL line becomes a row problem instead of an error.
    `row_groups`: read only these Parquet row groups (a shard's share of the file).
    """
    try:
        if is_jsonl(path):
            batches = _iter_jsonl(path, batch_rows, labels, lenient, columns)
        else:
            check_schema(path, parquet_schema(path), labels, columns)
            batches = _iter_parquet(path, batch_rows, columns, row_groups)
        for batch in batches:
            if is_jsonl(path):
                _complete_jsonl_columns(batch, labels)
            if batch.table.num_rows:
                for offset, reason in row_problems(batch.table, labels).items():
                    batch.problems.setdefault(offset, reason)
            yield batch
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:  # a JSONL read that failed: the storage's fault (retried) or the file's
        raise unreadable(path, exc, "not readable") from None


def _complete_jsonl_columns(batch: Batch, labels: Sequence[str]) -> None:
    """JSONL has no schema: a required column no row of the batch named is added as nulls (each such row is already
    a row problem, so the batch's composition never turns one row's missing key into a whole-file error)."""
    for name in (*REQUIRED_COLUMNS, *labels):
        if name not in batch.table.column_names:
            kind = pa.float64() if name in labels else pa.string()
            batch.table = batch.table.append_column(name, pa.nulls(batch.table.num_rows, kind))


def read_articles(inputs: Sequence[str | Path], labels: Sequence[str] = (), batch_rows: int = DEFAULT_BATCH_ROWS,
                  unique_ids: bool = False) -> pa.Table:
    """Read small labelled inputs (training data) strictly: the first problem row is an error naming file and row.
    `unique_ids`: an id seen twice is one too (an article counted twice in a metric or a calibration)."""
    tables, sources = [], []
    first_seen: dict[str, str] = {}
    for path in expand_inputs(inputs):
        for batch in iter_file_batches(path, batch_rows, labels):
            if batch.problems:
                offset = min(batch.problems)
                raise InputError(f"{batch.where(offset)}: {batch.problems[offset]}")
            for offset, id_ in enumerate(batch.table.column("id").to_pylist() if unique_ids else ()):
                where = batch.where(offset)
                if (first := first_seen.setdefault(str(id_), where)) != where:
                    raise InputError(f"{where}: id {id_!r} again (first at {first}); give each article once "
                                     "(data split de-duplicates)")
            if batch.table.num_rows:
                tables.append(normalise_types(batch.table, labels))
                sources.append(path)
    if not tables:
        raise InputError(f"{', '.join(map(str, inputs))}: no rows")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:
        raise InputError(_schema_clash(tables, sources) or f"{', '.join(map(str, inputs))}: files disagree on "
                         f"their schema ({exc})") from None


def _schema_clash(tables: Sequence[pa.Table], sources: Sequence[Path]) -> str:
    """Which two files give a column types that do not combine, and the column."""
    first: dict[str, tuple[pa.DataType, Path]] = {}
    for table, source in zip(tables, sources):
        for column in table.schema:
            seen = first.setdefault(column.name, (column.type, source))
            try:
                pa.unify_schemas([pa.schema([pa.field(column.name, seen[0])]), pa.schema([column])],
                                 promote_options="permissive")
            except pa.ArrowException:
                return (f"{seen[1]} and {source} disagree on column {column.name!r} ({seen[0]} vs {column.type}): give "
                        "it one type in every file")
    return ""


def normalise_types(table: pa.Table, labels: Sequence[str] = ()) -> pa.Table:
    """Known string columns as string, labels as float32, so files written by different tools concatenate."""
    for i, name in enumerate(table.column_names):
        if name in REQUIRED_COLUMNS + OPTIONAL_STRING_COLUMNS and _castable_to_string(table.schema.field(i).type):
            table = table.set_column(i, name, as_text(table.column(i)))
        elif name in labels or name in DIMENSIONS:
            if _numeric_type(table.schema.field(i).type) or pa.types.is_null(table.schema.field(i).type):
                table = table.set_column(i, name, table.column(i).cast(pa.float32()))
    return table


def label_matrix(table: pa.Table) -> np.ndarray:
    """The eight label columns as an (n, 8) float32 matrix, in dimension order."""
    return np.stack([table.column(d).to_numpy(zero_copy_only=False) for d in DIMENSIONS], axis=1).astype(np.float32)
