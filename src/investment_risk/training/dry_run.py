"""`train --dry-run`: validate data and options and count parameters on the meta device; no weights, no writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.logs import Progress
from ..core.spec import NUM_DIMENSIONS
from ..modeling.tokens import article_texts, encode
from .config import TrainConfig, plan_steps
from .data import check_batch_fits, read_split
from .instruction import reasonings
from .run_dir import CONFIG_FILE, check_out_dir, check_same_base


def dry_run(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Validate data and options (and, with `resume`, that --out can be continued) and count parameters on the meta
    device; loads no weights, writes nothing."""
    from ..modeling.networks import causal_lm, parameter_counts, regression_model
    from ..modeling.predict import pick_device
    from ..modeling.presets import check_base, load_tokenizer, resolve_base_model

    check_out_dir(config, resume)
    device = pick_device(config.device)  # --device cuda on a node without a GPU fails here as the run would
    base = resolve_base_model(config.base_model, need_weights=False)
    check_base(base, config.mode, config.max_length)
    if resume and (Path(config.out) / CONFIG_FILE).exists():
        check_same_base(config, base)  # as the run itself will
    tokenizer = load_tokenizer(base.path) if base.has_tokenizer else None
    train_table, val_table = read_split(Path(config.data), "train"), read_split(Path(config.data), "val")
    check_batch_fits(Path(config.data), train_table.num_rows, config.batch_size)
    if config.mode == "instruction":
        for name, table in (("train", train_table), ("val", val_table)):
            reasonings(table, Path(config.data) / f"{name}.parquet")
        lm, lm_config = causal_lm(base, meta=True, train_embeddings=config.train_embeddings)
        trainable, total = lm.get_nb_trainable_parameters()
        head = lm_config.hidden_size * NUM_DIMENSIONS + NUM_DIMENSIONS  # the score head, trained in full
        total, trainable = total + head, trainable + head
    else:
        total, trainable = parameter_counts(regression_model(base, tokenizer, meta=True))
    plan = plan_steps(config, train_table.num_rows)
    report: dict[str, Any] = {
        "base_model": config.base_model, "base_model_path": str(base.path), "mode": config.mode, "device": device.type,
        "num_parameters": total, "num_trainable_parameters": trainable, "train_examples": train_table.num_rows,
        "val_examples": val_table.num_rows, "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup,
    }
    if tokenizer is not None:
        with Progress(None, "dry_run", unit="steps") as steps:  # tokenising a large split takes minutes
            steps.step("tokenise")
            token_lengths, truncated = _token_lengths(config, tokenizer, train_table, val_table)
        for name, lengths in token_lengths.items():
            report[f"{name}_tokens"] = int(lengths.sum())
            report[f"{name}_mean_tokens"] = round(float(lengths.mean()), 1)
            report[f"{name}_truncated_share"] = round(float(truncated[name].mean()), 4)
    return report


def _token_lengths(config: TrainConfig, tokenizer: Any, train_table: Any, val_table: Any) -> tuple[dict, dict]:
    """Each split's token lengths as the run will see them, and which rows lose text to truncation."""
    if config.mode == "instruction":  # every prompt built as the run builds them: one with no room fails here too
        from .instruction import InstructionTask

        task = InstructionTask(config, tokenizer)
        splits = task.prepare(None)
        token_lengths = {name: data.lengths for name, data in zip(("train", "val"), splits)}
        # an article is cut to the room its prompt leaves (max_length less the instruction and the longest
        # target): a full-length row is only the one with the longest target
        truncated = task.truncated
    else:
        token_lengths = {name: np.array([len(t) for t in encode(tokenizer, article_texts(table), config.max_length,
                                                                 truncation=config.truncation)])
                         for name, table in (("train", train_table), ("val", val_table))}
        truncated = {name: lengths >= config.max_length for name, lengths in token_lengths.items()}
    return token_lengths, truncated
