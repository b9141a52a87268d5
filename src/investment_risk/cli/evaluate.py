"""`evaluate`: a run or an exported model on labelled data, beside the mean baseline."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.logs import bind
from . import output
from .options import option


@click.command("evaluate")
@option("--model", "model", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A training run directory, or an exported model directory (scored with ONNX Runtime).")
@option("--data", once=True, type=click.Path(dir_okay=False, path_type=Path), required=True, help="A labelled Parquet/JSONL file.")
@option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the metrics as JSON here.")
@option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@option("--explain", is_flag=True, help="Instruction runs: also generate reasoning + JSON; report parse rate and its MAE.")
@option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="With --explain.")
@option("--free-generation", is_flag=True,
        help="With --explain: plain greedy decoding, without the answer grammar (measures the learned format alone).")
@option("--no-calibration", is_flag=True, help="Report the raw scores (the calibrated ones stand beside them).")
@option("--top-k", type=click.IntRange(min=1), default=50, show_default=True,
        help="k of Recall@k and NDCG@k: how well signal strength ranks the top of the list.")
def evaluate_command(model: Path, data: Path, out: Path | None, batch_size: int, device: str, explain: bool,
                     max_new_tokens: int, free_generation: bool, no_calibration: bool, top_k: int) -> None:
    """MAE/RMSE overall and per dimension beside the predict-the-train-mean baseline, raw and calibrated, and the
    decision metrics: tier confusion (PNG beside --out), per-tier precision/recall/F1, RED recall, Spearman per
    dimension, Recall@k and NDCG@k of signal strength."""
    from ..evaluation.evaluate import evaluate_run, format_table

    bind(stage="evaluate")
    result = evaluate_run(model, data, out, batch_size, device, explain, max_new_tokens, not free_generation,
                          not no_calibration, top_k)
    if output.on_terminal():  # the `evaluated` event carries the figures on a piped stdout
        click.echo(format_table(result))


@click.command("calibrate")
@option("--model", "model", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A training run or an exported model directory.")
@option("--data", once=True, type=click.Path(dir_okay=False, path_type=Path), required=True,
        help="A labelled Parquet/JSONL file (new data, not the training split).")
@option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def calibrate_command(model: Path, data: Path, batch_size: int, device: str) -> None:
    """Refit the model's per-dimension isotonic calibration on labelled data, without retraining (replaced atomically;
    an exported model gets a new model_version)."""
    from ..evaluation.calibrate import recalibrate

    bind(stage="calibrate")
    result = recalibrate(model, data, batch_size, device)
    if output.on_terminal():  # the `calibrated` event carries the same on a piped stdout
        click.echo(f"{result['file']}: refitted on {result['rows']} rows (MAE raw {result['mae_raw']:.3f}, calibrated "
                   f"in-sample {result['mae_calibrated_in_sample']:.3f}; calibration error raw "
                   f"{result['calibration_error_raw']:.3f}, calibrated in-sample "
                   f"{result['calibration_error_calibrated_in_sample']:.3f}); model_version {result['model_version']}")
