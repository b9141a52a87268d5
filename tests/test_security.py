"""Security checks: no pickle and no remote code is ever loaded, secrets never reach the logs, and no path taken
from the input escapes the output directory."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from investment_risk.cli import main

from .conftest import TINY_TRAIN_ARGS

EXE = str(Path(sys.executable).parent / "investment-risk")
TOKEN = "hf_" + "Q7x" * 12  # token-shaped, not a real one


class _Tripwire:
    """Unpickling this touches a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Tripwire(marker)))


def test_pickle_checkpoints_and_adapters_are_never_loaded(exported, split_dir, tmp_path, runner):
    source, _, _ = exported
    run = tmp_path / "run"
    shutil.copytree(source, run)
    marker = tmp_path / "unpickled"
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    checkpoint = run / "checkpoints" / latest
    (checkpoint / "trainable.safetensors").unlink()
    trap(checkpoint / "trainable.pt", marker)
    same_run = [*TINY_TRAIN_ARGS, "--epochs", "1"]  # the fixture's run (the last --epochs counts)
    result = runner.invoke(main, ["train", *same_run, "--data", str(split_dir), "--out", str(run), "--resume"])
    assert result.exit_code == 2 and "trainable.safetensors" in result.output, result.output
    (run / "model" / "adapter_model.safetensors").unlink()
    trap(run / "model" / "adapter_model.bin", marker)
    for args in (["evaluate", "--model", str(run), "--data", str(split_dir / "test.parquet")],
                 ["export", "--run", str(run), "--out", str(tmp_path / "m")],
                 ["score", "--model", str(run), "--backend", "torch", "--input", str(split_dir / "test.parquet"),
                  "--out", str(tmp_path / "s")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and "safetensors" in result.output, (args[0], result.output)
    assert not marker.exists()


def test_remote_code_is_never_run(tmp_path, split_dir, runner):
    evil = tmp_path / "evil-model"
    evil.mkdir()
    marker = tmp_path / "remote-code-ran"
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
                     "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}}))
    (evil / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (evil / "model.safetensors").write_bytes(b"")
    for extra in (["--dry-run"], [], ["--mode", "instruction"]):
        result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--base-model", str(evil), "--data", str(split_dir),
                                      "--out", str(tmp_path / "run"), *extra])
        assert result.exit_code == 2 and "ships custom code (auto_map: AutoConfig, AutoModel" in result.output, \
            result.output
    # without auto_map, an architecture transformers does not know is refused too, in one line
    (evil / "config.json").write_text(json.dumps({"model_type": "evil"}))
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--base-model", str(evil), "--data", str(split_dir),
                                  "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2 and result.output.count("Error:") == 1, result.output
    assert not marker.exists()


def test_secrets_never_reach_the_logs(tmp_path):
    env = {**os.environ, "HF_TOKEN": TOKEN, "INVESTMENT_RISK_LOG_LEVEL": "debug"}
    hidden = tmp_path / TOKEN
    commands = [
        ["--log-format", "json", "score", "--model", str(hidden), "--input", str(hidden / "x.parquet"),
         "--out", str(tmp_path / "o")],
        ["--log-format", "json", "train", "--base-model", str(hidden), "--data", str(tmp_path), "--out", str(tmp_path / "r")],
        ["--log-format", "json", "jobs", "status", "x", "--kubeconfig", str(hidden / "kubeconfig")],
        ["--log-format", "json", "data", "synth", "--rows", "5", "--out", str(hidden / "s.parquet")],
    ]
    for args in commands:
        done = subprocess.run([EXE, *args], capture_output=True, text=True, env=env)
        assert done.returncode != 0 or args[3] == "synth", done.stderr
        assert TOKEN not in done.stdout and TOKEN not in done.stderr, (args[2], done.stdout + done.stderr)
        if args[2] != "data":  # each of these names the missing path in its error: the token was there, redacted
            assert "***" in done.stdout + done.stderr, (args[2], done.stdout + done.stderr)


def test_click_usage_errors_do_not_echo_a_token(tmp_path, runner, monkeypatch):
    # Click's own messages quote the refused value: an option, the root's option, or an env variable's.
    cases = [(["score", "--model", str(tmp_path), "--input", "x", "--out", str(tmp_path / "o"), "--backend", TOKEN], {}),
             (["--log-format", TOKEN, "data", "synth", "--rows", "5", "--out", "x.parquet"], {}),
             (["data", "synth", "--rows", TOKEN, "--out", "x.parquet"], {}),
             (["score", "--model", str(tmp_path), "--input", "x", "--out", str(tmp_path / "o")],
              {"INVESTMENT_RISK_CPU_ENGINE": TOKEN})]
    for args, env in cases:
        result = runner.invoke(main, args, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert TOKEN not in result.output and "***" in result.output, (args, result.output)


def test_paths_from_inputs_never_escape_the_output_dir(exported, tmp_path, runner):
    _, model, _ = exported
    inputs = tmp_path / "in"
    inputs.mkdir()
    evil_ids = ["../../escaped", "/etc/passwd", "..", "a/../../b", "part-00000.parquet", "_done/part-00000"]
    pq.write_table(__import__("pyarrow").Table.from_pylist([
        {"id": i, "title": "t", "content": "Credit spreads widen.", "source": "../../source", "url": "file:///etc/passwd"}
        for i in evil_ids]), inputs / "evil.parquet")
    before = {p for p in tmp_path.parent.rglob("*")}
    out = tmp_path / "out"
    result = runner.invoke(main, ["score", "--model", str(model), "--input", str(inputs), "--out", str(out),
                                  "--keep-columns", "source,url"])
    assert result.exit_code == 0, result.output
    created = {p for p in tmp_path.parent.rglob("*")} - before
    assert created and all(out in p.parents or p == out for p in created), sorted(map(str, created))
    assert sorted(pq.read_table(out / "part-00000.parquet").column("id").to_pylist()) == sorted(evil_ids)


def test_run_local_refuses_paths_that_climb_out_of_a_mount(tmp_path, runner):
    result = runner.invoke(main, ["jobs", "render", "score", "--with-shared", "--profile", "cpu", "--name", "climb",
                                  "--shards", "1", "--input", "/data/in", "--out", "/data/../../tmp/escaped"])
    (tmp_path / "job.yaml").write_text(result.output)
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    result = runner.invoke(main, ["jobs", "run-local", "--manifest", str(tmp_path / "job.yaml"),
                                  "--mount", f"/data={tmp_path / 'data'}", "--mount", f"/models={tmp_path / 'models'}"])
    assert result.exit_code == 2 and "climbs out of the mount /data" in result.output, result.output


def test_the_runtimes_send_no_telemetry(exported, tmp_path):
    """ONNX Runtime (every ONNX session) and OpenVINO (its import) start telemetry that writes an id under HOME and
    calls Microsoft's and Google's collectors: a pod has no network for it, and a user's data is theirs. With the
    package imported first, neither writes anything under HOME (where both keep their ids)."""
    _, model, _ = exported
    home = tmp_path / "home"
    home.mkdir()
    code = ("import os, sys, time\n"
            "import investment_risk\n"
            "import onnxruntime\n"
            f"onnxruntime.InferenceSession({str(model / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
            "try:\n    import openvino\n    openvino.Core()\nexcept ImportError:\n    pass\n"
            "print(os.environ['ORT_DISABLE_TELEMETRY'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "HOME": str(home)},
                          check=True)
    assert done.stdout.split() == ["1"] and list(home.rglob("*")) == [], sorted(map(str, home.rglob("*")))
