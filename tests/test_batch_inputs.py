"""A batch's inputs are listed once (OUT/_inputs.json): shards that start apart, reruns and --force redos all score
their share of the same list, and nothing in an output directory mixes two batchings."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from investment_risk.cli import main
from investment_risk.core.atomic import KERNEL_ID
from investment_risk.core.errors import InputError, RetryableError
from investment_risk.datasets.readers import expand_inputs
from investment_risk.scoring.pipeline import ScoreConfig, score
from investment_risk.scoring.shard_metrics import merge_until_complete


def ids_out(out) -> Counter:
    return Counter(i for folder in (out, out / "rejects") for p in sorted(folder.glob("part-*.parquet"))
                   for i in pq.read_table(p, columns=["id"]).column("id").to_pylist())


def input_ids(folder) -> Counter:
    return Counter(i for p in sorted(folder.glob("*.parquet")) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist())


@pytest.fixture
def folder(articles, tmp_path):
    """The Parquet files of the shared articles, in a folder of this test's own."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.parquet", "b.parquet"):
        shutil.copy(articles / name, inputs / name)
    return inputs


def test_a_file_that_arrives_between_two_shards_starts_is_in_neither(exported, folder, tmp_path):
    # Each shard listed the inputs itself: shard 1 then took shard 0's share of a longer list (rows scored twice,
    # others never) and the merge called the batch complete.
    _, model, _ = exported
    out, expected = tmp_path / "out", input_ids(folder)
    score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=0, shard_count=2))
    pq.write_table(pq.read_table(folder / "a.parquet").slice(0, 20), folder / "0-late.parquet")
    merged = score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=1, shard_count=2))
    assert ids_out(out) == expected and merged["complete"] and merged["rows_in"] == sum(expected.values())
    assert len(json.loads((out / "_inputs.json").read_text())["units"]) == 4 + 3  # a's and b's row groups


def test_a_file_changed_after_the_listing_stops_its_shard_naming_it(exported, folder, tmp_path, runner, monkeypatch):
    _, model, _ = exported
    out = tmp_path / "out"
    score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=0, shard_count=2))
    pq.write_table(pq.read_table(folder / "b.parquet").slice(0, 10), folder / "b.parquet")
    result = runner.invoke(main, ["score", "--model", str(model), "--input", str(folder), "--out", str(out),
                                  "--shard-index", "1", "--shard-count", "2"])
    assert result.exit_code == 2 and f"{folder / 'b.parquet'}: changed since this batch listed it" in result.output
    # Other inputs into the same --out are another batch: refused, naming both; by the finished shard 0 too,
    # which answered "already done", exit 0, and never scored them
    for shard in ("1", "0"):
        result = runner.invoke(main, ["score", "--model", str(model), "--input", str(folder / "a.parquet"),
                                      "--out", str(out), "--shard-index", shard, "--shard-count", "2"])
        assert result.exit_code == 2 and "holds a batch of the inputs" in result.output, (shard, result.output)
    # the same inputs spelled otherwise, from another folder too, are the same batch
    for spelled, cwd in ((f"{folder}/", "/"), (folder.name, str(folder.parent))):
        monkeypatch.chdir(cwd)
        result = runner.invoke(main, ["score", "--model", str(model), "--input", spelled, "--out", str(out),
                                      "--shard-index", "0", "--shard-count", "2"])
        assert result.exit_code == 0 and "shard_skipped" in result.output, (spelled, result.output)
    # a batch listed from relative inputs is read by a shard run from another folder (its files listed whole)
    monkeypatch.chdir(folder.parent)
    score(ScoreConfig(model=model, inputs=(folder.name,), out=tmp_path / "rel", shard_index=0, shard_count=2))
    monkeypatch.chdir("/")
    merged = score(ScoreConfig(model=model, inputs=(str(folder),), out=tmp_path / "rel", shard_index=1, shard_count=2))
    assert merged["complete"] and ids_out(tmp_path / "rel") == input_ids(folder)


def test_force_with_a_smaller_shard_count_leaves_one_batch(exported, folder, tmp_path):
    _, model, _ = exported
    out, expected = tmp_path / "out", input_ids(folder)
    for shard in range(3):
        score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=shard, shard_count=3))
    score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=0, shard_count=2, force=True))
    assert not (out / "part-00002.parquet").exists() and not (out / "_done" / "part-00002").exists()
    # Shard 1 still holds the 3-shard batching: the merge Job must not call that done.
    with pytest.raises(RetryableError, match="scored with --shard-count"):
        merge_until_complete(out, expect_shards=2)
    merged = score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=1, shard_count=2, force=True))
    assert merged["complete"] and ids_out(out) == expected
    assert merge_until_complete(out, expect_shards=2)["rows_in"] == sum(expected.values())


def test_a_partial_batch_reports_no_drift(exported, folder, tmp_path, monkeypatch):
    _, model, _ = exported
    out = tmp_path / "out"
    partial = score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=0, shard_count=2))
    assert not partial["complete"] and "drift" not in partial
    # A merge Job waiting for the other shard says how far the batch is while it waits, not only when it gives up
    from functools import partial as bind_args

    from structlog.testing import capture_logs

    from investment_risk.core.logs import Progress
    from investment_risk.scoring import shard_metrics

    monkeypatch.setattr(shard_metrics, "Progress", bind_args(Progress, interval_s=0.05))
    with capture_logs() as logs, pytest.raises(RetryableError, match="1 of 2 shards are done"):
        merge_until_complete(out, expect_shards=2, wait_seconds=0.6, poll_seconds=0.1)
    waiting = [e for e in logs if e["event"] in ("progress", "progress_stopped") and e["what"] == "merge_wait"]
    assert waiting and all(e["done"] == 1 and e["total"] == 2 and e["rate"] == 0 for e in waiting)  # 1 done before
    assert waiting[-1]["event"] == "progress_stopped"  # it gave up: not "done"
    whole = score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=1, shard_count=2))
    assert whole["complete"] and set(whole["drift"]["psi"]) == set(partial["score_histograms"]) - {"edges"}


def test_a_skipped_shard_removes_every_temporary_file_a_killed_twin_left(exported, folder, tmp_path):
    _, model, _ = exported
    out = tmp_path / "out"
    config = ScoreConfig(model=model, inputs=(str(folder),), out=out)
    score(config)
    leftovers = [out / "metrics" / f".part-00000.json.{KERNEL_ID}-killed.tmp",
                 out / "metrics" / f".part-00000.prom.{KERNEL_ID}-killed.tmp",
                 out / "_done" / f".part-00000.{KERNEL_ID}-killed.tmp"]
    for path in leftovers:
        path.write_text("half")
    score(config)
    assert not [path for path in leftovers if path.exists()]


def test_one_file_named_twice_is_listed_once(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    files = expand_inputs([str(folder), "in/a.parquet", str(folder / "b.parquet")])
    assert sorted(os.path.realpath(f) for f in files) == sorted(os.path.realpath(folder / n) for n in ("a.parquet", "b.parquet"))


def test_a_files_footer_is_parsed_once_however_many_row_groups_it_has(exported, folder, tmp_path, monkeypatch):
    """Each unit parsed its file's whole footer (three times): a file of 3,000 row groups took 210 s to score,
    against 3.8 s for the same rows in one."""
    import pyarrow.parquet as parquet

    _, model, _ = exported
    table = pq.read_table(folder / "a.parquet")
    pq.write_table(table, folder / "a.parquet", row_group_size=4)  # 25 row groups
    parsed = []
    real = parquet.read_metadata
    monkeypatch.setattr(parquet, "read_metadata", lambda path, *a, **k: parsed.append(path) or real(path, *a, **k))
    merged = score(ScoreConfig(model=model, inputs=(str(folder / "a.parquet"),), out=tmp_path / "out"))
    assert merged["rows_in"] == table.num_rows and merged["invariant_holds"]
    assert len(parsed) == 1, parsed
    # rewritten in place, the file is parsed again: its footer is another
    pq.write_table(table, folder / "a.parquet", row_group_size=5)
    score(ScoreConfig(model=model, inputs=(str(folder / "a.parquet"),), out=tmp_path / "again"))
    assert len(parsed) == 2, parsed
    assert ids_out(tmp_path / "again") == ids_out(tmp_path / "out")


def test_a_listing_this_version_did_not_write_is_refused(exported, folder, tmp_path):
    _, model, _ = exported
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_inputs.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(InputError, match="not a batch listing"):
        score(ScoreConfig(model=model, inputs=(str(folder),), out=tmp_path / "out"))


def test_of_two_listings_racing_the_first_stays(tmp_path):
    from investment_risk.core.atomic import write_json_atomic

    write_json_atomic({"listed": "first"}, tmp_path / "_inputs.json", first_wins=True)
    write_json_atomic({"listed": "second"}, tmp_path / "_inputs.json", first_wins=True)
    assert json.loads((tmp_path / "_inputs.json").read_text()) == {"listed": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["_inputs.json"]  # no temporary file left


def test_scored_files_are_never_read_back_as_articles(exported, folder, tmp_path, runner):
    _, model, _ = exported
    # --out inside an input folder: tonight's batch would be whole, tomorrow's would read tonight's part files.
    result = runner.invoke(main, ["score", "--model", str(model), "--input", str(folder),
                                  "--out", str(folder / "scored" / "night-1")])
    assert result.exit_code == 2 and f"is inside the input folder {folder}: the next run would read" in result.output
    assert not (folder / "scored").exists()
    # An earlier night's output that a glob matches is named, not scored as articles (nor rejected row by row).
    score(ScoreConfig(model=model, inputs=(str(folder),), out=tmp_path / "nights" / "1"))
    pattern = str(tmp_path / "**" / "*.parquet")
    result = runner.invoke(main, ["score", "--model", str(model), "--input", pattern,
                                  "--out", str(tmp_path / "elsewhere" / "2")])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'nights' / '1' / 'part-00000.parquet'}: a scored file of the scoring output" in result.output
    assert not (tmp_path / "elsewhere" / "2" / "_inputs.json").exists()


def test_a_storage_hiccup_on_the_batchs_own_files_is_retried_not_failed(exported, folder, tmp_path, monkeypatch):
    # exit 2 is the Job's FailJob: an NFS EIO on the listing or the ledger must stay exit 1, as for an input file.
    import errno
    from pathlib import Path

    from investment_risk.scoring.ledger import read_ledger

    _, model, _ = exported
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    ledger.write_text("{}")
    score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=0, shard_count=2))
    real_read = Path.read_text

    def flaky(path, *args, **kwargs):
        if path.name in ("_inputs.json", "ledger.json"):
            raise OSError(errno.EIO, "Input/output error")
        return real_read(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", flaky)
    with pytest.raises(RetryableError, match="_inputs.json: I/O error while reading"):
        score(ScoreConfig(model=model, inputs=(str(folder),), out=out, shard_index=1, shard_count=2))
    with pytest.raises(RetryableError, match="ledger.json: I/O error while reading"):
        read_ledger(ledger, str(folder))
    monkeypatch.setattr(Path, "stat", lambda path, **kw: (_ for _ in ()).throw(OSError(errno.ESTALE, "Stale file handle")))
    with pytest.raises(RetryableError, match="a.parquet: I/O error while reading"):
        from investment_risk.scoring.batch_inputs import _check_unchanged
        _check_unchanged({"path": str(folder / "a.parquet"), "size": 1, "mtime_ns": 1}, "now")
