"""`report compare`: two runs side by side."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.logs import bind, get_logger
from . import output
from .options import option


@click.group()
def report() -> None:
    """Reports over training runs."""


@report.command("compare")
@click.argument("run_a", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True, path_type=Path))
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the report.")
def report_compare(run_a: Path, run_b: Path, out: Path) -> None:
    """Compare two runs: comparison_report.md (overall and per-dimension tables) and three plots."""
    from ..evaluation.compare import write_comparison

    bind(stage="report")
    result = write_comparison(run_a, run_b, out)
    get_logger().info("comparison_written", out=str(out), winner=result["winner"])
    if output.on_terminal():
        click.echo(f"winner by val MAE: {result['winner']} -> {out / 'comparison_report.md'}")
