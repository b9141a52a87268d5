import json

from investment_risk.cli import main

from .conftest import assert_json_stdout


def test_demo_runs_the_whole_loop(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(main, ["--log-format", "json", "demo", "--out", str(out), "--base-model", "tiny-qwen2",
                                  "--rows", "120", "--batch-rows", "150", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    for name in ("articles.parquet", "data/train.parquet", "run/training_metadata.json", "model/model.onnx",
                 "scored/part-00000.parquet", "scored/metrics.json", "evaluation.json", "demo_report.md"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "scored" / "metrics.json").read_text())
    assert metrics["rows_in"] == 150 and metrics["invariant_holds"]
    events = assert_json_stdout(result)
    # Each line names the demo's stage it came from; only the scoring stage's lines carry a shard
    assert {e["stage"] for e in events if e["event"] == "shard_done"} == {"demo:score"}
    assert all(("shard" in e) == (e["stage"] == "demo:score") for e in events), \
        [(e["event"], e["stage"]) for e in events if ("shard" in e) != (e["stage"] == "demo:score")]
    [event] = [e for e in events if e["event"] == "demo_summary"]
    lines = event["lines"]
    assert any(line.startswith("val MAE") and "(raw, every row)" in line and "predict-the-mean" in line for line in lines)
    assert any("rows/s" in line and "tiers:" in line for line in lines)
    assert any(line.startswith("scored ") and str(out / "scored") in line for line in lines)
    report = (out / "demo_report.md").read_text()
    assert "| test MAE" in report and str(out / "model") in report

    first = json.loads((out / "run" / "training_metadata.json").read_text())
    # Again with more rows: the run in its folder was trained on other data, so it starts again, not resumes.
    again = runner.invoke(main, ["--log-format", "json", "demo", "--out", str(out), "--base-model", "tiny-qwen2",
                                 "--rows", "160", "--batch-rows", "150", "--epochs", "1"])
    assert again.exit_code == 0, again.output
    [restarted] = [e for e in assert_json_stdout(again) if e["event"] == "demo_run_restarted"]
    assert "was trained on other data" in restarted["reason"]
    second = json.loads((out / "run" / "training_metadata.json").read_text())
    assert second["train_examples"] > first["train_examples"]


def test_demo_refuses_a_base_model_that_is_not_here_before_any_work(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(main, ["demo", "--out", str(out), "--base-model", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not found offline" in result.output, result.output
    assert not out.exists()
