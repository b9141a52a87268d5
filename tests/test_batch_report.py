"""`report batch`: one self-contained HTML page, rendered in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from investment_risk.cli import main
from investment_risk.scoring.pipeline import ScoreConfig, score

from .conftest import assert_json_stdout


def render_dom(page) -> str:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's package (as root)")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_batch_page_shows_the_numbers_of_metrics_json(exported, split_dir, tmp_path, runner):
    _, model, _ = exported
    score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"), str(split_dir / "val.parquet")),
                      out=tmp_path / "batch"))
    result = runner.invoke(main, ["report", "batch", "--scored", str(tmp_path / "batch"), "--out",
                                  str(tmp_path / "report"), "--top-k", "5"])
    assert result.exit_code == 0, result.output
    assert [e["event"] for e in assert_json_stdout(result)] == ["batch_report_written"]
    page = tmp_path / "report" / "batch_report.html"
    source = page.read_text()
    assert "http://" not in source and "https://" not in source  # self-contained: nothing to fetch
    assert len(re.findall(r'src="data:image/png;base64,', source)) == 2
    dom = render_dom(page)
    merged = json.loads((tmp_path / "batch" / "metrics.json").read_text())
    cells = re.findall(r"<td>([^<]*)</td>", dom)
    for key in ("rows_in", "rows_scored", "rows_rejected", "rows_prefiltered"):
        assert str(merged[key]) in cells, key
    for tier, count in merged["tier_counts"].items():
        assert tier in cells and str(count) in cells
    for dim, value in merged["drift"]["psi"].items():
        assert dim in cells and (value is None or f"{value:.4f}" in cells)
    assert dom.count("<tr>") >= 5 + 1 and "Top 5 by signal strength" in dom


def test_report_batch_refuses_what_is_not_a_scored_directory(split_dir, tmp_path, runner):
    result = runner.invoke(main, ["report", "batch", "--scored", str(split_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a scoring output directory" in result.output


def test_a_broken_part_file_is_named_not_a_traceback(exported, articles, tmp_path, runner):
    from investment_risk.scoring.pipeline import ScoreConfig, score

    _, model, _ = exported
    score(ScoreConfig(model=model, inputs=(str(articles / "a.parquet"),), out=tmp_path / "scored"))
    (tmp_path / "scored" / "part-00000.parquet").write_bytes(b"junk")
    result = runner.invoke(main, ["report", "batch", "--scored", str(tmp_path / "scored"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "part-00000.parquet: not a readable part file" in result.output, result.output


def test_a_partial_or_damaged_batch_is_reported_as_such(exported, split_dir, tmp_path, runner):
    _, model, _ = exported
    out = tmp_path / "partial"
    score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=out, shard_index=0, shard_count=2))
    result = runner.invoke(main, ["report", "batch", "--scored", str(out), "--out", str(tmp_path / "r1")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r1" / "batch_report.html").read_text()
    assert "the batch is incomplete (1 of 2 shards done)" in page and "No reference in this model" not in page
    # report drift measures whole batches only, as the merge does
    result = runner.invoke(main, ["report", "drift", "--reference", str(model), "--current", str(out),
                                  "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "the batch is incomplete (1 of 2 shards done)" in result.output, result.output
    # A shard's metrics file gone: the page would count its rows and leave out its articles without a word
    (out / "metrics" / "part-00000.json").rename(tmp_path / "kept.json")
    result = runner.invoke(main, ["report", "batch", "--scored", str(out), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "part-00000.json: missing, though metrics.json counts shard 0" in result.output
    (tmp_path / "kept.json").rename(out / "metrics" / "part-00000.json")
    # A part file gone: the page would count rows no file holds
    (out / "part-00000.parquet").unlink()
    result = runner.invoke(main, ["report", "batch", "--scored", str(out), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "part-00000.parquet: missing" in result.output, result.output
    # A damaged metrics.json: one line, exit 2 (a KeyError or TypeError traceback, exit 1, before)
    metrics = json.loads((out / "metrics.json").read_text())
    for damage in ({"rows_scored": None}, {"tier_counts": {"RED": "5"}}, {"model_versions": 5},
                   {"shards_done": ["0"]}):
        (out / "metrics.json").write_text(json.dumps({**metrics, **damage}))
        for args in (["batch", "--scored", str(out), "--out", str(tmp_path / "r3")],
                     ["drift", "--reference", str(model), "--current", str(out), "--out", str(tmp_path / "d3")]):
            result = runner.invoke(main, ["report", *args])
            assert result.exit_code == 2 and "not a merged metrics file" in result.output, (damage, args, result.output)


def test_the_page_lists_only_the_shards_the_merge_counted_and_says_why_drift_is_missing(exported, split_dir, tmp_path,
                                                                                      runner):
    # A --force redo with another --shard-count, part-way: parts of both counts in OUT. The top list read every
    # part file and showed articles twice; a night the model scored no row of said "No reference in this model".
    import pyarrow.parquet as pq

    _, model, _ = exported
    out = tmp_path / "mixed"
    inputs = (str(split_dir / "test.parquet"),)
    for index in (0, 1):
        score(ScoreConfig(model=model, inputs=inputs, out=out, shard_index=index, shard_count=2))
    shutil.copy(out / "part-00000.parquet", out / "part-00002.parquet")  # a shard of 3 (its marker never written)
    metrics = json.loads((out / "metrics" / "part-00000.json").read_text())
    (out / "metrics" / "part-00002.json").write_text(json.dumps({**metrics, "shard": 2, "shard_count": 3}))
    rows = sum(pq.read_table(out / f"part-0000{i}.parquet").num_rows for i in (0, 1))
    result = runner.invoke(main, ["report", "batch", "--scored", str(out), "--out", str(tmp_path / "r"),
                                  "--top-k", str(rows + 50)])
    assert result.exit_code == 0, result.output
    ids = re.findall(r"<tr><td>([^<]*)</td><td>(?:RED|YELLOW|GREEN|BLUE|NOISE)</td>",
                     (tmp_path / "r" / "batch_report.html").read_text())
    assert ids and len(ids) == len(set(ids)), ids
    # every row prefiltered: the model has a reference, it just scored nothing
    noise = tmp_path / "noise.jsonl"
    noise.write_text("".join(json.dumps({"id": str(i), "title": "This coin is going to the moon", "content": "Get in now."})
                             + "\n" for i in range(3)))
    score(ScoreConfig(model=model, inputs=(str(noise),), out=tmp_path / "noise"))
    result = runner.invoke(main, ["report", "batch", "--scored", str(tmp_path / "noise"), "--out", str(tmp_path / "n")])
    page = (tmp_path / "n" / "batch_report.html").read_text()
    assert result.exit_code == 0 and "No reference in this model" not in page
    assert "the model scored no row of the batch" in page
