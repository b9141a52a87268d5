"""`train`: distillation or instruction training, or its dry run; `stage-model`: the base model into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..core.logs import bind, get_logger
from . import output
from .options import option


@click.command("train")
@option("--mode", type=click.Choice(["distillation", "instruction"]), default="distillation", show_default=True,
        help="distillation: article -> regression head. instruction: prompt + article -> reasoning and JSON scores "
             "(a causal LM), with a score head beside it.")
@option("--base-model", required=True,
        help="Preset (qwen2.5-1.5b, minilm, tiny-qwen2), a local model directory, or a hub id in the local cache.")
@option("--data", once=True, type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Directory with train.parquet and val.parquet (from 'data split').")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory to create.")
@option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per micro-batch.")
@option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
        help="Micro-batches per optimizer step (effective batch = batch size x this).")
@option("--learning-rate", type=click.FloatRange(0, 1, min_open=True), default=2e-5, show_default=True)
@option("--head-lr-multiplier", type=click.FloatRange(0, 1000, min_open=True), default=10.0, show_default=True,
        help="The regression head's learning rate as a multiple of --learning-rate.")
@option("--max-length", type=click.IntRange(min=8), default=None,
        help="Tokens per example (default 512 for distillation, 1024 for instruction: prompt + article + target).")
@option("--score-loss-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
        help="Instruction mode: lambda in token loss + lambda x score MSE.")
@option("--warmup-steps", type=click.IntRange(min=0), default=500, show_default=True,
        help="Linear warm-up steps, capped at 10% of all optimizer steps.")
@option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True, help="AdamW's weight decay.")
@option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
        help="Gradients are clipped to this global norm before each optimizer step.")
@option("--seed", type=click.IntRange(0, 2**63 - 1), default=42, show_default=True)
@option("--log-every", type=click.IntRange(min=1), default=20, show_default=True,
        help="A train_step log line (loss, learning rate, tokens/s) every N optimizer steps; may change on --resume.")
@option("--checkpoint-steps", type=click.IntRange(min=1), default=500, show_default=True,
        help="Also checkpoint every N optimizer steps (always at each epoch end).")
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@option("--compile", "compile", is_flag=True, help="torch.compile each transformer block (worth it on GPUs).")
@option("--train-embeddings", is_flag=True,
        help="Instruction mode: also train the token embeddings (tied to the LM head). Needed by a base that was never "
             "pretrained, like tiny-qwen2; costs vocab x hidden extra parameters.")
@option("--truncation", type=click.Choice(["head", "head-tail"]), default="head", show_default=True,
        help="Articles over --max-length keep their first tokens (head) or their first quarter and last three quarters "
             "of the budget (head-tail); recorded in the run and model.json, so scoring cuts as training did.")
@option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@option("--resume-if-present", is_flag=True,
        help="Continue --out if it holds a run that has a checkpoint, else start it (what a retried Kubernetes pod "
             "needs).")
@option("--dry-run", is_flag=True, help="Validate and count parameters on the meta device; load no weights, write nothing.")
def train_command(resume: bool, resume_if_present: bool, dry_run: bool, **options: Any) -> None:
    """Train a LoRA adapter and regression head on labelled articles."""
    from ..training.config import TrainConfig
    from ..training.dry_run import dry_run as plan
    from ..training.recipe import train
    from ..training.run_dir import has_checkpoint

    bind(stage="train")
    options["max_length"] = options["max_length"] or 0
    config = TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in options.items()})
    if dry_run:
        report = plan(config, resume or (resume_if_present and has_checkpoint(Path(config.out))))
        get_logger().info("dry_run", **report)
        if output.on_terminal():
            click.echo("\n".join(f"{key:<26} {value}" for key, value in report.items()))
        return
    metadata = train(config, resume=resume, resume_if_present=resume_if_present)  # decided under --out's lock
    if output.on_terminal():  # training_done, already logged, carries the same figures
        click.echo(f"best val MAE {metadata['best_val_mae']:.4f} (epoch {metadata['best_epoch']}) -> {config.out}")


@click.command("stage-model")
@option("--base-model", default="qwen2.5-1.5b", show_default=True,
        help="The preset qwen2.5-1.5b or a hub id: fetched into the Hugging Face cache (HF_HOME) for training.")
def stage_model_command(base_model: str) -> None:
    """Download a base model's safetensors, config and tokenizer (the one command that reaches the hub)."""
    from ..modeling.presets import stage_base_model

    bind(stage="stage-model")
    staged = stage_base_model(base_model)
    output.summary(f"{base_model} -> {staged.path} (revision {staged.revision})", "base_model_staged",
                   base_model=base_model, path=str(staged.path), revision=staged.revision)
