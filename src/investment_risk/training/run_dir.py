"""The run directory --out: a new run needs it empty; a resumed run must be the same training, on the same data."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.atomic import hold_lock, read_json, sha256_file, write_json_atomic
from ..core.errors import InputError, RetryableError, unreadable
from ..core.logs import get_logger
from ..modeling.description import RUN_CONFIG_FILE
from ..modeling.presets import BaseModel, revision_change
from .config import TrainConfig, resume_problem

CONFIG_FILE = RUN_CONFIG_FILE
SPLITS = ("train", "val")
LOCK_FILE = ".train.lock"
# What a start leaves in --out before its first checkpoint is committed (named in checkpoints/latest.json): a start
# that failed there (bad data, a killed pod, a full disk) has trained nothing, so a new start may take the folder
# over. Hidden names are temporary files and folders a killed writer left, and the lock.
BEFORE_FIRST_CHECKPOINT = frozenset({CONFIG_FILE, "cache", "checkpoints"})


def data_sha256(data_dir: Path) -> dict[str, str]:
    """sha256 of the split files the run trains and validates on (those that exist: a missing one is reported by
    whoever reads it)."""
    return {name: sha256_file(data_dir / f"{name}.parquet") for name in SPLITS
            if (data_dir / f"{name}.parquet").is_file()}


def has_checkpoint(out: Path) -> bool:
    """Whether --out holds a run that trained (a retried pod's `--resume-if-present` continues only such a run).
    Only a missing file says no: a storage hiccup is an error, never a new start over a trained run."""
    pointer = out / "checkpoints" / "latest.json"
    try:
        pointer.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise unreadable(pointer, exc, "cannot be checked") from None
    return True


def resume_refusal(config: TrainConfig) -> str:
    """Why the run in --out cannot be continued under `config` ('' when it can)."""
    out = Path(config.out)
    saved = out / CONFIG_FILE
    if not saved.exists():
        return f"{out} holds no training run (no {CONFIG_FILE})"
    if problem := resume_problem(config, read_json(saved), data_sha256(Path(config.data))):
        return f"{out} {problem}; start a new run in another --out"
    return ""


def check_out_dir(config: TrainConfig, resume: bool) -> Path:
    out = Path(config.out)
    if resume:
        if refusal := resume_refusal(config):
            raise InputError(f"--resume: {refusal}")
    elif out.exists() and (has_checkpoint(out) or any(p.name not in BEFORE_FIRST_CHECKPOINT and not p.name.startswith(".")
                                                      for p in out.iterdir())):
        raise InputError(f"--out {out} already exists and is not empty; pass --resume to continue it or choose another")
    return out


@contextlib.contextmanager
def claimed_out_dir(config: TrainConfig, resume: bool, if_present: bool = False) -> Iterator[bool]:
    """--out locked for this run (until the block ends, or the process dies) and checked (`check_out_dir`); yields
    whether the run resumes: `resume`, or with `if_present` whether --out holds a checkpoint, decided under the
    lock. A new run takes over what an uncommitted start left there."""
    out = Path(config.out)

    def resuming() -> bool:
        return resume or (if_present and has_checkpoint(out))

    check_out_dir(config, resuming())  # before anything is made: a mistyped --out is refused and left as it was
    made = out.absolute()  # the outermost folder this start makes (`runs/new/r`: runs/new, when runs/ is there)
    while not made.parent.exists():
        made = made.parent
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold_lock(out / LOCK_FILE)  # also the first write: a read-only --out stops here, not at a checkpoint
    except BlockingIOError:
        raise RetryableError(f"--out {out}: another process is training into it (it holds {LOCK_FILE}); two writers "
                             "would overwrite each other's checkpoints") from None
    if lock is None:
        get_logger().warning("run_dir_unlocked", out=str(out), reason="the filesystem refused a lock: make sure one "
                             "process at a time trains into this --out")
    try:
        resumed = resuming()  # again, under the lock: the process that held it may have committed a checkpoint
        check_out_dir(config, resumed)
        if not resumed and lock is not None:  # no committed checkpoint: what checkpoints/ holds, a killed start left
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        yield resumed
    except BaseException:
        # a start that failed before its first checkpoint (no GPU, a base model not found) leaves no folder behind
        if created and {path.name for path in out.iterdir()} <= {LOCK_FILE, CONFIG_FILE}:
            shutil.rmtree(out, ignore_errors=True)
            for folder in out.absolute().parents:  # and the folders made for it, while nothing else is in them
                if folder == made.parent or not _remove_empty(folder):
                    break
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _remove_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:  # another run's folder is in it: it stays
        return False
    return True


def save_run_config(config: TrainConfig, base_revision: str) -> None:
    """The resolved hyperparameters, the data's sha256 and the base model's revision, written when a run starts (a
    resumed run keeps its own)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {**config.to_json(), "data_sha256": data_sha256(Path(config.data)),
                             "base_model_revision": base_revision}
    write_json_atomic(saved, out / CONFIG_FILE)


def check_same_base(config: TrainConfig, base: BaseModel) -> None:
    """A resumed run continues on the base weights it started on (the adapter was fitted to them)."""
    started = read_json(Path(config.out) / CONFIG_FILE).get("base_model_revision")
    if started is not None and started != base.revision:
        raise InputError(f"--resume: {config.out} was started on base model {config.base_model} at revision "
                         f"{started}; it is now {base.revision} ({revision_change(base, str(started))}), or start a "
                         "new run in another --out")
