"""`data synth` and `data split`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..core.logs import bind, get_logger
from . import output
from .options import ENV_PREFIX, option


@click.group()
def data() -> None:
    """Make and prepare labelled article data."""


@data.command("synth")
@option("--rows", type=click.IntRange(1, 1_000_000), required=True,
        help="How many articles to generate (1 to 1,000,000: they are built in memory).")
@option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
        help="Random seed; the same seed gives the same file.")
@option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
        help="Output file: .parquet, or .jsonl for JSON lines.")
def data_synth(rows: int, seed: int, out: Path) -> None:
    """Generate synthetic labelled articles (with reasoning) for tests, demos and benchmarks."""
    from ..datasets.synth import SynthConfig, write_synthetic

    bind(stage="synth")
    started = time.monotonic()
    path = write_synthetic(SynthConfig(rows=rows, seed=seed), out)
    get_logger().info("synth_written", out=str(path), rows=rows, seed=seed, seconds=round(time.monotonic() - started, 2))


@data.command("split")
@option("--input", "inputs", type=str, required=True, multiple=True, envvar=ENV_PREFIX + "INPUT",
        help="Labelled articles: a Parquet/JSONL file, a directory or a glob; repeat it for more.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Output directory for train.parquet, val.parquet, test.parquet and split_summary.json.")
@option("--val", type=float, default=0.1, show_default=True, help="Share of unique rows for validation.")
@option("--test", type=float, default=0.1, show_default=True, help="Share of unique rows for testing.")
@option("--seed", type=click.IntRange(min=0), default=42, show_default=True, help="Random seed of the shuffle.")
def data_split(inputs: tuple[str, ...], out: Path, val: float, test: float, seed: int) -> None:
    """De-duplicate (by id and normalised content) and split into train/val/test."""
    from ..datasets.split import SplitConfig, run_split

    bind(stage="split")
    result = run_split(list(inputs), out, SplitConfig(val=val, test=test, seed=seed))
    rows = result["rows"]
    output.summary(f"train={rows['train']} val={rows['val']} test={rows['test']} -> {out}", "split_summary",
            out=str(out), **{f"{name}_rows": rows[name] for name in ("train", "val", "test")})
