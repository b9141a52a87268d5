"""training_metadata.json: the contract's keys, then what a reader needs to trust and reproduce the run."""

from __future__ import annotations

import platform
import time
from typing import Any

from .. import __version__
from ..core.spec import DIMENSIONS, NUM_DIMENSIONS, default_spec


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"investment-risk": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "tokenizers", "safetensors", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def build_metadata(session: Any, state: Any) -> dict[str, Any]:
    """From the recipe's Session and final TrainState."""
    config, train_data = session.config, session.train_data
    from ..modeling.networks import parameter_counts

    total_params, trainable_params = parameter_counts(session.model)
    spec = default_spec()
    train_seconds = max(state.train_seconds, 1e-9)
    return {
        "filter_name": spec.name, "filter_version": spec.version, "dimension_names": list(DIMENSIONS),
        "num_dimensions": NUM_DIMENSIONS, "model_name": config.base_model, "num_parameters": total_params,
        "num_trainable_parameters": trainable_params, "epochs": config.epochs, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "max_length": config.max_length, "warmup_steps": session.warmup,
        "train_examples": train_data.table.num_rows, "val_examples": session.val_data.table.num_rows,
        "best_val_mae": state.best_val_mae, "include_prompt": config.mode == "instruction",
        "training_mode": config.mode, "truncation": config.truncation,
        **({"prompt_max_length": train_data.prompt_max_length} if train_data.prompt_max_length else {}),
        # beyond the contract's list
        "best_epoch": state.best_epoch, "steps_per_epoch": session.steps_per_epoch,
        "warmup_steps_requested": config.warmup_steps,
        "gradient_accumulation_steps": config.grad_accum, "effective_batch_size": config.batch_size * config.grad_accum,
        "seed": config.seed, "base_model_path": str(session.base.path), "base_model_revision": session.base.revision,
        "device": str(session.device), "package_versions": _package_versions(),
        "wall_time_s": round(state.wall_seconds + time.monotonic() - session.wall_mark, 2),
        "train_seconds": round(train_seconds, 2), "train_tokens": state.tokens,
        "tokens_per_second": round(state.tokens / train_seconds, 1),
        "epoch_seconds": state.epoch_seconds, "epoch_tokens": state.epoch_tokens,
        "train_label_mean": [float(x) for x in train_data.labels.mean(axis=0)],
        "config": config.to_json(),
    }
