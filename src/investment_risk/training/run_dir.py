"""The run directory --out: a new run needs it empty; a resumed run must be the same training, on the same data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.atomic import read_json, write_json_atomic
from ..core.errors import InputError
from ..modeling.description import sha256_file
from .config import TrainConfig, resume_problem

CONFIG_FILE = "training_config.json"
SPLITS = ("train", "val")
# What a start leaves in --out before its first checkpoint: a start that failed there (bad data, a killed pod) has
# trained nothing, so a new start may take the folder over.
BEFORE_FIRST_CHECKPOINT = frozenset({CONFIG_FILE, "cache"})


def data_sha256(data_dir: Path) -> dict[str, str]:
    """sha256 of the split files the run trains and validates on (those that exist: a missing one is reported by
    whoever reads it)."""
    return {name: sha256_file(data_dir / f"{name}.parquet") for name in SPLITS
            if (data_dir / f"{name}.parquet").is_file()}


def has_checkpoint(out: Path) -> bool:
    """Whether --out holds a run that trained (a retried pod's `--resume-if-present` continues only such a run)."""
    return (out / "checkpoints" / "latest.json").exists()


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
    elif out.exists() and any(p.name not in BEFORE_FIRST_CHECKPOINT for p in out.iterdir()):
        raise InputError(f"--out {out} already exists and is not empty; pass --resume to continue it or choose another")
    return out


def save_run_config(config: TrainConfig) -> None:
    """The resolved hyperparameters and the data's sha256, written when a run starts (a resumed run keeps its own)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {**config.to_json(), "data_sha256": data_sha256(Path(config.data))}
    write_json_atomic(saved, out / CONFIG_FILE)
