"""Reliability proofs in `make test`: a short fault-injection run and training resumed after kills at random steps.

`make chaos` runs the long version (tests/chaos.py: 200 cycles).
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from investment_risk.scoring.pipeline import ScoreConfig, score

from . import chaos
from .conftest import TINY_TRAIN_ARGS, assert_same_history

EXE = str(Path(sys.executable).parent / "investment-risk")
SEED = int(os.environ["RELIABILITY_SEED"])  # drawn once per run by conftest, printed in the report header


PLANS = [{"kind": "point", "shard": n % 2, "point": point.format(shard=n % 2)} for n, point in enumerate(chaos.POINTS)]
PLANS += [{"kind": "random", "shard": 0}, {"kind": "race", "shard": 1}]


@pytest.fixture(scope="module")
def chaos_inputs(exported, tmp_path_factory):
    """The inputs and one clean run of each shard, made once per worker for every fault below."""
    _, model, _ = exported
    return model, chaos.prepare(model, tmp_path_factory.mktemp("chaos"))


# One case per fault, so that the two test workers share them.
@pytest.mark.parametrize("plan", PLANS, ids=[p.get("point", p["kind"]) for p in PLANS])
def test_scoring_is_exactly_once_under_faults(plan, chaos_inputs, tmp_path):
    model, (inputs, total, ids, typical_s) = chaos_inputs
    if plan["kind"] == "random":
        plan = {**plan, "after_s": round(random.Random(SEED).uniform(0.3, typical_s), 3)}
    record = chaos.cycle(0, plan, model, inputs, total, ids, tmp_path)
    assert not record["violations"], (SEED, record)
    if plan["kind"] == "point":
        assert record["killed_exit_code"] == -9, record  # the fault really fired


def test_a_failed_check_is_reported(chaos_inputs, tmp_path):
    """The checker itself: a lost row, a doubled row and a torn file are each caught."""
    _, (inputs, total, ids, _) = chaos_inputs
    out = tmp_path / "baseline"
    shutil.copytree(inputs.parent / "baseline", out)
    assert chaos.check(out, total, ids) == []
    assert any("rows out" in p for p in chaos.check(out, total + 1, ids))
    part = out / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    assert any("not a valid Parquet file" in p for p in chaos.check(out, total, ids))
    (out / "part-00000.parquet").write_bytes(data)
    (out / "part-00009.parquet").write_bytes(data)
    problems = chaos.check(out, total, ids)
    assert any("scored twice" in p for p in problems) and any("metrics.json rows_scored" in p for p in problems)


def run_train(args, env=None):
    return subprocess.run([EXE, "--log-format", "json", "train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_training_resumed_after_kills_at_random_steps_matches_an_unbroken_run(split_dir, unbroken_tiny_run, tmp_path):
    args = [*TINY_TRAIN_ARGS, "--data", str(split_dir)]
    metadata = json.loads((unbroken_tiny_run / "training_metadata.json").read_text())
    total = metadata["config"]["epochs"] * -(-metadata["train_examples"] // 8)
    rng = random.Random(SEED)
    first = rng.randint(1, total - 2)
    second = rng.randint(first + 1, total - 1)
    broken = ["--out", str(tmp_path / "broken")]
    assert run_train([*args, *broken], {"_INVESTMENT_RISK_KILL_AT_STEP": str(first)}).returncode == -9, SEED
    assert run_train([*args, *broken, "--resume"], {"_INVESTMENT_RISK_KILL_AT_STEP": str(second)}).returncode == -9, SEED
    done = run_train([*args, *broken, "--resume-if-present"])
    assert done.returncode == 0, done.stderr
    assert_same_history(unbroken_tiny_run, tmp_path / "broken", (SEED, first, second))


def test_sigterm_removes_what_was_half_written_and_exits_1(exported, articles, tmp_path):
    """A stopped pod gets SIGTERM: the shard's files under temporary names are removed, no marker is written, a
    `terminated` event is logged, and the exit code (1) lets the Job retry it."""
    _, model, _ = exported
    out = tmp_path / "out"
    done = subprocess.run([EXE, "--log-format", "json", "score", "--model", str(model), "--input", str(articles),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "_INVESTMENT_RISK_KILL_AT": "before_rename:*/part-00000.parquet",
                               "_INVESTMENT_RISK_KILL_SIGNAL": "TERM"})
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "terminated" and events[-1]["signal"] == "SIGTERM"
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "_progress" not in p.parts)
    # neither the part, nor its temporary file, nor a marker: the batch's listing, which the retry scores, and the
    # shard's checkpoint, which holds every row: the retry only joins its segments
    assert left == ["_inputs.json"], left
    assert not list((out / "_progress").rglob(".*.tmp"))
    with capture_logs() as logs:
        merged = score(ScoreConfig(model=model, inputs=(str(articles),), out=out))
    [resumed] = [e for e in logs if e["event"] == "shard_resumed"]
    assert merged["complete"] and merged["invariant_holds"]
    assert resumed["rows_done"] == merged["rows_model"] > 0  # every row came from the checkpoint: none scored again
