from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import structlog
from click.testing import CliRunner

from investment_risk.spec import DIMENSIONS
from investment_risk.synth import SynthConfig, generate


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
