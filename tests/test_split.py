import json
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from investment_risk.core.errors import ConfigError, InputError
from investment_risk.datasets.split import SplitConfig, content_key, deduplicate, run_split

from .conftest import article_rows


def test_split_is_deterministic_disjoint_and_deduplicated(tmp_path, synth_parquet):
    summary = run_split([str(synth_parquet)], tmp_path / "a", SplitConfig(seed=1))
    run_split([str(synth_parquet)], tmp_path / "b", SplitConfig(seed=1))
    parts = {}
    for name in ("train", "val", "test"):
        a, b = pq.read_table(tmp_path / "a" / f"{name}.parquet"), pq.read_table(tmp_path / "b" / f"{name}.parquet")
        assert a.equals(b)
        parts[name] = a
    ids = [set(t.column("id").to_pylist()) for t in parts.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    keys = [{content_key(t_, c) for t_, c in zip(t.column("title").to_pylist(), t.column("content").to_pylist())}
            for t in parts.values()]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    n = sum(len(s) for s in ids)
    assert n == summary["rows_unique"] == summary["rows_in"] - sum(summary["dropped"].values())
    assert summary["dropped"]["duplicate_content"] > 0
    assert summary["rows"]["val"] == round(n * 0.1) and summary["rows"]["test"] == round(n * 0.1)
    assert json.loads((tmp_path / "a" / "split_summary.json").read_text()) == summary
    other = run_split([str(synth_parquet)], tmp_path / "c", SplitConfig(seed=2))
    assert pq.read_table(tmp_path / "c" / "val.parquet").column("id") != parts["val"].column("id")
    assert other["rows"] == summary["rows"]


def test_split_does_not_depend_on_input_order(tmp_path, synth_table):
    pq.write_table(synth_table, tmp_path / "fwd.parquet")
    pq.write_table(synth_table.take(pa.array(range(synth_table.num_rows - 1, -1, -1))), tmp_path / "rev.parquet")
    run_split([str(tmp_path / "fwd.parquet")], tmp_path / "f", SplitConfig())
    run_split([str(tmp_path / "rev.parquet")], tmp_path / "r", SplitConfig())
    assert (pq.read_table(tmp_path / "f" / "test.parquet").column("id").to_pylist()
            == pq.read_table(tmp_path / "r" / "test.parquet").column("id").to_pylist())


def test_near_duplicates_share_a_content_key():
    assert content_key("Title", "Credit spreads widen, sharply.") == content_key("TITLE ", "credit  spreads widen ,sharply")
    assert content_key("Title", "Credit spreads widen.") != content_key("Title", "Credit spreads narrow.")


def test_republished_copies_share_a_content_key_and_teasers_do_not():
    body = "Credit spreads on high-yield bonds widened sharply as investors priced in a slower economy. " * 3
    decomposed = "Régulateurs: " + body  # the same text in NFD (é as e + a combining accent) and in NFC
    assert content_key("Bonds slide", unicodedata.normalize("NFD", decomposed)) == content_key(
        "Bonds slide", unicodedata.normalize("NFC", decomposed))
    assert content_key("Bonds slide", body) == content_key("UPDATE 1-Bonds slide further", body)  # a new headline
    teaser = "Click to read more."  # a short body names no article: its title does
    assert content_key("Fed holds rates", teaser) != content_key("ECB cuts rates", teaser)


def test_which_copy_of_an_id_survives_does_not_depend_on_order_and_each_drop_is_recorded():
    rows = article_rows(4)
    rows.append({**rows[1], "content": "A different body.", "macro_risk_severity": 9.0})
    with capture_logs() as logs:
        forward, dropped = deduplicate(pa.Table.from_pylist(rows))
    assert [(e["ids"], e["count"]) for e in logs if e["event"] == "conflicting_labels"] == [(["a1"], 1)]
    backward, _ = deduplicate(pa.Table.from_pylist(rows[::-1]))
    assert forward.num_rows == 4 and forward.to_pylist() == backward.to_pylist()
    assert dropped == [{"id": "a1", "reason": "duplicate_id", "kept_id": "a1"}]


def test_appending_rows_moves_only_a_few_old_ones(tmp_path, synth_table):
    before, after = tmp_path / "before.parquet", tmp_path / "after.parquet"
    pq.write_table(synth_table.slice(0, synth_table.num_rows - 5), before)
    pq.write_table(synth_table, after)  # five more articles
    run_split([str(before)], tmp_path / "a", SplitConfig())
    run_split([str(after)], tmp_path / "b", SplitConfig())

    def places(root):
        return {i: name for name in ("train", "val", "test")
                for i in pq.read_table(root / f"{name}.parquet").column("id").to_pylist()}
    old, new = places(tmp_path / "a"), places(tmp_path / "b")
    moved = [i for i in old if new[i] != old[i]]
    assert len(moved) <= 4, moved  # a shuffle of all rows moved about a third of them


def test_a_rerun_cut_short_leaves_files_that_training_refuses(tmp_path, synth_parquet, runner, exported):
    from investment_risk.cli import main

    run_split([str(synth_parquet)], tmp_path / "d", SplitConfig(seed=42))
    run_split([str(synth_parquet)], tmp_path / "other", SplitConfig(seed=7))
    # the seed-7 rerun into d was stopped after its train.parquet: the same articles are now in train and val
    (tmp_path / "d" / "train.parquet").write_bytes((tmp_path / "other" / "train.parquet").read_bytes())
    result = runner.invoke(main, ["train", "--base-model", "tiny-qwen2", "--data", str(tmp_path / "d"),
                                  "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2 and "train.parquet: not the file" in result.output, result.output
    for command in ("evaluate", "calibrate"):
        result = runner.invoke(main, [command, "--model", str(exported[1]), "--data", str(tmp_path / "d" / "train.parquet")])
        assert result.exit_code == 2 and "train.parquet: not the file" in result.output, (command, result.output)


def test_the_split_records_what_it_dropped_and_reads_no_metadata_as_input(tmp_path, synth_parquet, runner):
    from investment_risk.cli import main

    summary = run_split([str(synth_parquet)], tmp_path / "d", SplitConfig())
    dropped = pq.read_table(tmp_path / "d" / "_dropped.parquet").to_pylist()
    assert len(dropped) == sum(summary["dropped"].values()) > 0
    assert {d["reason"] for d in dropped} <= {"duplicate_id", "duplicate_content"} and all(d["kept_id"] for d in dropped)
    # A split folder read as input: split_summary.json and _dropped.parquet are not articles
    again = run_split([str(tmp_path / "d")], tmp_path / "again", SplitConfig())
    assert again["rows_in"] == summary["rows_unique"]
    # An --out inside the input folder: a rerun would read the split it wrote
    result = runner.invoke(main, ["data", "split", "--input", str(tmp_path / "d"), "--out", str(tmp_path / "d" / "s")])
    assert result.exit_code == 2 and "is inside the input folder" in result.output, result.output


def test_files_whose_columns_clash_are_named(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist([{**r, "extra": 1} for r in article_rows(20)]), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({**r, "extra": "x"}) + "\n"
                                                     for r in article_rows(20, start=20)))
    with pytest.raises(InputError, match=r"a.parquet and .*b.jsonl disagree on column 'extra' \(int64 vs string\)"):
        run_split([str(tmp_path / "in")], tmp_path / "o", SplitConfig())


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.0), (0.0, 0.1)])  # train needs a val split
def test_bad_fractions(val, test):
    with pytest.raises(ConfigError):
        SplitConfig(val=val, test=test)


def test_too_few_rows(tmp_path):
    pq.write_table(pa.Table.from_pylist(article_rows(3)), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="too few"):
        run_split([str(tmp_path / "x.parquet")], tmp_path / "o", SplitConfig())


def test_unlabelled_input_is_refused(tmp_path):
    pq.write_table(pa.Table.from_pylist(article_rows(30, labels=False)), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="missing required column"):
        run_split([str(tmp_path / "x.parquet")], tmp_path / "o", SplitConfig())
    assert not (tmp_path / "o").exists()
