import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


def test_duplicate_ids_keep_the_first_and_are_counted():
    rows = article_rows(4)
    rows.append({**rows[1], "content": "A different body."})
    table, dropped = deduplicate(pa.Table.from_pylist(rows))
    assert table.num_rows == 4 and dropped == {"duplicate_id": 1, "duplicate_content": 0}
    assert table.column("content").to_pylist()[1] == rows[1]["content"]


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.0)])
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
