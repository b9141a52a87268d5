"""What export refuses before it writes, and what it holds reduced-precision graphs to (from an audit)."""

import json
import shutil
import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from investment_risk.cli import main
from investment_risk.core.atomic import locked_dir, write_dir_atomic
from investment_risk.core.errors import InputError


def test_out_over_or_inside_the_run_is_refused_and_the_run_kept(exported, tmp_path, runner, monkeypatch):
    run, _, _ = exported
    parent = tmp_path / "parent"
    shutil.copytree(run, parent / "run")
    for out in (parent, parent / "run", parent / "run" / "model"):
        result = runner.invoke(main, ["export", "--run", str(parent / "run"), "--out", str(out), "--force"])
        assert result.exit_code == 2 and "training run" in result.output, result.output
    assert (parent / "run" / "training_metadata.json").exists()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["export", "--run", str(run), "--out", ".", "--force"])
    assert result.exit_code == 2 and "working directory" in result.output, result.output


def test_force_replaces_an_exported_model_only(exported, tmp_path, runner):
    run, _, _ = exported
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    result = runner.invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "notes"), "--force"])
    assert result.exit_code == 2 and "holds no model.json" in result.output, result.output
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_cpu_engine_with_a_reduced_dtype_is_refused(exported, tmp_path, runner):
    run, _, _ = exported
    result = runner.invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "m"), "--dtype", "int8",
                                  "--cpu-engine", "openvino-bf16"])
    assert result.exit_code == 2 and "--cpu-engine openvino-bf16" in result.output, result.output


@pytest.mark.parametrize("damage, named", [("model_name", "no model_name"), ("adapter_config.json", "adapter_config.json"),
                                           ("tokenizer.json", "tokenizer.json")])
def test_a_damaged_run_is_named_not_a_traceback(exported, tmp_path, runner, damage, named):
    run, _, _ = exported
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    if damage == "model_name":
        meta = json.loads((broken / "training_metadata.json").read_text())
        del meta["model_name"]
        (broken / "training_metadata.json").write_text(json.dumps(meta))
    else:
        (broken / "model" / damage).unlink()
    result = runner.invoke(main, ["export", "--run", str(broken), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output, result.output


def test_an_int8_graph_is_held_to_the_accuracy_bar(exported, tmp_path, runner, monkeypatch):
    from investment_risk.export import onnx_export

    run, _, _ = exported
    monkeypatch.setattr(onnx_export, "MAE_TOLERANCE", -1.0)
    result = runner.invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "m"), "--dtype", "int8"])
    assert result.exit_code == 1 and "int8 graph" in result.output and "worse (MAE)" in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_a_reduced_graph_without_labels_says_it_was_not_checked(exported, tmp_path, monkeypatch):
    from investment_risk.export import onnx_export

    run, _, _ = exported
    monkeypatch.setattr(onnx_export, "measurement_rows", lambda *args: ([], None))  # the split is gone
    with capture_logs() as logs:
        info = onnx_export.export_run(run, tmp_path / "m", dtype="int8")
    assert info["parity"]["int8"]["val_mae_checked"] is False and "val_mae" not in info["parity"]["int8"]
    assert [e["dtype"] for e in logs if e["event"] == "reduced_precision_unchecked"] == ["int8"]


def test_a_reduced_graph_runs_on_onnx_runtime_only(exported, tmp_path, articles, runner):
    from investment_risk.export.onnx_export import export_run

    run, _, _ = exported
    export_run(run, tmp_path / "int8", dtype="int8")
    result = runner.invoke(main, ["score", "--model", str(tmp_path / "int8"), "--input", str(articles / "a.parquet"),
                                  "--out", str(tmp_path / "s"), "--cpu-engine", "openvino-f32"])
    assert result.exit_code == 2 and "int8 graph" in result.output, result.output


def test_two_writers_of_one_directory_are_kept_apart(tmp_path):
    dest = tmp_path / "model"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from investment_risk.core.atomic import hold_lock; hold_lock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(tmp_path / ".model.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        partial = tmp_path / ".model.partial-live"  # the live writer's work: not a leftover to remove
        partial.mkdir()
        with pytest.raises(InputError, match="another process is writing it"), locked_dir(dest):
            write_dir_atomic(dest, lambda work: (work / "a").write_text("x"))
        assert partial.exists() and not dest.exists()
    finally:
        holder.kill()
        holder.wait()
    with locked_dir(dest):
        write_dir_atomic(dest, lambda work: (work / "a").write_text("x"))
    assert (dest / "a").read_text() == "x" and not partial.exists()  # a dead writer's work goes
    assert not (tmp_path / ".model.lock").exists()  # removed as it is let go


def test_replacing_a_symbolic_link_leaves_no_stray_link(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "current").symlink_to("v1")
    write_dir_atomic(tmp_path / "current", lambda work: (work / "a").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]
    assert (tmp_path / "current").is_dir() and not (tmp_path / "current").is_symlink()


def test_a_decoder_graph_without_a_validation_split_counts_the_steps_it_takes(exported, tmp_path, monkeypatch):
    from investment_risk.export import onnx_export

    run, _, _ = exported
    monkeypatch.setattr(onnx_export, "_val_split", lambda metadata: tmp_path / "gone" / "val.parquet")
    with capture_logs() as logs:
        info = onnx_export.export_run(run, tmp_path / "m", dtype="fp16")
    assert info["parity"]["fp16"]["val_mae_checked"] is False and info["reference"] is None
    done = [e for e in logs if e["event"] == "progress_done" and e["what"] == "export"][-1]
    assert list(done["step_seconds"]) == ["PyTorch scores for parity", "model builder graph", "fp16 parity",
                                          "drift reference", "digests and model.json"]
    assert done["done"] == done["total"] == 5
