"""Files and directories that appear whole or not at all: write beside the destination, fsync, rename, fsync the
directory (a rename is durable only once its directory is synced). And the one way JSON files are read back."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError
from .faults import fault_point

FILE_MODE = 0o644  # mkstemp makes 0600; a finished file reads like any other
DIR_MODE = 0o755


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary path beside `dest`; renamed onto `dest` only if the block succeeds, removed otherwise."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, FILE_MODE)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        label = f"{dest.parent.name}/{dest.name}"
        fault_point(f"before_rename:{label}")
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
        fault_point(f"after_rename:{label}")
    finally:
        tmp_path.unlink(missing_ok=True)


def write_dir_atomic(dest: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Build a directory with `fill(path)` beside `dest`, then swap it in; a failure leaves `dest` as it was.
    What an attempt killed outright (SIGKILL, out of memory) left half-built is removed by the next write of the
    same `dest`: each destination has one writer, and a 1.5B model's export leaves gigabytes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.partial-"
    for leftover in dest.parent.glob(f"{glob.escape(prefix)}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        fill(work)
        work.chmod(DIR_MODE)
        old = dest.parent / f".{dest.name}-old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        work.rename(dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def write_text_atomic(text: str, dest: str | Path) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_json_atomic(obj: Any, dest: str | Path) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", dest)


def read_json(path: str | Path) -> Any:
    """A JSON file this package (or its user) wrote; an unreadable or malformed one is an InputError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None


def write_parquet_atomic(table: Any, dest: str | Path, **kwargs: Any) -> Path:
    import pyarrow.parquet as pq

    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(dest)
