"""A shard stopped part-way reads on from its last checkpoint, and writes what one unbroken run writes."""

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from investment_risk.scoring.pipeline import ScoreConfig, ShardScorer, score
from investment_risk.scoring.progress import SeenIds

EXE = str(Path(sys.executable).parent / "investment-risk")
CHECKPOINTS = Path("_progress") / "part-00000"


class Crash(Exception):
    pass


def crash_after(monkeypatch, batches: int) -> list[int]:
    """Make the scorer fail once `batches` read batches are scored; returns the running count of scored batches."""
    scored = [0]
    original = ShardScorer._score_batch

    def scoring(self, item, *args):
        if scored[0] == batches:
            raise Crash()
        scored[0] += 1
        return original(self, item, *args)

    monkeypatch.setattr(ShardScorer, "_score_batch", scoring)
    return scored


def stopped_after_three_batches(exported, articles: Path, out: Path, monkeypatch) -> dict:
    """Score `articles` into `out` with a checkpoint after every read batch, failing after the third; returns the
    settings of that run."""
    _, model, _ = exported
    settings = {"model": model, "inputs": (str(articles),), "read_rows": 16, "checkpoint_seconds": 0}
    with monkeypatch.context() as patch:
        crash_after(patch, 3)
        with pytest.raises(Crash):
            score(ScoreConfig(out=out, **settings))
    return settings


def outputs(out: Path) -> tuple[pa.Table, pa.Table, dict]:
    metrics = json.loads((out / "metrics" / "part-00000.json").read_text())
    return pq.read_table(out / "part-00000.parquet"), pq.read_table(out / "rejects" / "part-00000.parquet"), metrics


@pytest.fixture()
def duplicated(articles, tmp_path) -> Path:
    """The articles, and a last file repeating an id of the first: a duplicate across a checkpoint."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in articles.iterdir():
        (folder / path.name).symlink_to(path)
    first = pq.read_table(articles / "a.parquet").slice(0, 1).to_pylist()[0]
    pq.write_table(pa.Table.from_pylist([{**first, "title": "the same id again"}]), folder / "z.parquet")
    return folder


def test_a_shard_stopped_part_way_reads_on_from_its_checkpoint(exported, duplicated, tmp_path, monkeypatch):
    _, model, _ = exported
    settings = {"model": model, "inputs": (str(duplicated),), "read_rows": 16, "checkpoint_seconds": 0}
    with monkeypatch.context() as patch:
        read_batches = crash_after(patch, -1)  # never
        whole = score(ScoreConfig(out=tmp_path / "whole", **settings))
    with monkeypatch.context() as patch:
        crash_after(patch, 5)
        with pytest.raises(Crash):
            score(ScoreConfig(out=tmp_path / "broken", **settings))
    state = json.loads((tmp_path / "broken" / CHECKPOINTS / "state.json").read_text())
    assert state["segments"] == [0, 1, 2, 3, 4] and not (tmp_path / "broken" / "_done").exists()
    with monkeypatch.context() as patch, capture_logs() as logs:
        scored = crash_after(patch, -1)  # never
        resumed = score(ScoreConfig(out=tmp_path / "broken", **settings))
    [event] = [e for e in logs if e["event"] == "shard_resumed"]
    assert event["segments"] == 5
    assert scored[0] == read_batches[0] - 5 > 0  # only what the checkpoint did not hold was scored again
    (part, rejects, metrics), (part_whole, rejects_whole, metrics_whole) = (outputs(tmp_path / "broken"),
                                                                            outputs(tmp_path / "whole"))
    assert part.drop(["signal_strength"]).equals(part_whole.drop(["signal_strength"]))
    assert part.column("id").to_pylist() == part_whole.column("id").to_pylist()
    assert rejects.equals(rejects_whole)
    assert any(r.startswith("duplicate id (first seen at ") and "a.parquet row 0" in r
               for r in rejects.column("reason").to_pylist())  # the id was scored before the checkpoint
    for key in ("rows_in", "rows_scored", "rows_rejected", "rows_model", "rows_prefiltered", "duplicate_ids",
                "tier_counts", "reject_reasons", "score_histograms", "batches", "mae", "invariant_holds"):
        assert metrics[key] == metrics_whole[key], key
    assert resumed["rows_in"] == whole["rows_in"] and metrics["seconds"] > 0
    assert not (tmp_path / "broken" / "_progress").exists()  # gone once the marker is in place


def test_a_checkpoint_of_other_work_is_not_used(exported, articles, tmp_path, monkeypatch):
    settings = stopped_after_three_batches(exported, articles, tmp_path / "out", monkeypatch)
    with capture_logs() as logs:  # other settings: the kept columns are part of what the rows hold
        score(ScoreConfig(out=tmp_path / "out", keep_columns=("title",), **settings))
    assert [e["event"] for e in logs if e["event"].startswith("shard_checkpoint_unused")] == ["shard_checkpoint_unused"]
    assert not [e for e in logs if e["event"] == "shard_resumed"]
    part = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert part.column("title").null_count == 0  # every row scored by this run, none from the other's segments


def test_a_damaged_checkpoint_starts_the_shard_afresh(exported, articles, tmp_path, monkeypatch):
    settings = stopped_after_three_batches(exported, articles, tmp_path / "out", monkeypatch)
    whole = score(ScoreConfig(out=tmp_path / "whole", **settings))
    segment = tmp_path / "out" / CHECKPOINTS / "seg-00001.parquet"
    segment.write_bytes(segment.read_bytes()[:100])  # cut short
    with capture_logs() as logs:
        merged = score(ScoreConfig(out=tmp_path / "out", **settings))
    assert [e for e in logs if e["event"] == "shard_checkpoint_unused"]
    assert merged["rows_scored"] == whole["rows_scored"] and merged["invariant_holds"]


def test_force_and_a_twin_score_without_the_checkpoint(exported, articles, tmp_path, monkeypatch):
    settings = stopped_after_three_batches(exported, articles, tmp_path / "out", monkeypatch)
    with capture_logs() as logs:
        score(ScoreConfig(out=tmp_path / "out", force=True, **settings))
    assert not [e for e in logs if e["event"] == "shard_resumed"]
    assert not (tmp_path / "out" / CHECKPOINTS).exists()
    # A twin (a replaced pod still running) holds the checkpoints: this scorer takes none and scores the shard whole.
    folder = tmp_path / "twin" / CHECKPOINTS
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with capture_logs() as logs:
            merged = score(ScoreConfig(out=tmp_path / "twin", **settings))
    finally:
        holder.kill()
        holder.wait()
    assert [e for e in logs if e["event"] == "shard_checkpoints_off"] and not (folder / "state.json").exists()
    assert merged["complete"] and merged["invariant_holds"]


def test_sigterm_takes_a_checkpoint_at_the_batchs_end_and_exits_1(exported, articles, tmp_path):
    """A stopped pod gets SIGTERM: the batch under way finishes, a checkpoint is taken, exit 1; the retry reads on."""
    _, model, _ = exported
    out = tmp_path / "out"
    args = [EXE, "--log-format", "json", "score", "--model", str(model), "--input", str(articles), "--out", str(out),
            "--checkpoint-seconds", "3600"]  # no checkpoint but the one SIGTERM asks for
    stopped = subprocess.run(args, capture_output=True, text=True, timeout=600, env={
        **os.environ, "_INVESTMENT_RISK_KILL_AT": "read_batch_scored:part-00000:2", "_INVESTMENT_RISK_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 1, stopped.stderr
    events = [json.loads(line) for line in stopped.stdout.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names[-1] == "terminated" and names.count("shard_checkpoint") == 1, names
    [checkpointed] = [e for e in events if e["event"] == "checkpointed_on_sigterm"]
    assert (checkpointed["unit"], checkpointed["batch"]) == (1, 1)  # the second row group: under way at SIGTERM
    state = json.loads((out / CHECKPOINTS / "state.json").read_text())
    assert state["segments"] == [0]
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "shard_resumed" in again.stdout and not (out / CHECKPOINTS).exists()


def test_checkpoints_of_a_larger_shard_count_and_a_lockless_filesystem_leave_nothing(exported, articles, tmp_path,
                                                                                      monkeypatch):
    import errno

    from investment_risk.core import atomic

    _, model, _ = exported
    settings = {"model": model, "inputs": (str(articles),), "read_rows": 16, "checkpoint_seconds": 0}
    with monkeypatch.context() as patch:  # shard 2 of 3 stopped part-way, then the batch redone as 2 shards
        crash_after(patch, 2)
        with pytest.raises(Crash):
            score(ScoreConfig(out=tmp_path / "out", shard_index=2, shard_count=3, **settings))
    assert (tmp_path / "out" / "_progress" / "part-00002" / "state.json").exists()
    for shard in (0, 1):
        merged = score(ScoreConfig(out=tmp_path / "out", shard_index=shard, shard_count=2, **settings))
    assert merged["complete"] and not (tmp_path / "out" / "_progress").exists()

    def no_locks(fd, wait):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(atomic, "_set_lock", no_locks)
    with capture_logs() as logs:
        merged = score(ScoreConfig(out=tmp_path / "lockless", **settings))
    assert [e for e in logs if e["event"] == "shard_checkpoints_off"] and merged["complete"]
    assert not (tmp_path / "lockless" / "_progress").exists()


def test_seen_ids_keep_each_place_and_hand_each_id_to_one_checkpoint():
    seen = SeenIds()
    seen.add("a", "x.parquet", 0)
    seen.add("b", "y.jsonl", 2**40 - 1)  # the largest row the packing holds
    with pytest.raises(ValueError, match="y.jsonl: row 1099511627776 is beyond"):
        seen.add("c", "y.jsonl", 2**40)  # would have run into the file's bits
    first = seen.take_fresh()
    seen.add("c", "x.parquet", 7)
    assert first.to_pydict() == {"id": ["a", "b"], "file": ["x.parquet", "y.jsonl"], "row": [0, 2**40 - 1]}
    assert seen.take_fresh().to_pydict() == {"id": ["c"], "file": ["x.parquet"], "row": [7]}
    assert seen.take_fresh().num_rows == 0
    resumed = SeenIds()
    resumed.load(pa.concat_tables([first, pa.table({"id": ["c"], "file": ["x.parquet"], "row": [7]})]))
    assert ("b" in resumed, "z" in resumed, resumed.where("b")) == (True, False, f"y.jsonl row {2**40 - 1}")
    assert resumed.take_fresh().num_rows == 0  # what a checkpoint held is not written again
    resumed.add("d", "z.parquet", 3)
    assert resumed.take_fresh().column("id").to_pylist() == ["d"]


def test_seen_ids_hold_a_big_shards_ids_in_little_memory():
    """One entry per scored row stays in memory for the whole shard: the place may not cost a string per row."""
    ids = [f"article-{i:08d}" for i in range(50_000)]
    tracemalloc.start()
    try:
        seen = SeenIds()
        for i, id_ in enumerate(ids):
            seen.add(id_, f"part-{i // 10_000:05d}.parquet", i)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / len(ids) < 100  # bytes an entry, the id's own string aside (a string place and a list: ~180)
