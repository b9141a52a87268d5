"""The `investment-risk` command line: thin Click commands that parse, call one library function, and report.

Domain exceptions become a one-line `Error: ...` with the exit code the contract gives them, in one place
(`App.invoke`): 2 for bad usage, config or data; 1 for what a retry may fix; 130 when interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import InvestmentRiskError
from .logs import bind, configure_logging, get_logger, new_run_id, redact_text

ENV_PREFIX = "INVESTMENT_RISK_"


class EnvOption(click.Option):
    """Every option can also come from INVESTMENT_RISK_<OPTION> (the contract's rule, not Click's nested prefix)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)
        if self.envvar is None and self.name:
            self.envvar = ENV_PREFIX + self.name.upper()


option = functools.partial(click.option, cls=EnvOption)


class App(click.Group):
    """The root group: maps the package's exceptions to exit codes for every subcommand below it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvestmentRiskError as exc:
            get_logger().error("command_failed", error=str(exc), exit_code=exc.exit_code)
            error = click.ClickException(redact_text(str(exc)))  # messages echo paths and options
            error.exit_code = exc.exit_code
            raise error from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            text = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc) or exc.__class__.__name__
            error = click.ClickException(redact_text(text))
            error.exit_code = 2
            raise error from None
        except OSError as exc:
            get_logger().error("command_failed", error=str(exc), exit_code=1)
            error = click.ClickException(redact_text(f"I/O error: {exc}"))
            error.exit_code = 1
            raise error from None
        except KeyboardInterrupt:
            get_logger().warning("interrupted")
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto",
        help="Log lines as JSON (default when stdout is not a terminal) or readable console lines.")
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default="INFO",
        help="The least severe level that is logged.")
@click.version_option(__version__, prog_name="investment-risk")
def main(log_format: str, log_level: str) -> None:
    """Eight calibrated capital-preservation risk scores per financial news article."""
    configure_logging(log_format, log_level)
    bind(run_id=os.environ.get(ENV_PREFIX + "RUN_ID") or new_run_id())


@main.group()
def data() -> None:
    """Make and prepare labelled article data."""


@data.command("synth")
@option("--rows", type=click.IntRange(min=1), required=True, help="How many articles to generate (>= 1).")
@option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same file.")
@option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
        help="Output file: .parquet, or .jsonl for JSON lines.")
def data_synth(rows: int, seed: int, out: Path) -> None:
    """Generate synthetic labelled articles (with reasoning) for tests, demos and benchmarks."""
    from .synth import SynthConfig, write_synthetic

    bind(stage="synth")
    started = time.monotonic()
    path = write_synthetic(SynthConfig(rows=rows, seed=seed), out)
    get_logger().info("synth_written", out=str(path), rows=rows, seed=seed, seconds=round(time.monotonic() - started, 2))


@data.command("split")
@option("--input", "input_", type=str, required=True, envvar=ENV_PREFIX + "INPUT",
        help="Labelled articles: a Parquet/JSONL file, a directory or a glob.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Output directory for train.parquet, val.parquet, test.parquet and split_summary.json.")
@option("--val", type=float, default=0.1, show_default=True, help="Share of unique rows for validation.")
@option("--test", type=float, default=0.1, show_default=True, help="Share of unique rows for testing.")
@option("--seed", type=int, default=42, show_default=True, help="Random seed of the shuffle.")
def data_split(input_: str, out: Path, val: float, test: float, seed: int) -> None:
    """De-duplicate (by id and normalised content) and split into train/val/test."""
    from .split import SplitConfig, run_split

    bind(stage="split")
    summary = run_split([input_], out, SplitConfig(val=val, test=test, seed=seed))
    click.echo(f"train={summary['rows']['train']} val={summary['rows']['val']} test={summary['rows']['test']} "
               f"-> {out}", err=not sys.stdout.isatty())


@main.command("train")
@option("--mode", type=click.Choice(["distillation", "instruction"]), default="distillation", show_default=True,
        help="distillation: article -> regression head. instruction: prompt + article -> reasoning and JSON scores "
             "(a causal LM), with a score head beside it.")
@option("--base-model", required=True,
        help="Preset (qwen2.5-1.5b, minilm, tiny-qwen2), a local model directory, or a hub id in the local cache.")
@option("--data", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Directory with train.parquet and val.parquet (from 'data split').")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory to create.")
@option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per micro-batch.")
@option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
        help="Micro-batches per optimizer step (effective batch = batch size x this).")
@option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True)
@option("--head-lr-multiplier", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
        help="The regression head's learning rate as a multiple of --learning-rate.")
@option("--max-length", type=click.IntRange(min=8), default=None,
        help="Tokens per example (default 512 for distillation, 1024 for instruction: prompt + article + target).")
@option("--score-loss-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
        help="Instruction mode: lambda in token loss + lambda x score MSE.")
@option("--warmup-steps", type=click.IntRange(min=0), default=500, show_default=True,
        help="Linear warm-up steps, capped at 10% of all optimizer steps.")
@option("--seed", type=int, default=42, show_default=True)
@option("--checkpoint-steps", type=click.IntRange(min=1), default=500, show_default=True,
        help="Also checkpoint every N optimizer steps (always at each epoch end).")
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@option("--compile", "compile", is_flag=True, help="torch.compile the training forward (worth it on GPUs).")
@option("--train-embeddings", is_flag=True,
        help="Instruction mode: also train the token embeddings (tied to the LM head). Needed by a base that was never "
             "pretrained, like tiny-qwen2; costs vocab x hidden extra parameters.")
@option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@option("--resume-if-present", is_flag=True,
        help="Continue --out if it already holds this run, else start it (what a retried Kubernetes pod needs).")
@option("--dry-run", is_flag=True, help="Validate and count parameters on the meta device; load no weights, write nothing.")
def train_command(resume: bool, resume_if_present: bool, dry_run: bool, **options: Any) -> None:
    """Train a LoRA adapter and regression head on labelled articles."""
    from .train import TrainConfig, dry_run as plan, train

    bind(stage="train")
    options["max_length"] = options["max_length"] or 0
    config = TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in options.items()})
    if dry_run:
        report = plan(config)
        get_logger().info("dry_run", **report)
        click.echo("\n".join(f"{key:<26} {value}" for key, value in report.items()), err=not sys.stdout.isatty())
        return
    resume = resume or (resume_if_present and (Path(config.out) / "training_config.json").exists())
    metadata = train(config, resume=resume)
    click.echo(f"best val MAE {metadata['best_val_mae']:.4f} (epoch {metadata['best_epoch']}) -> {config.out}",
               err=not sys.stdout.isatty())


@main.command("evaluate")
@option("--model", "model", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A training run directory, or an exported model directory (scored with ONNX Runtime).")
@option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True, help="A labelled Parquet/JSONL file.")
@option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the metrics as JSON here.")
@option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@option("--explain", is_flag=True, help="Instruction runs: also generate reasoning + JSON; report parse rate and its MAE.")
@option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="With --explain.")
@option("--free-generation", is_flag=True,
        help="With --explain: plain greedy decoding, without the answer grammar (measures the learned format alone).")
def evaluate_command(model: Path, data: Path, out: Path | None, batch_size: int, device: str, explain: bool,
                     max_new_tokens: int, free_generation: bool) -> None:
    """MAE/RMSE overall and per dimension, beside the predict-the-train-mean baseline."""
    from .evaluate import evaluate_run, format_table

    bind(stage="evaluate")
    result = evaluate_run(model, data, out, batch_size, device, explain, max_new_tokens, not free_generation)
    click.echo(format_table(result), err=not sys.stdout.isatty())


@main.command("export")
@option("--run", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A training run directory.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@option("--dtype", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
        help="fp16 (for GPUs) keeps norms, softmax and other overflow-prone ops in fp32; int8 (for CPUs) quantises "
             "the MatMuls dynamically. Both record their own parity.")
@option("--force", is_flag=True, help="Replace an existing --out.")
def export_command(run: Path, out: Path, dtype: str, force: bool) -> None:
    """Merge the adapter and export to ONNX with a measured PyTorch parity (fp32 must be within 1e-3)."""
    from .export import export_run

    bind(stage="export")
    info = export_run(run, out, dtype, force)
    click.echo(f"{out}: model_version {info['model_version']}, fp32 parity {info['parity']['fp32_max_abs_diff']:.2e}",
               err=not sys.stdout.isatty())


@main.command("score")
@option("--model", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="An exported model directory (or, with --backend torch, a training run).")
@option("--input", "inputs", multiple=True, required=True, envvar=ENV_PREFIX + "INPUT",
        help="Parquet/JSONL files, directories or quoted globs; repeat for more.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output directory.")
@option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True,
        envvar=[ENV_PREFIX + "SHARD_INDEX", "JOB_COMPLETION_INDEX"],
        help="This shard (defaults to JOB_COMPLETION_INDEX in an Indexed Job).")
@option("--shard-count", type=click.IntRange(min=1), default=1, show_default=True)
@option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True)
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@option("--keep-columns", default="", help="Comma-separated input columns to pass through (as strings).")
@option("--token-budget", type=click.IntRange(min=64), default=16384, show_default=True,
        help="Padded tokens per model call.")
@option("--force", is_flag=True, help="Redo a shard that is already done.")
def score_command(model: Path, inputs: tuple[str, ...], out: Path, shard_index: int, shard_count: int, backend: str,
                  device: str, keep_columns: str, token_budget: int, force: bool) -> None:
    """Score articles into OUT/part-<shard>.parquet with rejects, metrics and a _done marker."""
    from .score import ScoreConfig, score

    keep = tuple(c.strip() for c in keep_columns.split(",") if c.strip())
    merged = score(ScoreConfig(model=model, inputs=inputs, out=out, shard_index=shard_index, shard_count=shard_count,
                               backend=backend, device=device, force=force, keep_columns=keep, token_budget=token_budget))
    click.echo(f"{out}: {merged['rows_in']} rows in, {merged['rows_scored']} scored, {merged['rows_rejected']} rejected "
               f"({merged['shards']}/{merged['shard_count']} shards done)", err=not sys.stdout.isatty())


@main.command("score-merge")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="A scoring output directory.")
@option("--expect-shards", type=click.IntRange(min=1), default=None,
        help="Fail (exit 1) unless this many shards are done (and every shard of the count they were scored with).")
@option("--wait-seconds", type=click.FloatRange(min=0), default=0.0, show_default=True,
        help="Wait up to this long for the missing shards, checking every 30 s (what the merge Job does).")
def score_merge_command(out: Path, expect_shards: int | None, wait_seconds: float) -> None:
    """Merge the finished shards' metrics into OUT/metrics.json and OUT/metrics.prom (the Jobs' last step)."""
    from .metrics_io import merge_until_complete

    bind(stage="merge")
    merged = merge_until_complete(out, expect_shards, wait_seconds)
    get_logger().info("metrics_merged", shards=merged["shards"], rows_in=merged["rows_in"],
                      invariant_holds=merged["invariant_holds"])
    click.echo(json.dumps({k: merged[k] for k in ("shards", "rows_in", "rows_scored", "rows_rejected", "tier_counts")}),
               err=not sys.stdout.isatty())


@main.group()
def report() -> None:
    """Reports over training runs."""


@report.command("compare")
@click.argument("run_a", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True, path_type=Path))
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the report.")
def report_compare(run_a: Path, run_b: Path, out: Path) -> None:
    """Compare two runs: comparison_report.md (overall and per-dimension tables) and three plots."""
    from .compare import write_comparison

    bind(stage="report")
    result = write_comparison(run_a, run_b, out)
    get_logger().info("comparison_written", out=str(out), winner=result["winner"])
    click.echo(f"winner by val MAE: {result['winner']} -> {out / 'comparison_report.md'}", err=not sys.stdout.isatty())


@main.command("demo")
@option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"), show_default=True,
        help="Where every output of the demo goes.")
@option("--base-model", default="minilm", show_default=True, help="The base model to train (a preset or a path).")
@option("--rows", type=click.IntRange(min=50), default=2500, show_default=True, help="Synthetic labelled articles.")
@option("--batch-rows", type=click.IntRange(min=1), default=3000, show_default=True,
        help="Articles in the batch that is scored.")
@option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
def demo_command(out: Path, base_model: str, rows: int, batch_rows: int, epochs: int) -> None:
    """Run the whole loop offline: synth, split, train, evaluate, export to ONNX, score a batch, report."""
    from .demo import DemoConfig, run_demo, summary_lines

    summary = run_demo(DemoConfig(out=out, base_model=base_model, rows=rows, batch_rows=batch_rows, epochs=epochs))
    for line in summary_lines(summary):
        click.echo(line)


from .jobs_cli import jobs_group  # noqa: E402  (it builds on this module's option helpers)

main.add_command(jobs_group)

if __name__ == "__main__":  # pragma: no cover
    main()
