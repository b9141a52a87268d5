"""What export refuses before it writes, and what it holds reduced-precision graphs to (from an audit)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from investment_risk.cli import main
from investment_risk.core.atomic import locked_dir, write_dir_atomic
from investment_risk.core.errors import ConfigError, InputError


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


def test_a_cpu_engine_that_cannot_run_here_is_refused_before_the_export(exported, tmp_path, monkeypatch):
    from investment_risk.export import onnx_export

    run, _, _ = exported
    monkeypatch.setattr(onnx_export, "cpu_engine_usable", lambda engine: (False, "this CPU has no native bf16 units"))
    monkeypatch.setattr(onnx_export, "scoring_module", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(ConfigError, match=r"--cpu-engine openvino-bf16: cannot run here \(this CPU has no native"):
        onnx_export.export_run(run, tmp_path / "m", cpu_engine="openvino-bf16")
    assert not (tmp_path / "m").exists()


def test_cpu_engine_with_a_reduced_dtype_is_refused(exported, tmp_path, runner):
    run, _, _ = exported
    result = runner.invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "m"), "--dtype", "int8",
                                  "--cpu-engine", "openvino-bf16"])
    assert result.exit_code == 2 and "--cpu-engine openvino-bf16" in result.output, result.output


def test_a_storage_hiccup_while_a_run_loads_is_retried_not_called_damage():
    from safetensors import SafetensorError

    from investment_risk.core.errors import RetryableError, damaged

    hiccup = damaged(Path("run/model"), SafetensorError("Error while deserializing header: (os error 5)"), "x")
    assert isinstance(hiccup, RetryableError) and hiccup.exit_code == 1
    broken = damaged(Path("run/model"), ValueError("bad\nmore"), "does not load")
    assert isinstance(broken, InputError) and str(broken) == "run/model: does not load (ValueError: bad)"


@pytest.mark.parametrize("damage, named", [("model_name", "no model_name"), ("adapter_config.json", "adapter_config.json"),
                                           ("tokenizer.json", "tokenizer.json"),
                                           ("{adapter_config.json", "adapter_model.safetensors) does not load (JSONDecodeError"),
                                           ("{tokenizer.json", "its tokenizer files do not load"),
                                           ("-layers.1.", "weights its adapter config names are missing"),
                                           ("-score.", "does not load (KeyError: 'base_model.model.score.weight')"),
                                           ("{adapter_model.safetensors", "adapter_model.safetensors")])
def test_a_damaged_run_is_named_not_a_traceback(exported, tmp_path, runner, damage, named):
    from safetensors.torch import load_file, save_file

    run, _, _ = exported
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    if damage == "model_name":
        meta = json.loads((broken / "training_metadata.json").read_text())
        del meta["model_name"]
        (broken / "training_metadata.json").write_text(json.dumps(meta))
    elif damage.startswith("{"):  # cut short
        (broken / "model" / damage[1:]).write_text("{")
    elif damage.startswith("-"):  # a layer's weights gone (PEFT only warns), or the head's
        path = broken / "model" / "adapter_model.safetensors"
        weights = load_file(str(path))
        save_file({k: v for k, v in weights.items() if damage[1:] not in k}, str(path))
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


def test_export_reads_the_splits_the_run_trained_on_and_no_other(exported, split_dir, tmp_path, monkeypatch):
    """The reference, the engine choice, the int8 bar and its calibration are the run's own split's: a split found
    under the same (relative) name from another directory was measured as if it were."""
    import pyarrow.parquet as pq

    from investment_risk.modeling.loading import run_splits
    from investment_risk.training.config import TrainConfig

    run, _, _ = exported
    metadata = json.loads((run / "training_metadata.json").read_text())
    assert run_splits(run, metadata) == {"train": split_dir / "train.parquet", "val": split_dir / "val.parquet"}
    other = tmp_path / "other"
    shutil.copytree(split_dir, other)
    pq.write_table(pq.read_table(other / "val.parquet").slice(1), other / "val.parquet")
    with capture_logs() as logs:
        found = run_splits(run, {**metadata, "config": {**metadata["config"], "data": str(other)}})
    assert found == {"train": other / "train.parquet", "val": None}
    assert [e["split"] for e in logs if e["event"] == "run_split_changed"] == ["val"]
    assert run_splits(run, {**metadata, "config": {}}) == {"train": None, "val": None}  # not ./val.parquet
    monkeypatch.chdir(tmp_path)  # a run records its --data whole, wherever export runs from
    assert TrainConfig(mode="distillation", base_model="tiny-qwen2", data="d", out="r").data == str(tmp_path / "d")


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
    monkeypatch.setattr(onnx_export, "run_splits", lambda run_dir, metadata: {"train": None, "val": None})
    with capture_logs() as logs:
        info = onnx_export.export_run(run, tmp_path / "m", dtype="fp16")
    assert info["parity"]["fp16"]["val_mae_checked"] is False and info["reference"] is None
    done = [e for e in logs if e["event"] == "progress_done" and e["what"] == "export"][-1]
    assert list(done["step_seconds"]) == ["PyTorch scores for parity", "model builder graph", "fp16 parity",
                                          "drift reference", "digests and model.json"]
    assert done["done"] == done["total"] == 5
