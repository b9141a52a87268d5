"""The incremental ledger: nightly batches score every article exactly once, a failed night leaves the ledger alone."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from investment_risk.cli import main
from investment_risk.datasets.synth import SynthConfig, generate
from investment_risk.scoring.pipeline import ScoreConfig, score


def articles(seed: int, rows: int, prefix: str) -> pa.Table:
    table = generate(SynthConfig(rows=rows, seed=seed))
    return table.set_column(table.column_names.index("id"), "id",
                            pa.array([f"{prefix}-{i}" for i in range(rows)], type=pa.string()))


def night(model, incoming, out, ledger, shards=(0, 1)):
    for shard in shards:
        score(ScoreConfig(model=model, inputs=(str(incoming),), out=out, shard_index=shard, shard_count=2, ledger=ledger))
    return json.loads((out / "metrics.json").read_text())


def scored_ids(out) -> list[str]:
    return [i for p in sorted(out.glob("part-*.parquet")) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def nightly_dirs(root) -> tuple:
    """The incoming folder, the scored root and its ledger, as the nightly CronJob lays them out."""
    incoming, scored = root / "incoming", root / "scored"
    incoming.mkdir()
    return incoming, scored, scored / "ledger.json"


def test_three_nights_and_a_failed_one_score_every_article_exactly_once(exported, tmp_path):
    _, model, _ = exported
    incoming, scored, ledger = nightly_dirs(tmp_path)
    pq.write_table(articles(1, 30, "a"), incoming / "a.parquet", row_group_size=10)
    pq.write_table(articles(2, 20, "b"), incoming / "b.parquet")
    first = night(model, incoming, scored / "night-1", ledger)
    assert first["complete"] and first["rows_in"] == 50 and first["ledger"]["added"] == 4  # 3 row groups + 1
    pq.write_table(articles(3, 15, "c"), incoming / "c.parquet")
    before = ledger.read_bytes()
    failed = night(model, incoming, scored / "night-2", ledger, shards=(0,))  # shard 1 never finishes
    assert not failed["complete"] and ledger.read_bytes() == before  # the ledger waits for a whole night
    pq.write_table(articles(4, 12, "d"), incoming / "d.parquet")
    pq.write_table(articles(5, 8, "a2"), incoming / "a.parquet")  # rewritten in place: new content, new units
    third = night(model, incoming, scored / "night-3", ledger)
    assert third["complete"] and third["rows_in"] == 15 + 12 + 8
    fourth = night(model, incoming, scored / "night-4", ledger)
    assert fourth["complete"] and fourth["rows_in"] == 0  # nothing new arrived
    complete_nights = [scored / n for n in ("night-1", "night-3", "night-4")]
    counts = Counter(i for out in complete_nights for i in scored_ids(out))
    expected = {f"a-{i}" for i in range(30)} | {f"b-{i}" for i in range(20)} | {f"c-{i}" for i in range(15)} | \
        {f"d-{i}" for i in range(12)} | {f"a2-{i}" for i in range(8)}
    assert set(counts) == expected and set(counts.values()) == {1}


def test_a_shard_redone_after_its_night_was_recorded_scores_its_units_again(exported, tmp_path):
    # The night is complete and in the ledger; then a part file loses rows. The rerun must score that shard's
    # units again, although the ledger lists them: against the ledger alone it would find nothing new.
    _, model, _ = exported
    incoming, scored, ledger = nightly_dirs(tmp_path)
    pq.write_table(articles(1, 30, "a"), incoming / "a.parquet", row_group_size=10)
    night(model, incoming, scored / "night-1", ledger)
    part = scored / "night-1" / "part-00000.parquet"
    kept = pq.read_table(part)
    pq.write_table(kept.slice(0, 2), part)
    for force in (False, True):  # the broken shard found by the rerun, then the same shard redone on purpose
        score(ScoreConfig(model=model, inputs=(str(incoming),), out=scored / "night-1", shard_index=0, shard_count=2,
                          ledger=ledger, force=force))
        merged = json.loads((scored / "night-1" / "metrics.json").read_text())
        assert merged["complete"] and merged["invariant_holds"] and merged["rows_in"] == 30, merged
        assert sorted(scored_ids(scored / "night-1")) == sorted(f"a-{i}" for i in range(30))
    assert night(model, incoming, scored / "night-2", ledger)["rows_in"] == 0  # and still nothing new after it


def test_a_bad_ledger_stops_with_exit_2_naming_it(exported, tmp_path, runner):
    _, model, _ = exported
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pq.write_table(articles(1, 5, "x"), incoming / "x.parquet")
    ledger = tmp_path / "ledger.json"
    ledger.write_text("{not json")
    args = ["score", "--model", str(model), "--input", str(incoming), "--out", str(tmp_path / "out"), "--ledger", str(ledger)]
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and str(ledger) in result.output and "not a readable ledger" in result.output
    ledger.write_text(json.dumps({"format": 1, "input_root": "/elsewhere", "units": []}))
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "/elsewhere" in result.output
    # the same folder spelled otherwise (a trailing slash, relative) is the same input root
    ledger.write_text(json.dumps({"format": 1, "input_root": f"{incoming}/", "units": []}))
    assert runner.invoke(main, args).exit_code == 0
    assert json.loads(ledger.read_text())["input_root"] == f"{incoming}/"  # as it was first recorded
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_the_nightly_cronjob_scores_incrementally():
    from investment_risk.k8s.manifests import NIGHTLY_LEDGER, default_base

    cronjob = default_base()["nightly-cronjob.yaml"][0]
    args = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--ledger") + 1] == NIGHTLY_LEDGER and NIGHTLY_LEDGER.startswith("/data/scored/")


def test_a_redo_cut_short_after_its_night_was_recorded_still_scores_its_units(exported, tmp_path, monkeypatch):
    # The redo (--force) removes the marker before it scores; cut short there, its retry has no marker to say it
    # is a redo, and against the ledger (which lists the night by now) it found nothing and wrote an empty part.
    from investment_risk.scoring import pipeline

    _, model, _ = exported
    incoming, scored, ledger = nightly_dirs(tmp_path)
    pq.write_table(articles(1, 30, "a"), incoming / "a.parquet", row_group_size=10)
    night(model, incoming, scored / "night-1", ledger)
    config = ScoreConfig(model=model, inputs=(str(incoming),), out=scored / "night-1", shard_index=0, shard_count=2,
                         ledger=ledger)

    def preempted(*args, **kwargs):
        raise RuntimeError("preempted")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.ShardScorer, "_score_batch", preempted)
        with pytest.raises(RuntimeError):
            score(replace(config, force=True))
    merged = score(config)
    assert merged["complete"] and merged["rows_in"] == 30
    assert sorted(scored_ids(scored / "night-1")) == sorted(f"a-{i}" for i in range(30))


def test_a_root_recorded_as_typed_by_the_previous_version_is_the_same_root(tmp_path, monkeypatch):
    """Shards and ledgers of the previous version hold the --input specs as typed; the merge of such a batch raised
    "it records the input 'in7', not 'in7'"."""
    from investment_risk.scoring.ledger import input_root, record_units, same_root

    (tmp_path / "in7").mkdir()
    monkeypatch.chdir(tmp_path)
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"format": 1, "input_root": "in7", "units": []}))
    assert record_units(ledger, "in7", []) == 0 and record_units(ledger, input_root(["in7/"]), []) == 0
    assert same_root("in7", str(tmp_path / "in7")) and not same_root("in8", str(tmp_path / "in7"))

