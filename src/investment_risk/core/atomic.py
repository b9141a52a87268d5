"""Files and directories that appear whole or not at all: write beside the destination, fsync, rename, fsync the
directory (a rename is durable only once its directory is synced). And the one way JSON files are read back."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError, unreadable
from .faults import fault_point
from .logs import get_logger

FILE_MODE = 0o644  # mkstemp makes 0600; a finished file reads like any other
DIR_MODE = 0o755


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


HELD = (errno.EAGAIN, errno.EACCES, errno.EINTR)  # another open file holds the lock
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # a path this process may read but not write
NO_LOCKS = (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP)  # the filesystem has none


def _set_lock(fd: int, wait: bool) -> None:
    """Lock the open file `fd` exclusively (an OSError when it cannot be).

    The lock belongs to this open file, not to the process (an OFD lock; flock where the platform has none), so
    the kernel drops it when its holder dies, SIGKILL included, and a writer that reopens its temporary file by
    path (pyarrow, matplotlib) does not lose it on close, as it would a classic POSIX lock."""
    if hasattr(fcntl, "F_OFD_SETLK"):
        request = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock: the whole file
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))


def _lock(fd: int, wait: bool) -> bool:
    """`_set_lock`; False when another holds the lock (or the filesystem has no locks)."""
    try:
        _set_lock(fd, wait)
    except OSError as exc:
        if exc.errno in HELD + NO_LOCKS:
            return False
        raise
    return True


def hold_lock(path: Path) -> int | None:
    """Open `path` (made if missing) and hold its exclusive lock while the returned descriptor stays open (the
    kernel drops it when the process dies). None where the filesystem has no locks; BlockingIOError when another
    process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        _set_lock(fd, wait=False)
    except OSError as exc:
        os.close(fd)
        if exc.errno in HELD:
            raise BlockingIOError(exc.errno, f"{path} is locked by another process") from None
        if exc.errno in NO_LOCKS:
            return None
        raise
    return fd


def _kernel_id() -> str:
    """Which kernel holds this process's locks: every pod on a node shares the host's boot id. On a shared volume
    whose locks stay on each node (NFS with `nolock` or `local_lock`, FUSE), only this kernel's locks say anything."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return "unknown"


KERNEL_ID = _kernel_id()
# A temporary file written under another kernel may be removed only once it is older than any Job may run (the
# manifests' activeDeadlineSeconds, a day): that kernel's writer may be alive and its lock invisible from here.
FOREIGN_AGE_S = 24 * 3600


def remove_abandoned(dest: str | Path) -> None:
    """Remove the temporary files of `dest` whose writers are gone: a SIGKILL runs no `finally`. A live writer
    holds its file's lock, so a file of this kernel's whose lock can be taken was left by a dead one
    (metrics.json and a raced shard's files have several writers, so name alone cannot tell)."""
    dest = Path(dest)
    prefix = f".{dest.name}."
    for leftover in dest.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        try:
            fd = os.open(leftover, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone already, or not ours to touch
        try:
            stat = os.fstat(fd)
            ours = leftover.name[len(prefix):].startswith(f"{KERNEL_ID}-")
            if ((ours or time.time() - stat.st_mtime > FOREIGN_AGE_S) and _lock(fd, wait=False)
                    and os.path.samestat(stat, os.stat(leftover))):
                leftover.unlink()
        except OSError:
            pass  # removed meanwhile by another writer's sweep
        finally:
            os.close(fd)


def _claimed_temp(dest: Path) -> tuple[int, Path]:
    """A new temporary file beside `dest`, named for this kernel, open and locked for as long as its writer lives."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{KERNEL_ID}-", suffix=".tmp", dir=dest.parent)
        if not _lock(fd, wait=True):  # no locks on this filesystem: only the age rule protects the file
            get_logger().warning("temp_file_unlocked", path=tmp, reason="the filesystem refused a lock")
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, Path(tmp)
        except FileNotFoundError:
            pass  # a sweep took it between its creation and the lock: make another
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | Path, first_wins: bool = False) -> Iterator[Path]:
    """A temporary path beside `dest`; renamed onto `dest` only if the block succeeds, removed otherwise.
    Temporary files of `dest` that a killed writer left are removed first. `first_wins`: a `dest` that exists
    stays as it is (hard-linked into place, which never replaces a file: of writers racing, the first wins)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(dest)
    lock_fd, tmp_path = _claimed_temp(dest)
    try:
        os.chmod(tmp_path, FILE_MODE)
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        label = f"{dest.parent.name}/{dest.name}"
        fault_point(f"before_rename:{label}")
        if first_wins:
            _link_unless_present(tmp_path, dest)
        else:
            os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
        fault_point(f"after_rename:{label}")
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(lock_fd)


def _link_unless_present(tmp: Path, dest: Path) -> None:
    try:
        os.link(tmp, dest)
    except FileExistsError:
        pass
    except OSError as exc:  # a filesystem without hard links: check, then rename (a narrow race, said in the log)
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        get_logger().warning("hard_link_refused", path=str(dest), reason=exc.strerror)
        if not dest.exists():
            os.replace(tmp, dest)


def write_dir_atomic(dest: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Build a directory with `fill(path)` beside `dest`, then swap it in; a failure leaves `dest` as it was.
    What an attempt killed outright (SIGKILL, out of memory) left half-built is removed by the next write of the
    same `dest` (a 1.5B model's export leaves gigabytes): one writer at a time, which `locked_dir` ensures where
    nothing else does."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _write_dir(dest, fill)


@contextlib.contextmanager
def locked_dir(dest: str | Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `dest` for the block: a second writer of the same directory (two exports to one
    --out) is refused at once (InputError) rather than left to delete the first one's work under it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    try:
        lock = hold_named_lock(lock_path)
    except BlockingIOError:
        raise InputError(f"{dest}: another process is writing it now (it holds {lock_path.name}); wait for it to "
                         "finish, or write elsewhere") from None
    except OSError as exc:  # a writable model folder mounted in a read-only one (a pod's /models/current)
        if exc.errno not in READ_ONLY:
            raise
        get_logger().warning("lock_unavailable", path=str(lock_path), reason=exc.strerror,
                             consequence="a second writer of the same directory is not kept out")
        yield
        return
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # before letting go, so the name only ever leads to a held lock
        if lock is not None:
            os.close(lock)


@contextlib.contextmanager
def in_turn(path: Path, wait_s: float) -> Iterator[bool]:
    """Run the block holding the lock file `path`, once whoever holds it lets go: blocks of concurrent processes
    run one at a time. Yields whether it holds the lock: False past `wait_s` (a holder stuck: logged, the block runs
    beside it) and where the file cannot be made or locked (read-only, no locks: the block runs at once)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno not in READ_ONLY:
            raise
        fd = None
    try:
        yield fd is not None and _wait_for_lock(fd, path, wait_s)
    finally:
        if fd is not None:
            os.close(fd)


def _wait_for_lock(fd: int, path: Path, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _set_lock(fd, wait=False)
            return True
        except OSError as exc:
            if exc.errno in NO_LOCKS:
                return False
            if exc.errno not in HELD:
                raise
        if time.monotonic() >= deadline:
            get_logger().warning("turn_not_awaited", lock=str(path), waited_s=wait_s,
                                 consequence="runs beside the holder, which has not let go")
            return False
        time.sleep(0.05)


def hold_named_lock(path: Path) -> int | None:
    """`hold_lock` on a lock file that its holder removes as it lets go: a lock taken on a file the name no longer
    leads to keeps nobody out, so it is taken again on the new one. BlockingIOError while another holds it."""
    for _ in range(10):
        fd = hold_lock(path)
        if fd is None or _still_named(fd, path):
            return fd
        os.close(fd)
    raise BlockingIOError(f"{path}: taken by others each time")


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _write_dir(dest: Path, fill: Callable[[Path], Any]) -> Path:
    prefix = f".{dest.name}.partial-"
    for leftover in dest.parent.glob(f"{glob.escape(prefix)}*"):
        _remove_tree(leftover)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        fill(work)
        _fsync_tree(work)  # the files' data on disk before the rename names them (a power cut after it keeps them)
        work.chmod(DIR_MODE)
        if dest.exists() and exchange(work, dest):  # `work` now holds the old directory, removed below
            fsync_dir(dest.parent)
            return dest
        old = dest.parent / f".{dest.name}-old"
        _remove_tree(old)
        if dest.exists():
            dest.rename(old)
        work.rename(dest)
        fsync_dir(dest.parent)
        _remove_tree(old)
    finally:
        _remove_tree(work)
    return dest


def _remove_tree(path: Path) -> None:
    """Remove a directory, or the symbolic link a swap left in its place (`dest` was a link: rmtree skips links)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader of `b` (a scorer opening
    /models/current while an export replaces it) finds the old or the new directory, never none, and a kill cannot
    leave it missing, as between the two renames of a swap by hand. False where the C library, the kernel or the
    filesystem cannot (NFS, macOS): the caller swaps by hand."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


REPLACE_JOURNAL = ".replace-journal.json"


def replace_files_together(folder: Path, contents: dict[str, str | None]) -> None:
    """Replace several files of `folder` as one change (a model's calibration, its drift reference and the
    model.json that hashes them): a kill at any point leaves the old files, or the new ones once any reader or
    writer of the folder calls `finish_replace`, never a mix. Each new file is staged whole under a name of its
    own, then a journal naming them is written (the commit point), then each is renamed into place and the journal
    removed. None removes the file. The caller holds the folder's lock (`locked_dir`): staged files of a dead
    writer are swept here."""
    finish_replace(folder)
    for leftover in folder.glob(".*.staged-*"):  # a writer killed before its journal: its change never happened
        leftover.unlink(missing_ok=True)
    staged: dict[str, str | None] = {}
    for name, text in contents.items():
        if text is None:
            staged[name] = None
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.staged-", dir=folder)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        staged[name] = Path(tmp).name
    fsync_dir(folder)
    text = json.dumps({"files": staged}) + "\n"
    journal = write_text_atomic(text, folder / REPLACE_JOURNAL)
    _apply_journal(folder, staged)
    _drop_journal(journal, text.encode())


def finish_replace(folder: Path) -> bool:
    """Roll forward a `replace_files_together` whose writer died after its journal; False when there is none.
    Safe beside a live writer of the same change (both rename the same staged files to the same names: what one
    renamed the other finds gone) and beside the next one (only the journal read is removed, never a newer one)."""
    if (journal := _read_journal(folder)) is None:  # none, or its writer finished meanwhile
        return False
    text, files = journal
    _apply_journal(folder, files)
    _drop_journal(folder / REPLACE_JOURNAL, text)
    return True


def replace_pending(folder: Path) -> bool:
    """Whether a journal's change still has something to do: a staged file to rename, a file to remove. A journal
    whose writer was killed after its last rename and before removing it has none: its files are the new set."""
    if (journal := _read_journal(folder)) is None:
        return False
    return any((folder / (staged or name)).exists() for name, staged in journal[1].items())


def _read_journal(folder: Path) -> tuple[bytes, dict[str, str | None]] | None:
    """The journal's text and the files it names (name -> staged name, None: remove), or None without one."""
    path = folder / REPLACE_JOURNAL
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return text, json.loads(text)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise unreadable(path, exc, "not a journal this package wrote") from None


def _apply_journal(folder: Path, files: dict[str, str | None]) -> None:
    for name, staged in files.items():
        if staged is None:
            (folder / name).unlink(missing_ok=True)
            continue
        try:
            os.replace(folder / staged, folder / name)
        except FileNotFoundError:  # renamed already, by an earlier try or beside us
            continue
        fault_point(f"after_rename:{folder.name}/{name}")
    fsync_dir(folder)


def _drop_journal(journal: Path, text: bytes) -> None:
    """Remove the journal whose `text` was applied, never a newer change's (its staged names, unique to each
    change, make the text differ; an inode number does not: ext4 gives a new file the one just freed)."""
    try:
        if journal.read_bytes() != text:  # a newer change's journal: its writer, or the next reader, applies it
            return
    except FileNotFoundError:
        return
    journal.unlink(missing_ok=True)
    fsync_dir(journal.parent)


def check_output_file(path: Path, option: str) -> None:
    """An output file that can be written: not a folder, under a folder (not a file) that can be written. Checked
    before the work, so that a typo costs a second, not the minutes of work whose result it would lose."""
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory; name a file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{option} {path}: {folder} is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {folder} is not writable")


def write_text_atomic(text: str, dest: str | Path, first_wins: bool = False) -> Path:
    with atomic_path(dest, first_wins) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_json_atomic(obj: Any, dest: str | Path, first_wins: bool = False) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", dest, first_wins)


def read_json(path: str | Path) -> Any:
    """A JSON file this package (or its user) wrote; an unreadable or malformed one is an InputError naming it (a
    storage hiccup a RetryableError)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc, "unreadable") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_parquet_atomic(table: Any, dest: str | Path, **kwargs: Any) -> Path:
    import pyarrow.parquet as pq

    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(dest)
