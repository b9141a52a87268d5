from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import structlog
from click.testing import CliRunner

import json

from investment_risk.core.spec import DIMENSIONS
from investment_risk.datasets.synth import SynthConfig, generate


def pytest_configure(config):
    # One random seed for the whole run, from SystemRandom unless replayed; xdist workers inherit it.
    os.environ.setdefault("RELIABILITY_SEED", str(random.SystemRandom().randrange(10**6)))


def pytest_report_header(config):
    seed = os.environ["RELIABILITY_SEED"]
    return f"random seed {seed} (replay: RELIABILITY_SEED={seed} make test)"


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """One cache for built test models (tiny-qwen2), shared by the xdist workers of this run."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if root.name.startswith("popen-gw") else root) / "model-cache"
    os.environ["INVESTMENT_RISK_CACHE"] = str(shared)
    yield shared


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture(scope="session")
def synth_table() -> pa.Table:
    return generate(SynthConfig(rows=400, seed=7))


@pytest.fixture
def synth_parquet(tmp_path: Path, synth_table: pa.Table) -> Path:
    path = tmp_path / "articles.parquet"
    pq.write_table(synth_table, path)
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def article_rows(n: int, labels: bool = True, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        row = {"id": f"a{i}", "title": f"Title {i}", "content": f"Body text number {i} about credit spreads."}
        if labels:
            row.update({d: float((i + j) % 10) for j, d in enumerate(DIMENSIONS)})
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory) -> Path:
    """A small train/val/test split of synthetic articles."""
    from investment_risk.datasets.split import SplitConfig, run_split

    root = tmp_path_factory.mktemp("split")
    pq.write_table(generate(SynthConfig(rows=160, seed=4)), root / "all.parquet")
    run_split([str(root / "all.parquet")], root / "data", SplitConfig(val=0.15, test=0.15, seed=1))
    return root / "data"


TINY_TRAIN_ARGS = ["--base-model", "tiny-qwen2", "--epochs", "2", "--batch-size", "8", "--learning-rate", "2e-3",
                   "--max-length", "64", "--warmup-steps", "2", "--checkpoint-steps", "5", "--device", "cpu"]


@pytest.fixture(scope="session")
def unbroken_tiny_run(split_dir, tmp_path_factory) -> Path:
    """One uninterrupted `train` with TINY_TRAIN_ARGS on split_dir: the history every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    done = subprocess.run([str(Path(sys.executable).parent / "investment-risk"), "--log-format", "json", "train",
                           *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def exported(split_dir, tmp_path_factory):
    from investment_risk.export.onnx_export import export_run
    from investment_risk.training.config import TrainConfig
    from investment_risk.training.recipe import train

    root = tmp_path_factory.mktemp("exported")
    train(TrainConfig(mode="distillation", base_model="tiny-qwen2", data=str(split_dir), out=str(root / "run"), epochs=1,
                      batch_size=8, learning_rate=2e-3, max_length=64, warmup_steps=2, device="cpu"))
    info = export_run(root / "run", root / "model")
    return root / "run", root / "model", info


@pytest.fixture(scope="session")
def articles(tmp_path_factory) -> Path:
    """Two Parquet files with several row groups each, and a JSONL file."""
    root = tmp_path_factory.mktemp("articles")
    table = generate(SynthConfig(rows=240, seed=21))
    pq.write_table(table.slice(0, 100), root / "a.parquet", row_group_size=30)
    pq.write_table(table.slice(100, 100), root / "b.parquet", row_group_size=45)
    with (root / "c.jsonl").open("w") as handle:
        for row in table.slice(200, 40).to_pylist():
            handle.write(json.dumps(row) + "\n")
    return root


def assert_same_history(whole: Path, resumed: Path, context: object = None) -> None:
    """Two runs' training_history.json agree epoch by epoch, metric by metric, within float tolerance."""
    a = json.loads((whole / "training_history.json").read_text())
    b = json.loads((resumed / "training_history.json").read_text())
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b], context
    for x, y in zip(a, b):
        for split in ("train", "val"):
            for key in x[split]:
                assert x[split][key] == pytest.approx(y[split][key], rel=1e-5, abs=1e-6), (context, split, key)


def assert_json_stdout(result) -> list[dict]:
    """Every line the command wrote to its (piped) stdout is a JSON object; returns them."""
    events = []
    for line in result.stdout.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        events.append(event)
    return events


@pytest.fixture
def terminal(monkeypatch):
    """Commands behave as if stdout were a terminal: human summaries instead of JSON events."""
    monkeypatch.setattr("investment_risk.cli.output.on_terminal", lambda: True)
