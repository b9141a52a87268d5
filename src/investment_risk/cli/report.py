"""`report compare` (two runs side by side), `report dimensions` (how redundant the eight labels are), `report drift`
(a batch against a reference) and `report batch` (the morning page for a batch)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.logs import bind, get_logger
from . import output
from .options import option


@click.group()
def report() -> None:
    """Reports: runs compared, the labels' dimensions, score drift, a scored batch."""


@report.command("compare")
@click.argument("run_a", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True, path_type=Path))
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the report.")
def report_compare(run_a: Path, run_b: Path, out: Path) -> None:
    """Compare two runs: comparison_report.md (overall and per-dimension tables) and three plots."""
    from ..evaluation.compare import write_comparison

    bind(stage="report")
    result = write_comparison(run_a, run_b, out)
    get_logger().info("comparison_written", out=str(out), winner=result["winner"], same_val_split=result["same_val_split"])
    if output.on_terminal():
        click.echo(f"winner by val MAE: {result['winner']} -> {out / 'comparison_report.md'}")


@report.command("dimensions")
@option("--data", once=True, type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
        help="A labelled Parquet/JSONL file.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the report.")
def report_dimensions(data: Path, out: Path) -> None:
    """How redundant the eight dimensions are: label correlation heatmap, principal components' explained variance and
    the pairs above |r| 0.7, as dimensions.md, dimensions.json and two PNGs."""
    from ..datasets.dimensions import report_label_dimensions

    bind(stage="report")
    analysis = report_label_dimensions(data, out)
    explained = analysis["explained_variance"]
    get_logger().info("dimensions_written", out=str(out), rows=analysis["rows"],
                      first_component=explained[0] if explained else None, strong_pairs=len(analysis["strong_pairs"]))
    if output.on_terminal():
        click.echo(f"{out / 'dimensions.md'}: first component {explained[0]:.0%} of the variance, "
                   f"{len(analysis['strong_pairs'])} pairs above |r| 0.7" if explained else f"{out / 'dimensions.md'}")


@report.command("drift")
@option("--reference", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="An exported model (its validation-score reference) or an earlier scoring output directory.")
@option("--current", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A scoring output directory (its merged metrics.json).")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the report.")
@option("--psi-threshold", type=float, default=0.2, show_default=True, help="Flag dimensions above this PSI; in (0, 10].")
def report_drift(reference: Path, current: Path, out: Path, psi_threshold: float) -> None:
    """PSI per dimension and the tier-share shift of a batch against a model's reference or another batch: drift.md,
    drift.json and overlaid histograms (drift_histograms.png)."""
    from ..evaluation.drift_report import write_drift_report

    bind(stage="report")
    result = write_drift_report(reference, current, out, psi_threshold)
    get_logger().info("drift_written", out=str(out), drifted=result["drifted_dimensions"],
                      psi={d: None if v is None else round(v, 4) for d, v in result["psi"].items()})
    if output.on_terminal():
        click.echo(f"{out / 'drift.md'}: drifted dimensions: {', '.join(result['drifted_dimensions']) or 'none'}")


@report.command("batch")
@option("--scored", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
        help="A scoring output directory (with its merged metrics.json).")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the report.")
@option("--top-k", type=click.IntRange(min=1), default=20, show_default=True, help="Articles listed by signal strength.")
def report_batch(scored: Path, out: Path, top_k: int) -> None:
    """One self-contained HTML page (batch_report.html) for a scored batch: row accounting, throughput, tier shares,
    score histograms against the reference, drift, the top articles by signal strength and the reject reasons."""
    from ..evaluation.batch_report import write_batch_report

    bind(stage="report")
    result = write_batch_report(scored, out, top_k)
    get_logger().info("batch_report_written", **result)
    if output.on_terminal():
        click.echo(result["report"])
