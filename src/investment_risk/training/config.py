"""Training configuration: the resolved hyperparameters, validated once and saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..modeling.presets import PRESETS
from ..modeling.tokens import TRUNCATIONS

MODES = ("distillation", "instruction")
# What a resumed run may change: where it runs and how it reports, not what or how it learns. The data may move
# (its path is free) but not change: its files' sha256 are compared.
RESUMABLE = frozenset({"out", "data", "device", "compile", "log_every", "checkpoint_steps"})


@dataclass(frozen=True)
class TrainConfig:
    """The resolved hyperparameters; saved beside every checkpoint and in the run's metadata."""

    mode: str
    base_model: str
    data: str
    out: str
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-5
    head_lr_multiplier: float = 10.0
    score_loss_weight: float = 1.0  # instruction mode: lambda in token loss + lambda * score MSE
    max_length: int = 0  # 0: the mode's default, 512 for distillation, 1024 for instruction
    warmup_steps: int = 500
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_steps: int = 500
    log_every: int = 20
    device: str = "auto"
    compile: bool = False
    train_embeddings: bool = False  # instruction mode: also train the (tied) token embeddings
    truncation: str = "head"  # distillation: a long article keeps its start ("head") or its start and end ("head-tail")

    def __post_init__(self) -> None:
        # recorded whole: export reads the run's splits from another working directory than training's
        object.__setattr__(self, "data", str(Path(self.data).absolute()))
        # a local base model too: evaluate, export and a resume find it from any working directory (and never
        # another folder of that name under it)
        object.__setattr__(self, "base_model", whole_base_model(self.base_model))
        if not self.max_length:
            object.__setattr__(self, "max_length", 1024 if self.mode == "instruction" else 512)
        checks = [
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (0 < self.learning_rate <= 1, "--learning-rate must be in (0, 1]"),
            (8 <= self.max_length <= 32768, "--max-length must be in [8, 32768]"),
            (0 < self.head_lr_multiplier <= 1000, "--head-lr-multiplier must be in (0, 1000]"),
            (self.score_loss_weight >= 0, "--score-loss-weight must be >= 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay), "--weight-decay must be >= 0"),
            (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm), "--max-grad-norm must be positive"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (0 <= self.seed < 2**63, "--seed must be in [0, 2**63)"),  # torch's seed is a signed 64-bit int
            (self.checkpoint_steps >= 1, "--checkpoint-steps must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.mode == "instruction" or not self.train_embeddings, "--train-embeddings needs --mode instruction"),
            (self.truncation in TRUNCATIONS, f"--truncation must be one of {', '.join(TRUNCATIONS)}"),
            (self.mode == "distillation" or self.truncation == "head",
             "--truncation head-tail needs --mode distillation (the instruction prompt keeps the article's start)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def warmup_for(config: TrainConfig, total_steps: int) -> int:
    """The configured warm-up, capped at 10 % of all optimizer steps (small data would otherwise never leave it)."""
    cap = max(1, int(0.1 * total_steps))
    return min(config.warmup_steps, cap)


@dataclass(frozen=True)
class StepPlan:
    """How many batches and optimizer steps a run takes, and its warm-up."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int


def plan_steps(config: TrainConfig, train_rows: int) -> StepPlan:
    batches_per_epoch = math.ceil(train_rows / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    return StepPlan(batches_per_epoch, steps_per_epoch, total_steps, warmup_for(config, total_steps))


def whole_base_model(name: str) -> str:
    """A local base model directory as an absolute path; a preset or a hub id as it is."""
    local = Path(os.path.expanduser(name))
    return str(local.absolute()) if name not in PRESETS and local.is_dir() else name


def resume_problem(config: TrainConfig, saved: dict[str, Any], data_sha256: dict[str, str]) -> str:
    """Why a run saved with `saved` (its training_config.json) cannot be continued under `config` on data whose
    files hash to `data_sha256` ('' when it can): resuming with other settings or data would mix two trainings."""
    if isinstance(saved.get("base_model"), str):  # a run started before it was recorded whole
        saved = {**saved, "base_model": whole_base_model(saved["base_model"])}
    changed = [f"--{name.replace('_', '-')} {saved[name]} (not {getattr(config, name)})"
               for name in (f.name for f in dataclasses.fields(config))
               if name not in RESUMABLE and name in saved and saved[name] != getattr(config, name)]
    if changed:
        return f"was trained with {', '.join(changed)}"
    moved = sorted(name for name, digest in saved.get("data_sha256", {}).items() if data_sha256.get(name) != digest)
    if moved:
        return (f"was trained on other data: {', '.join(f'{name}.parquet' for name in moved)} in --data "
                f"{config.data} differ from the files it was trained on")
    return ""
