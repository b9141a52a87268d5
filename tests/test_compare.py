import json

import pytest

from investment_risk.cli import main
from investment_risk.core.spec import DIMENSIONS
from investment_risk.training.config import TrainConfig
from investment_risk.training.recipe import train

from .conftest import assert_json_stdout


@pytest.fixture(scope="module")
def two_runs(split_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for name, lr in (("slow", 1e-4), ("fast", 3e-3)):
        train(TrainConfig(mode="distillation", base_model="tiny-qwen2", data=str(split_dir), out=str(root / name),
                          epochs=1, batch_size=8, learning_rate=lr, max_length=48, warmup_steps=1, device="cpu"))
    return root / "slow", root / "fast"


def test_compare_writes_tables_and_plots(two_runs, tmp_path, runner):
    a, b = two_runs
    result = runner.invoke(main, ["report", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "cmp"
    for png in ("mode_comparison_mae.png", "mode_comparison_per_dimension.png", "mode_comparison_improvement.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "comparison_report.md").read_text()
    for row in ("| val MAE |", "| val RMSE |", "| max tokens | 48 | 48 |", "| train/val gap (MAE) |", "| dimensions won |",
                "| winner |"):
        assert row in report, row
    for dim in DIMENSIONS:
        assert f"| {dim} |" in report
    mae = {name: json.loads((run / "training_metadata.json").read_text())["best_val_mae"]
           for name, run in (("A", a), ("B", b))}
    expected = "A" if mae["A"] < mae["B"] else "B"
    [event] = [e for e in assert_json_stdout(result) if e["event"] == "comparison_written"]
    assert event["winner"] == expected


def test_compare_needs_finished_runs(two_runs, tmp_path, runner):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["report", "compare", str(two_runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a finished training run" in result.output


def test_a_damaged_or_diverged_run_is_named_not_a_traceback_or_a_tie(two_runs, tmp_path, runner):
    import shutil

    for name, history in (("empty", []), ("partial", [{"epoch": 1, "train": {}, "val": {}}]),
                          ("diverged", "nan")):
        run = tmp_path / name
        shutil.copytree(two_runs[1], run)
        if history == "nan":  # what a run that diverged wrote before training stopped on it
            history = json.loads((run / "training_history.json").read_text())
            history[0]["val"]["mae"] = float("nan")
        (run / "training_history.json").write_text(json.dumps(history))
        result = runner.invoke(main, ["report", "compare", str(two_runs[0]), str(run), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "training_history.json" in result.output and "Traceback" not in result.output, \
            result.output
    result = runner.invoke(main, ["report", "compare", str(two_runs[0]), str(tmp_path / "diverged"), "--out",
                                  str(tmp_path / "o")])
    assert "epoch 1 has no finite val mae" in result.output


def test_compare_says_when_the_runs_were_validated_on_different_splits(two_runs, tmp_path, runner):
    # "Winner by val MAE" over two different val sets was declared without a caveat.
    import shutil

    a, b = two_runs
    result = runner.invoke(main, ["report", "compare", str(a), str(b), "--out", str(tmp_path / "same")])
    [event] = [e for e in assert_json_stdout(result) if e["event"] == "comparison_written"]
    assert event["same_val_split"] is True
    report = (tmp_path / "same" / "comparison_report.md").read_text()
    assert "| val MAE, calibrated (in-sample) |" in report and "Not like for like" not in report
    # and how far each run's raw scores are from calibrated, as training recorded it (these runs' val splits are
    # too small to fit a calibration: n/a; one that fitted it shows its figure)
    assert "| val calibration error, raw | n/a | n/a |" in report
    fitted = tmp_path / "fitted"
    shutil.copytree(a, fitted)
    metadata = json.loads((fitted / "training_metadata.json").read_text())
    metadata["calibration"] = {"fitted": True, "val_mae_calibrated": 0.5, "val_calibration_error_raw": 0.4321}
    (fitted / "training_metadata.json").write_text(json.dumps(metadata))
    runner.invoke(main, ["report", "compare", str(fitted), str(b), "--out", str(tmp_path / "fitted-cmp")])
    assert "| val calibration error, raw | 0.4321 | n/a |" in (tmp_path / "fitted-cmp" / "comparison_report.md").read_text()
    other = tmp_path / "other"
    shutil.copytree(b, other)
    config = json.loads((other / "training_config.json").read_text())
    config["data_sha256"]["val"] = "0" * 64  # validated on another split
    (other / "training_config.json").write_text(json.dumps(config))
    result = runner.invoke(main, ["report", "compare", str(a), str(other), "--out", str(tmp_path / "differ")])
    assert result.exit_code == 0, result.output
    events = {e["event"]: e for e in assert_json_stdout(result)}
    assert events["comparison_written"]["same_val_split"] is False and "comparison_not_like_for_like" in events
    assert "Not like for like" in (tmp_path / "differ" / "comparison_report.md").read_text()


def test_a_run_recalibrated_since_training_shows_no_stale_calibrated_figure(two_runs, tmp_path, runner):
    import shutil

    a, b = two_runs
    refit = tmp_path / "refit"
    shutil.copytree(b, refit)
    meta = json.loads((refit / "training_metadata.json").read_text())
    meta["calibration"] = {**(meta.get("calibration") or {}), "fitted": True, "val_mae_calibrated": 1.2345}
    (refit / "training_metadata.json").write_text(json.dumps(meta))
    result = runner.invoke(main, ["report", "compare", str(a), str(refit), "--out", str(tmp_path / "before")])
    assert result.exit_code == 0 and "1.2345" in (tmp_path / "before" / "comparison_report.md").read_text()
    meta["recalibrated"] = {"data": "later.parquet", "rows": 40}  # what `calibrate` records
    (refit / "training_metadata.json").write_text(json.dumps(meta))
    result = runner.invoke(main, ["report", "compare", str(a), str(refit), "--out", str(tmp_path / "after")])
    report = (tmp_path / "after" / "comparison_report.md").read_text()
    assert result.exit_code == 0 and "1.2345" not in report, report
    assert "B's calibration was refit since training (`calibrate` on `later.parquet`)" in report
