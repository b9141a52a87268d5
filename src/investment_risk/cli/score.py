"""`score` (one shard) and `score-merge` (the shards' metrics into one)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from ..core.logs import bind, get_logger
from ..modeling.description import CPU_ENGINES
from ..modeling.predict import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET
from . import output
from .options import ENV_PREFIX, RepeatedPath, option


@click.command("score")
@option("--model", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="An exported model directory (or, with --backend torch, a training run).")
@option("--input", "inputs", type=RepeatedPath(), multiple=True, envvar=ENV_PREFIX + "INPUT",
        help="Parquet/JSONL files, directories or quoted globs; repeat it, or list more paths after it.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output directory.")
@option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True,
        envvar=[ENV_PREFIX + "SHARD_INDEX", "JOB_COMPLETION_INDEX"],
        help="This shard (defaults to JOB_COMPLETION_INDEX in an Indexed Job).")
@option("--shard-count", type=click.IntRange(min=1), default=1, show_default=True)
@option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True)
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@option("--keep-columns", default="", help="Comma-separated input columns to pass through (as strings).")
@option("--token-budget", type=click.IntRange(min=64), default=None,
        help=f"Padded tokens per model call (default: {CPU_TOKEN_BUDGET} on CPUs, {GPU_TOKEN_BUDGET} on GPUs, by "
             "measurement).")
@option("--cpu-engine", type=click.Choice(["auto", *CPU_ENGINES]), default="auto",
        show_default=True, help="On CPUs: auto runs the engine export chose (model.json); or name one.")
@option("--no-calibration", is_flag=True, help="Write the raw model scores (the model's calibration is applied by default).")
@option("--ledger", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Incremental: score only the input units this ledger does not list (a nightly batch scores what is new); "
             "the merge adds them once every shard is done. Keep it under the scored root, one per input.")
@option("--psi-threshold", type=float, default=0.2, show_default=True,
        help="The merge logs a drift_detected warning for each dimension whose PSI against the model's reference is "
             "above this; in (0, 10].")
@option("--pushgateway", default="", show_default=False,
        help="Prometheus Pushgateway URL: the shard pushes its metrics when it finishes, and the batch's after the "
             "merge (a failed push is logged, never fatal). Empty: no push.")
@option("--metrics-group", default="adhoc", show_default=True,
        help="The batch_group label of the pushed metrics (the nightly CronJob's is nightly, what its dashboard and "
             "alerts read): a batch of another group leaves the nightly's series alone.")
@option("--checkpoint-seconds", type=click.FloatRange(min=0), default=300, show_default=True,
        help="Take a checkpoint at the first read batch's end this long after the last one (and on SIGTERM): a "
             "stopped shard's rerun reads on from it. 0: after every read batch.")
@option("--force", is_flag=True, help="Redo a shard that is already done.")
# `--input a.parquet b.parquet` (the contract's --input PATH..., an unquoted glob the shell expanded): the paths after
# the first are arguments, and inputs as much as --input's.
@click.argument("more_inputs", nargs=-1, type=click.Path(), metavar="[PATH]...")
def score_command(model: Path, inputs: tuple[str, ...], more_inputs: tuple[str, ...], out: Path, shard_index: int,
                  shard_count: int, backend: str, device: str, keep_columns: str, token_budget: int | None,
                  cpu_engine: str, no_calibration: bool, ledger: Path | None, psi_threshold: float, pushgateway: str,
                  metrics_group: str, checkpoint_seconds: float, force: bool) -> None:
    """Score articles into OUT/part-<shard>.parquet with rejects, metrics and a _done marker."""
    from ..scoring.pipeline import ScoreConfig, score

    bind(shard=shard_index)  # this command's every line is the shard's, its error and summary too
    if more_inputs and click.get_current_context().get_parameter_source("inputs") is ParameterSource.ENVIRONMENT:
        inputs = ()  # paths on the command line override INVESTMENT_RISK_INPUT, as --input does
    inputs = (*inputs, *more_inputs)
    if not inputs:
        raise click.UsageError("Missing option '--input': Parquet/JSONL files, directories or globs to score.")
    keep = tuple(dict.fromkeys(c.strip() for c in keep_columns.split(",") if c.strip()))  # once each, in order
    merged = score(ScoreConfig(model=model, inputs=inputs, out=out, shard_index=shard_index, shard_count=shard_count,
                               backend=backend, device=device, force=force, keep_columns=keep, token_budget=token_budget,
                               cpu_engine=cpu_engine, calibration=not no_calibration, ledger=ledger,
                               psi_threshold=psi_threshold, pushgateway=pushgateway or None,
                               metrics_group=metrics_group, checkpoint_seconds=checkpoint_seconds))
    output.summary(f"{out}: {merged['rows_in']} rows in, {merged['rows_scored']} scored, {merged['rows_rejected']} rejected "
            f"({merged['shards']}/{merged['shard_count']} shards done)", "score_summary", out=str(out),
            **{k: merged.get(k) for k in ("rows_in", "rows_scored", "rows_rejected", "shards", "shard_count")})


@click.command("score-merge")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="A scoring output directory.")
@option("--expect-shards", type=click.IntRange(min=1), default=None,
        help="Fail (exit 1) unless this many shards are done (and every shard of the count they were scored with).")
@option("--wait-seconds", type=click.FloatRange(min=0), default=0.0, show_default=True,
        help="Wait up to this long for the missing shards, checking every 30 s (what the merge Job does).")
@option("--pushgateway", default="", help="Prometheus Pushgateway URL: push the batch's metrics there. Empty: no push.")
def score_merge_command(out: Path, expect_shards: int | None, wait_seconds: float, pushgateway: str) -> None:
    """Merge the finished shards' metrics into OUT/metrics.json and OUT/metrics.prom (the Jobs' last step)."""
    from ..scoring.shard_metrics import merge_until_complete

    bind(stage="merge")
    merged = merge_until_complete(out, expect_shards, wait_seconds, gateway=pushgateway or None)
    fields = {k: merged[k] for k in ("shards", "rows_in", "rows_scored", "rows_rejected", "tier_counts")}
    get_logger().info("metrics_merged", invariant_holds=merged["invariant_holds"], **fields)
    if output.on_terminal():
        click.echo(json.dumps(fields))
