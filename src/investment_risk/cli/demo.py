"""`demo`: the whole loop offline on the embedded default."""

from __future__ import annotations

from pathlib import Path

import click

from . import output
from .options import option


@click.command("demo")
@option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"), show_default=True,
        help="Where every output of the demo goes.")
@option("--base-model", default="minilm", show_default=True, help="The base model to train (a preset or a path).")
@option("--rows", type=click.IntRange(min=50), default=2500, show_default=True, help="Synthetic labelled articles.")
@option("--batch-rows", type=click.IntRange(min=1), default=3000, show_default=True,
        help="Articles in the batch that is scored.")
@option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
def demo_command(out: Path, base_model: str, rows: int, batch_rows: int, epochs: int) -> None:
    """Run the whole loop offline: synth, split, train, evaluate, export to ONNX, score a batch, report."""
    from ..demo import DemoConfig, run_demo, summary_lines

    result = run_demo(DemoConfig(out=out, base_model=base_model, rows=rows, batch_rows=batch_rows, epochs=epochs))
    lines = summary_lines(result)
    output.summary("\n".join(lines), "demo_summary", lines=lines)
