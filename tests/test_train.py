import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from investment_risk.modeling.tokens import length_grouped_batches, pad_batch
from investment_risk.cli import main
from investment_risk.core.errors import InputError
from investment_risk.core.spec import DIMENSIONS, default_spec
from investment_risk.training.config import TrainConfig
from investment_risk.training.dry_run import dry_run
from investment_risk.training.recipe import train

from .conftest import TINY_TRAIN_ARGS, assert_same_history

EXE = str(Path(sys.executable).parent / "investment-risk")
METADATA_KEYS = {"filter_name", "filter_version", "dimension_names", "num_dimensions", "model_name", "num_parameters",
                 "num_trainable_parameters", "epochs", "batch_size", "learning_rate", "max_length", "warmup_steps",
                 "train_examples", "val_examples", "best_val_mae", "include_prompt", "training_mode",
                 "base_model_revision", "package_versions", "seed", "wall_time_s", "tokens_per_second"}


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(mode="distillation", base_model="tiny-qwen2", data=str(data), out=str(out), epochs=2, batch_size=8,
                learning_rate=2e-3, max_length=64, warmup_steps=2, checkpoint_steps=5, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_run(split_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    with capture_logs() as logs:
        metadata = train(tiny_config(split_dir, out))
    return out, metadata, logs


def test_run_package_is_complete(tiny_run):
    out, metadata, _ = tiny_run
    model = out / "model"
    assert (model / "adapter_model.safetensors").exists() and (model / "adapter_config.json").exists()
    assert (model / "tokenizer.json").exists() or (model / "tokenizer_config.json").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    from safetensors import safe_open
    with safe_open(str(model / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("score" in k for k in keys), "the regression head is saved with the adapter"
    history = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for entry in history:
        for split in ("train", "val"):
            expected = {"mae", "rmse", "loss"} | {f"{d}_{m}" for d in DIMENSIONS for m in ("mae", "rmse")}
            assert set(entry[split]) == expected
    saved = json.loads((out / "training_metadata.json").read_text())
    assert METADATA_KEYS <= set(saved) and saved == json.loads(json.dumps(metadata))
    assert saved["best_val_mae"] == min(h["val"]["mae"] for h in history)
    assert saved["include_prompt"] is False and saved["training_mode"] == "distillation"
    assert saved["num_dimensions"] == 8 and saved["dimension_names"] == list(DIMENSIONS)
    reports = out / "training_reports"
    for png in ("overall_metrics.png", "per_dimension_mae.png", "loss_curves.png"):
        assert (reports / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (reports / "training_summary.txt").read_text()
    assert "Overall metrics (best epoch, raw scores, every row: prefiltered noise too)" in summary
    # The training labels' redundancy, as dimensions.md gives it (a small run: flagged as too few rows or not)
    redundancy = summary.split("Dimension redundancy of the training labels (dimensions.md):\n", 1)[1]
    assert "First principal component:" in redundancy and "Pairs with |r| > 0.7:" in redundancy
    for dim in DIMENSIONS:
        assert any(line.strip().startswith(dim) and "Train=" in line and "Val=" in line and "Gap=" in line
                   for line in summary.splitlines())
    from docx import Document
    doc = Document(str(reports / "training_report.docx"))
    # Three tables (no calibration table: 24 val rows are too few to fit one); five plots, two of them the training
    # labels' dimension redundancy.
    assert len(doc.tables) == 3 and len(doc.inline_shapes) == 5


def test_learning_happens(tiny_run):
    out, _, _ = tiny_run
    history = json.loads((out / "training_history.json").read_text())
    assert history[1]["train"]["loss"] < history[0]["train"]["loss"]
    assert history[1]["val"]["mae"] < history[0]["val"]["mae"]


def test_warmup_cap_is_logged(tiny_run):
    _, _, logs = tiny_run
    starts = [e for e in logs if e["event"] == "training_start"]
    assert starts and starts[0]["warmup_steps"] == 2 and starts[0]["total_steps"] > 20
    assert not [e for e in logs if e["event"] == "warmup_capped"]


def test_train_step_lines_give_the_rate_since_the_last_line(split_dir, tmp_path, monkeypatch):
    """A slow first batch (compilation, on a GPU) weighs on the rate since the start, not on the recent one."""
    import types

    from investment_risk.training import recipe
    from investment_risk.training.distillation import DistillationTask

    # The recipe's clock advances only in the batches, by fixed amounts: no dependence on this machine's speed.
    real, clock = DistillationTask.loss_and_preds, [0.0]

    def slow_first(self, *args):
        clock[0] += 100.0 if clock[0] == 0.0 else 0.01
        return real(self, *args)

    monkeypatch.setattr(recipe, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(DistillationTask, "loss_and_preds", slow_first)
    with capture_logs() as logs:
        train(tiny_config(split_dir, tmp_path / "r", epochs=1, log_every=2))
    lines = [e for e in logs if e["event"] == "train_step"]
    assert len(lines) >= 3
    assert all(e["recent_tokens_per_second"] > 2 * e["tokens_per_second"] for e in lines[1:])
    assert lines[0]["recent_tokens_per_second"] == pytest.approx(lines[0]["tokens_per_second"], rel=0.05)


def test_warmup_cap_applies_on_small_data(split_dir, tmp_path):
    with capture_logs() as logs:
        metadata = train(tiny_config(split_dir, tmp_path / "r", epochs=1, warmup_steps=500))
    capped = [e for e in logs if e["event"] == "warmup_capped"]
    assert capped and capped[0]["requested"] == 500 and capped[0]["used"] == metadata["warmup_steps"] < 500


def test_val_metrics_are_those_of_clipped_scores(tmp_path):
    """A barely trained Qwen2 head (no bias) predicts around 0, partly below it: the best epoch is chosen, and its
    MAE reported, on the scores every later stage gives, clipped to [0, 10]."""
    from investment_risk.datasets.split import SplitConfig, run_split
    from investment_risk.datasets.synth import SynthConfig, generate

    pq.write_table(generate(SynthConfig(rows=200, seed=4)), tmp_path / "all.parquet")  # 30+ val rows: calibrated
    run_split([str(tmp_path / "all.parquet")], tmp_path / "data", SplitConfig(val=0.2, test=0.05, seed=1))
    metadata = train(tiny_config(tmp_path / "data", tmp_path / "r", epochs=1, learning_rate=1e-6))
    history = json.loads((tmp_path / "r" / "training_history.json").read_text())
    assert metadata["calibration"]["fitted"]
    assert history[0]["val"]["mae"] == pytest.approx(metadata["best_val_mae"])
    checkpoints = tmp_path / "r" / "checkpoints"
    latest = json.loads((checkpoints / "latest.json").read_text())["checkpoint"]
    best = np.asarray(json.loads((checkpoints / latest / "state.json").read_text())["state"]["best_val_predictions"])
    val = pq.read_table(tmp_path / "data" / "val.parquet")
    labels = np.stack([val.column(d).to_numpy() for d in DIMENSIONS], axis=1)
    assert best.min() == 0.0  # the head's raw output went below 0: clipped
    assert metadata["best_val_mae"] == pytest.approx(np.abs(best - labels).mean(), abs=1e-4)
    # The calibration's raw MAE: the same clipped scores, on the rows it was fitted on (prefiltered noise left out)
    scored = ~default_spec().prefiltered(val)
    assert metadata["calibration"]["val_mae_raw"] == pytest.approx(np.abs(best - labels)[scored].mean(), abs=1e-4)


def test_lora_on_every_projection_and_head_trained_in_full():
    from investment_risk.modeling.networks import regression_model
    from investment_risk.modeling.presets import load_tokenizer, resolve_base_model

    base = resolve_base_model("tiny-qwen2")
    model = regression_model(base, load_tokenizer(base.path))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for layer in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert any(f"layers.{layer}.{proj}.lora_A" in n for n in trainable), proj
    assert any(n.endswith("score.modules_to_save.default.weight") for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


def test_minilm_targets_and_head():
    from investment_risk.modeling.networks import regression_model
    from investment_risk.modeling.presets import load_tokenizer, resolve_base_model

    base = resolve_base_model("minilm")
    model = regression_model(base, load_tokenizer(base.path), meta=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        assert any(f"layer.5.{name}.lora_A" in n for n in trainable), name
    assert any("classifier.modules_to_save" in n for n in trainable)


def test_same_seed_same_history(split_dir, tmp_path, tiny_run):
    train(tiny_config(split_dir, tmp_path / "again"))
    first = json.loads((tiny_run[0] / "training_history.json").read_text())
    again = json.loads((tmp_path / "again" / "training_history.json").read_text())
    assert again == first


def test_batches_are_length_grouped_and_dynamically_padded():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, 1000)
    batches = length_grouped_batches(lengths, 8, seed=1, epoch=1)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert [b.tolist() for b in batches] == [b.tolist() for b in length_grouped_batches(lengths, 8, 1, 1)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in length_grouped_batches(lengths, 8, 1, 2)]
    def real_share(groups):
        return lengths.sum() / sum(len(g) * lengths[g].max() for g in groups)
    random_batches = [rng.permutation(1000)[i:i + 8] for i in range(0, 1000, 8)]
    assert real_share(batches) > 0.95 > real_share(random_batches)
    ids, mask = pad_batch([np.array([1, 2, 3]), np.array([4])], pad_id=0)
    assert ids.shape == (2, 3) and mask.tolist() == [[1, 1, 1], [1, 0, 0]] and ids[1].tolist() == [4, 0, 0]


def test_tokens_are_cached_once_per_run(tiny_run, monkeypatch):
    from investment_risk.modeling import tokens as batching
    from investment_risk.modeling.presets import load_tokenizer

    out, _, _ = tiny_run
    cache = out / "cache" / "tokens-train.safetensors"
    assert cache.exists()
    tokenizer = load_tokenizer(out / "model")
    texts = ["a b c", "d e"]
    first = batching.encode_cached(tokenizer, texts, 64, out / "cache" / "t.safetensors")
    monkeypatch.setattr(batching, "encode", lambda *a, **k: pytest.fail("tokenised twice"))
    again = batching.encode_cached(tokenizer, texts, 64, out / "cache" / "t.safetensors")
    assert [a.tolist() for a in again] == [f.tolist() for f in first]
    # a damaged cache is tokenised again (and written whole), not a run stuck until someone deletes it
    (out / "cache" / "t.safetensors").write_bytes(b"\x08\x00")
    monkeypatch.undo()
    with capture_logs() as logs:
        rebuilt = batching.encode_cached(tokenizer, texts, 64, out / "cache" / "t.safetensors")
    assert [r.tolist() for r in rebuilt] == [f.tolist() for f in first]
    assert [e["event"] for e in logs] == ["token_cache_unusable"]
    assert [a.tolist() for a in batching.encode_cached(tokenizer, texts, 64, out / "cache" / "t.safetensors")] == \
        [f.tolist() for f in first]


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "--log-format", "json", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_resume_after_kill_matches_an_unbroken_run(split_dir, unbroken_tiny_run, tmp_path):
    args = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir)]
    killed = run_cli(args + ["--out", str(tmp_path / "broken")], env={"_INVESTMENT_RISK_KILL_AT_STEP": "17"})
    assert killed.returncode == -9
    assert not (tmp_path / "broken" / "training_metadata.json").exists()
    assert json.loads((tmp_path / "broken" / "checkpoints" / "latest.json").read_text())["step"] == 15
    resumed = run_cli(args + ["--out", str(tmp_path / "broken"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert any(json.loads(line)["event"] == "resumed" for line in resumed.stdout.splitlines() if line.startswith("{"))
    assert_same_history(unbroken_tiny_run, tmp_path / "broken", None)
    metadata = json.loads((tmp_path / "broken" / "training_metadata.json").read_text())
    assert metadata["wall_time_s"] >= metadata["train_seconds"]  # both count the killed process's banked time
    # epoch 2 was cut at step 17 and resumed from step 15: its tokens are those of the whole epoch, not the rest
    whole = json.loads((unbroken_tiny_run / "training_metadata.json").read_text())
    assert metadata["epoch_tokens"] == whole["epoch_tokens"] and len(metadata["epoch_seconds"]) == 2


def test_resuming_a_finished_run_changes_nothing(split_dir, unbroken_tiny_run, tmp_path):
    """A retried train pod (`--resume-if-present`) over a finished run: it ends at once, and a `calibrate` refit
    done since stays (finish done again put the training calibration back and dropped `recalibrated`)."""
    out = tmp_path / "run"
    shutil.copytree(unbroken_tiny_run, out)
    metadata = json.loads((out / "training_metadata.json").read_text())
    (out / "training_metadata.json").write_text(json.dumps({**metadata, "recalibrated": {"rows": 1}}))
    (out / "model" / "calibration.json").write_text('{"refit": true}')  # this small run fitted none: a refit's
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_cli(["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out), "--resume-if-present"])
    assert again.returncode == 0, again.stderr
    events = [json.loads(line)["event"] for line in again.stdout.splitlines() if line.startswith("{")]
    assert "training_already_complete" in events and "epoch_done" not in events
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("model_type, positions, usable", [("bert", 512, 512), ("roberta", 514, 512), ("qwen2", 32768, 32768)])
def test_the_usable_positions_of_each_architecture(tmp_path, model_type, positions, usable):
    from investment_risk.core.errors import ConfigError
    from investment_risk.modeling.presets import BaseModel, check_base

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "max_position_embeddings": positions,
                                                      "pad_token_id": 1}))
    base = BaseModel("b", tmp_path, "r")
    check_base(base, "distillation", usable)
    with pytest.raises(ConfigError, match=f"has {usable} positions"):
        check_base(base, "distillation", usable + 1)


def test_a_max_length_past_the_base_models_positions_is_one_line(runner, split_dir, tmp_path):
    args = [a if a != "64" else "4096" for a in TINY_TRAIN_ARGS]  # tiny-qwen2 has 2,048 positions
    for extra in (["--dry-run"], []):
        result = runner.invoke(main, ["train", *args, "--data", str(split_dir), "--out", str(tmp_path / "x"), *extra])
        assert result.exit_code == 2, result.output
        assert "--max-length 4096: base model 'tiny-qwen2' has 2048 positions" in result.output
        assert not [p.name for p in (tmp_path / "x").glob("[!.]*")]  # nothing but the run's lock


def test_sigterm_checkpoints_at_the_step_under_way_and_the_resume_matches_an_unbroken_run(split_dir, unbroken_tiny_run,
                                                                                          tmp_path):
    # A preempted pod gets SIGTERM and a grace period: the run saves where it is (step 17; the periodic checkpoint
    # was step 15) and exits 1, the Job's retry.
    args = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir)]
    stopped = run_cli(args + ["--out", str(tmp_path / "stopped")],
                      env={"_INVESTMENT_RISK_KILL_AT_STEP": "17", "_INVESTMENT_RISK_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 1, stopped.stderr
    events = [json.loads(line) for line in stopped.stdout.splitlines() if line.startswith("{")]
    assert [e["step"] for e in events if e["event"] == "checkpointed_on_sigterm"] == [17]
    assert events[-1]["event"] == "terminated"
    assert json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())["step"] == 17
    resumed = run_cli(args + ["--out", str(tmp_path / "stopped"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_history(unbroken_tiny_run, tmp_path / "stopped", None)


def test_sigterm_at_an_epochs_last_step_stops_after_its_validation_and_checkpoint(split_dir, unbroken_tiny_run, tmp_path):
    args = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "stopped")]
    stopped = run_cli(args, env={"_INVESTMENT_RISK_KILL_AT_STEP": "14", "_INVESTMENT_RISK_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 1, stopped.stderr  # epoch 1 ends at step 14
    events = [json.loads(line) for line in stopped.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"] in ("epoch_done", "checkpointed_on_sigterm")] == [
        "epoch_done", "checkpointed_on_sigterm"]
    assert json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())["step"] == 14
    assert run_cli(args + ["--resume"]).returncode == 0
    assert_same_history(unbroken_tiny_run, tmp_path / "stopped", None)


def test_a_storage_hiccup_on_the_checkpoint_pointer_is_retried_never_a_new_start(tiny_run, monkeypatch):
    import errno

    from investment_risk.core.errors import RetryableError
    from investment_risk.training.run_dir import has_checkpoint

    out, _, _ = tiny_run
    real_stat = Path.stat

    def stale(path, *args, **kwargs):
        if path.name == "latest.json":
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(Path, "stat", stale)
    with pytest.raises(RetryableError, match="latest.json: I/O error"):
        has_checkpoint(out)  # Path.exists() says False on any error (3.12+): --resume-if-present would start anew


def test_a_resume_whose_checkpoint_folders_are_gone_is_refused(split_dir, tmp_path):
    args = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "r")]
    assert run_cli(args, env={"_INVESTMENT_RISK_KILL_AT_STEP": "7"}).returncode == -9
    for folder in (tmp_path / "r" / "checkpoints").glob("step-*"):
        shutil.rmtree(folder)
    resumed = run_cli(args + ["--resume-if-present"])  # it trained from step 0 over the run's files
    assert resumed.returncode == 2 and "no checkpoint folder is left" in resumed.stderr, resumed.stderr


def test_a_fall_back_behind_a_best_epoch_is_refused(tmp_path):
    from types import SimpleNamespace

    from investment_risk.training.recipe import TrainState, fell_back

    (tmp_path / "checkpoints" / "step-00000028").mkdir(parents=True)
    (tmp_path / "training_history.json").write_text(json.dumps(
        [{"epoch": 1, "val": {"mae": 2.0}}, {"epoch": 2, "val": {"mae": 1.5}}]))
    session = SimpleNamespace(out=tmp_path)
    state = TrainState(epoch=2, best_val_mae=2.0, best_epoch=1)  # step 25, mid epoch 2: model/ holds epoch 2's best
    damaged = [tmp_path / "checkpoints" / "step-00000028"]
    with pytest.raises(InputError, match="precedes epoch 2, whose weights model/ holds"):
        fell_back(session, state, tmp_path / "checkpoints" / "step-00000025", damaged)
    assert damaged[0].exists()  # nothing removed when refused
    state.best_val_mae = 1.0  # epoch 2 was no better: model/ still holds epoch 1's, and the fall-back goes on
    fell_back(session, state, tmp_path / "checkpoints" / "step-00000025", damaged)
    assert not damaged[0].exists()


def test_a_start_killed_before_its_first_checkpoint_is_taken_over_by_the_retry(split_dir, unbroken_tiny_run, tmp_path):
    # A retried pod's --resume-if-present found checkpoints/ (or a temporary file) and no committed checkpoint:
    # "not empty", exit 2, the Job failed for good.
    args = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "run")]
    killed = run_cli(args, env={"_INVESTMENT_RISK_KILL_AT": "before_rename:checkpoints/latest.json"})
    assert killed.returncode == -9 and (tmp_path / "run" / "checkpoints").is_dir()
    assert not (tmp_path / "run" / "checkpoints" / "latest.json").exists()
    retried = run_cli(args + ["--resume-if-present"])
    assert retried.returncode == 0, retried.stderr
    assert_same_history(unbroken_tiny_run, tmp_path / "run", None)
    # A finished run is another matter: a new start into it is still refused
    again = run_cli(args)
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr


@pytest.mark.parametrize("damaged, content", [("trainable.safetensors", b""),  # a power cut before it was synced
                                               ("state.json", b"{}"),  # whole JSON, without what it must hold
                                               ("state.json", None)])  # its training state emptied
def test_a_damaged_checkpoint_falls_back_to_the_one_before_it(split_dir, unbroken_tiny_run, tmp_path, damaged,
                                                              content):
    args = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "run")]
    assert run_cli(args, env={"_INVESTMENT_RISK_KILL_AT_STEP": "17"}).returncode == -9
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000014", "step-00000015"]  # epoch 1 ends at 14
    # Each checkpoint carries the run's resolved hyperparameters
    saved = json.loads((checkpoints / "step-00000015" / "training_config.json").read_text())
    assert saved == json.loads((tmp_path / "run" / "training_config.json").read_text()) and saved["batch_size"] == 8
    if content is None:
        saved = json.loads((checkpoints / "step-00000015" / damaged).read_text())
        content = json.dumps({**saved, "state": {}}).encode()
    (checkpoints / "step-00000015" / damaged).write_bytes(content)
    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert [e["checkpoint"] for e in events if e["event"] == "checkpoint_unusable"] == ["step-00000015"]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [14]
    assert_same_history(unbroken_tiny_run, tmp_path / "run", None)


def test_a_resume_on_changed_base_weights_is_refused(split_dir, tmp_path):
    from investment_risk.modeling.presets import resolve_base_model

    base = tmp_path / "base"
    shutil.copytree(resolve_base_model("tiny-qwen2").path, base)
    args = ["train", *TINY_TRAIN_ARGS, "--base-model", str(base), "--data", str(split_dir), "--out", str(tmp_path / "r")]
    assert run_cli(args, env={"_INVESTMENT_RISK_KILL_AT_STEP": "7"}).returncode == -9
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # the same size, written again: the file may hold other weights
    for dry in ([], ["--dry-run"]):  # the dry run checks it as the run will
        resumed = run_cli(args + ["--resume", *dry])
        assert resumed.returncode == 2 and "its config or weight files changed" in resumed.stderr, resumed.stderr


def test_a_finished_run_on_other_base_weights_is_refused_where_it_is_loaded(exported, split_dir, tmp_path, runner):
    """The adapter was fitted to the base's weights: evaluate, export and calibrate put it on whatever was there."""
    run, _, _ = exported
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    meta = json.loads((moved / "training_metadata.json").read_text())
    (moved / "training_metadata.json").write_text(json.dumps({**meta, "base_model_revision": "sha256:0000"}))
    for args in (["evaluate", "--model", str(moved), "--data", str(split_dir / "test.parquet")],
                 ["export", "--run", str(moved), "--out", str(tmp_path / "m")],
                 ["calibrate", "--model", str(moved), "--data", str(split_dir / "train.parquet")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args[0], result.output)
        assert "trained on base model 'tiny-qwen2' at revision sha256:0000" in result.output
        assert "builds another tiny-qwen2" in result.output  # what changed, for the kind of base model it is


def test_a_relative_local_base_model_is_recorded_whole(tmp_path, monkeypatch):
    from investment_risk.training.config import TrainConfig

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(mode="distillation", base_model="base/", data="d", out="r")
    assert config.base_model == str(tmp_path / "base")
    assert TrainConfig(mode="distillation", base_model="tiny-qwen2", data="d", out="r").base_model == "tiny-qwen2"
    # a run started before, which recorded it as typed, still resumes
    from investment_risk.training.config import resume_problem

    assert resume_problem(config, {**config.to_json(), "base_model": "base"}, {}) == ""
    assert "--base-model" in resume_problem(config, {**config.to_json(), "base_model": "other"}, {})


def test_one_process_at_a_time_trains_into_a_run(split_dir, tmp_path):
    from investment_risk.core.atomic import hold_lock
    from investment_risk.core.errors import RetryableError

    (tmp_path / "run").mkdir()
    held = hold_lock(tmp_path / "run" / ".train.lock")  # another trainer, alive
    try:
        with pytest.raises(RetryableError, match="another process is training into it"):
            train(tiny_config(split_dir, tmp_path / "run"))
    finally:
        os.close(held)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".train.lock"]  # it wrote nothing


def test_a_full_disk_is_one_line_and_exit_1(split_dir, tmp_path, runner, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr("investment_risk.training.recipe.train", full)
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.count("\n") <= 2, result.output
    assert "Error: I/O error: Error while serializing: I/O error: No space left on device" in result.output


def test_a_crash_beside_the_best_model_save_never_leaves_model_ahead_of_the_checkpoint(split_dir, tmp_path,
                                                                                        monkeypatch):
    from safetensors.numpy import load_file

    from investment_risk.training.distillation import DistillationTask

    real_save = DistillationTask.save

    def save_then_crash(self, model, dest):
        real_save(self, model, dest)
        raise RuntimeError("killed")

    def crash(self, model, dest):
        raise RuntimeError("killed")

    # Killed just after model/ was written: the checkpoint already names that epoch best (a resume that reran the
    # epoch on a GPU, and found it worse, would otherwise keep weights no state describes).
    monkeypatch.setattr(DistillationTask, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(split_dir, tmp_path / "after", epochs=1))
    checkpoints = tmp_path / "after" / "checkpoints"
    latest = json.loads((checkpoints / "latest.json").read_text())["checkpoint"]
    assert json.loads((checkpoints / latest / "state.json").read_text())["state"]["best_epoch"] == 1
    # Killed just before: the resume saves the best epoch's weights from its checkpoint.
    monkeypatch.setattr(DistillationTask, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(split_dir, tmp_path / "before", epochs=1))
    assert not (tmp_path / "before" / "model").exists()
    monkeypatch.setattr(DistillationTask, "save", real_save)
    train(tiny_config(split_dir, tmp_path / "before", epochs=1), resume=True)
    adapter = "adapter_model.safetensors"
    restored, saved = (load_file(tmp_path / run / "model" / adapter) for run in ("before", "after"))
    assert restored.keys() == saved.keys() and all(np.array_equal(restored[k], saved[k]) for k in saved)
    assert json.loads((tmp_path / "before" / "training_metadata.json").read_text())["best_epoch"] == 1


def test_dry_run_counts_like_peft_and_writes_nothing(split_dir, tmp_path, tiny_run):
    _, metadata, _ = tiny_run
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    from investment_risk.modeling.presets import resolve_base_model
    shutil.copy(resolve_base_model("tiny-qwen2").path / "config.json", config_only / "config.json")
    report = dry_run(tiny_config(split_dir, tmp_path / "never", base_model=str(config_only)))
    assert report["num_parameters"] == metadata["num_parameters"]
    assert report["num_trainable_parameters"] == metadata["num_trainable_parameters"]
    train_rows = pq.read_metadata(split_dir / "train.parquet").num_rows
    assert report["steps_per_epoch"] == -(-train_rows // 8)
    assert "train_tokens" not in report  # no tokenizer beside the config
    assert not (tmp_path / "never").exists()
    with_tokenizer = dry_run(tiny_config(split_dir, tmp_path / "never"))
    assert with_tokenizer["train_tokens"] > 0 and 0 <= with_tokenizer["train_truncated_share"] <= 1


def test_dry_run_cli(runner, split_dir, tmp_path):
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "x"),
                                  "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "num_trainable_parameters" in result.output and not (tmp_path / "x").exists()


def test_evaluate_reports_mae_and_baseline(tiny_run, split_dir, tmp_path, runner, terminal):
    out, metadata, _ = tiny_run
    result = runner.invoke(main, ["evaluate", "--model", str(out), "--data", str(split_dir / "test.parquet"),
                                  "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    test = pq.read_table(split_dir / "test.parquet")
    labels = np.stack([test.column(d).to_numpy() for d in DIMENSIONS], axis=1)
    modelled = ~default_spec().prefiltered(test)  # noise articles are no model's output: evaluate leaves them out
    expected_baseline = np.abs(labels[modelled] - np.array(metadata["train_label_mean"])).mean()
    assert report["baseline_mae"] == pytest.approx(expected_baseline, rel=1e-5)
    assert report["rows"] == test.num_rows and set(report["per_dimension"]) == set(DIMENSIONS)
    assert "overall" in result.output and "base MAE" in result.output
    from investment_risk.evaluation.evaluate import format_table
    assert "MAE / baseline MAE = n/a" in format_table({**report, "mae_vs_baseline": None})  # labels the mean hits
    # The model's MAE is that of the run's own predictions (the torch scorer, read back), not the mean's.
    scored = tmp_path / "scored"
    assert runner.invoke(main, ["score", "--model", str(out), "--input", str(split_dir / "test.parquet"),
                                "--out", str(scored), "--backend", "torch", "--device", "cpu"]).exit_code == 0
    parts = pq.read_table(scored / "part-00000.parquet")
    predicted = dict(zip(parts.column("id").to_pylist(),
                         np.stack([parts.column(d).to_numpy(zero_copy_only=False) for d in DIMENSIONS], axis=1)))
    rows = [i for i, id_ in enumerate(test.column("id").to_pylist()) if not np.isnan(predicted[id_]).any()]
    ids = test.column("id").to_pylist()
    per_dim = np.abs(np.stack([predicted[ids[i]] for i in rows]) - labels[rows]).mean(axis=0)
    for d, dim in enumerate(DIMENSIONS):
        assert report["per_dimension"][dim]["mae"] == pytest.approx(per_dim[d], abs=1e-4)
    # bias and the calibration error are those of the same predictions
    errors = np.stack([predicted[ids[i]] for i in rows]) - labels[rows]
    for d, dim in enumerate(DIMENSIONS):
        assert report["per_dimension"][dim]["bias"] == pytest.approx(errors[:, d].mean(), abs=1e-4)
        bins = np.minimum(np.floor(np.stack([predicted[ids[i]] for i in rows])[:, d]), 9)
        gaps = [abs(errors[bins == b, d].mean()) * (bins == b).sum() for b in np.unique(bins)]
        assert report["per_dimension"][dim]["calibration_error"] == pytest.approx(sum(gaps) / len(rows), abs=1e-4)
    assert "cal.err" in result.output and (tmp_path / "eval-reliability.png").exists()
    assert len(rows) == modelled.sum() > 0
    assert report["mae"] != pytest.approx(report["baseline_mae"], abs=1e-6)


def write_split(root: Path, table: pa.Table) -> Path:
    root.mkdir(parents=True)
    for name in ("train", "val", "test"):
        pq.write_table(table, root / f"{name}.parquet")
    return root


@pytest.mark.parametrize("case, message", [
    ("no labels", "missing required column(s) macro_risk_severity"),
    ("missing dimension", "missing required column(s) actionability"),
    ("too few rows", "too few for one batch"),
    ("no such base model", "not found offline"),
    ("pickle base model", "pickle checkpoints are never loaded"),
])
def test_bad_training_input_exit_2(runner, tmp_path, synth_table, case, message):
    table = synth_table.slice(0, 40)
    args = ["--base-model", "tiny-qwen2"]
    if case == "no labels":
        table = table.drop_columns(list(DIMENSIONS))
    elif case == "missing dimension":
        table = table.drop_columns(["actionability"])
    elif case == "too few rows":
        table = table.slice(0, 5)
    elif case == "no such base model":
        args = ["--base-model", "Nobody/no-such-model"]
    elif case == "pickle base model":
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        (pickled / "config.json").write_text('{"model_type": "qwen2"}')
        (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
        args = ["--base-model", str(pickled)]
    data = write_split(tmp_path / "d", table)
    result = runner.invoke(main, ["train", *args, "--data", str(data), "--out", str(tmp_path / "run"),
                                  "--batch-size", "8", "--max-length", "32"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    if case == "no such base model":
        assert "HF_HOME" in result.output and "Nobody/no-such-model" in result.output


def test_existing_out_without_resume(runner, tiny_run, split_dir):
    out, _, _ = tiny_run
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out)])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output


def test_resume_with_another_base_model(runner, tiny_run, split_dir):
    out, _, _ = tiny_run
    args = [a if a != "tiny-qwen2" else "minilm" for a in TINY_TRAIN_ARGS]
    result = runner.invoke(main, ["train", *args, "--data", str(split_dir), "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "was trained with --base-model tiny-qwen2" in result.output


def test_resume_with_other_settings_is_refused(runner, tiny_run, split_dir):
    out, _, _ = tiny_run
    args = [a if a != "2e-3" else "1e-3" for a in TINY_TRAIN_ARGS]
    before = (out / "training_config.json").read_text()
    result = runner.invoke(main, ["train", *args, "--data", str(split_dir), "--out", str(out), "--resume"])
    assert result.exit_code == 2
    assert "was trained with --learning-rate 0.002 (not 0.001)" in result.output
    assert (out / "training_config.json").read_text() == before


def test_dry_run_checks_what_resume_would_continue(runner, tiny_run, split_dir, tmp_path):
    """The data may move but not change; where and how the run reports may change, what it learns may not."""
    out, _, _ = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(split_dir, moved)
    args = [a if a != "5" else "50" for a in TINY_TRAIN_ARGS]  # --checkpoint-steps: free to change
    base = ["train", *args, "--out", str(out), "--resume", "--dry-run"]
    same = runner.invoke(main, [*base, "--data", str(moved)])
    assert same.exit_code == 0, same.output
    val = pq.read_table(moved / "val.parquet")
    pq.write_table(val.slice(1), moved / "val.parquet")
    changed = runner.invoke(main, [*base, "--data", str(moved)])
    assert changed.exit_code == 2
    assert "was trained on other data: val.parquet" in changed.output
    other = runner.invoke(main, [*base, "--data", str(split_dir), "--batch-size", "4"])
    assert other.exit_code == 2 and "--batch-size 8 (not 4)" in other.output


def test_resume_of_a_corrupt_run_config_is_one_line(runner, tmp_path, split_dir):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "training_config.json").write_text('{"mode": "distillation",')
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out), "--resume"])
    assert result.exit_code == 2
    assert f"{out / 'training_config.json'}: unreadable" in result.output and "Traceback" not in result.output


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_the_next(runner, tmp_path, split_dir):
    bad = tmp_path / "bad"
    shutil.copytree(split_dir, bad)
    (bad / "split_summary.json").unlink()  # a split edited by hand: no summary describes its files
    table = pq.read_table(bad / "train.parquet")
    labels = table.column("macro_risk_severity").to_pylist()
    labels[3] = float("nan")
    pq.write_table(table.set_column(table.schema.get_field_index("macro_risk_severity"), "macro_risk_severity",
                                    pa.array(labels, pa.float64())), bad / "train.parquet")
    out = tmp_path / "run"
    failed = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(bad), "--out", str(out)])
    assert failed.exit_code == 2 and "is null or NaN" in failed.output
    assert not out.exists()  # the folder it made goes with it
    out.mkdir()
    (out / "training_config.json").write_text("{}")  # a start killed before its first checkpoint (SIGKILL)
    for args in ([], ["--resume-if-present"]):  # a new start, and a retried pod's
        again = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out),
                                     "--dry-run", *args])
        assert again.exit_code == 0, again.output
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest.json").write_text("{}")  # once a checkpoint exists, it is a run
    blocked = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out), "--dry-run"])
    assert blocked.exit_code == 2 and "already exists and is not empty" in blocked.output


@pytest.mark.parametrize("command", [["train", *TINY_TRAIN_ARGS, "--data", "d", "--out", "o"],
                                     ["data", "synth", "--rows", "10", "--out", "x.parquet"],
                                     ["data", "split", "--input", "x.parquet", "--out", "d"]])
def test_a_negative_seed_is_bad_usage(runner, command):
    result = runner.invoke(main, [*command, "--seed", "-1"])
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output


def test_resume_without_a_run(runner, tmp_path, split_dir):
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "none"),
                                  "--resume"])
    assert result.exit_code == 2 and "holds no training run" in result.output


def test_config_validation():
    with pytest.raises(Exception, match="--mode"):
        TrainConfig(mode="bogus", base_model="x", data="d", out="o")
    with pytest.raises(InputError):
        dry_run(TrainConfig(mode="distillation", base_model="tiny-qwen2", data="/nonexistent", out="/tmp/none-x"))


def test_gradient_accumulation_steps_once_per_group(split_dir, tmp_path):
    with capture_logs() as logs:
        metadata = train(tiny_config(split_dir, tmp_path / "accum", epochs=1, batch_size=4, grad_accum=3))
    start = next(e for e in logs if e["event"] == "training_start")
    batches = -(-metadata["train_examples"] // 4)
    assert start["steps_per_epoch"] == -(-batches // 3) == metadata["steps_per_epoch"]
    assert metadata["effective_batch_size"] == 12 and metadata["gradient_accumulation_steps"] == 3
    saved = json.loads((tmp_path / "accum" / "checkpoints" / "latest.json").read_text())
    assert saved["step"] == start["steps_per_epoch"]


def test_compile_trains_to_the_same_result(split_dir, tmp_path, monkeypatch):
    """--compile changes the speed, not the model: the result matches eager training up to dropout draws (inductor
    generates dropout masks with its own RNG, so the two runs see different masks)."""
    import torch
    from torch._dynamo import guards

    from investment_risk.modeling import pooled_block
    from investment_risk.training import distillation

    MAX = 512  # long enough that the batches differ in length, not only in rows
    # Both of tiny-qwen2's blocks whole, so both compile and a per-layer recompile would show; a pooled last block
    # stays eager (tests/test_pooled_block.py).
    monkeypatch.setattr(pooled_block, "pool_last_block", lambda model: False)
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(model) or real_compile(model, **kw))
    eager = train(tiny_config(split_dir, tmp_path / "eager", epochs=1, max_length=MAX))
    assert not calls
    shapes = set()
    real_pad = distillation.pad_batch
    monkeypatch.setattr(distillation, "pad_batch", lambda *a: shapes.add((ids := real_pad(*a))[0].shape) or ids)
    recompiles: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: recompiles.append(record.getMessage())
    torch._logging.set_logs(recompiles=True)
    guards.recompiles_log.addHandler(handler)
    try:
        compiled = train(tiny_config(split_dir, tmp_path / "compiled", epochs=1, compile=True, max_length=MAX))
    finally:
        guards.recompiles_log.removeHandler(handler)
        torch._logging.set_logs()
    assert len(calls) == 2  # tiny-qwen2's two decoder blocks, each compiled in place
    # Recompiled for grad mode, a missing mask or a frozen input, never for a batch shape: a whole-model compile
    # recompiled at each new length (minutes each for a 1.5B model on a GPU). Never for a block's KV cache either:
    # its guard names the block's layer, so a 28-layer model recompiled per block until the recompile limit (8) left
    # the rest eager (H100, 2026-11-27: 13-15k tokens/s).
    assert len(shapes) > 3 and recompiles
    assert not [r for r in recompiles if "size mismatch" in r or "cache" in r or ".layers[" in r]
    assert compiled["config"]["compile"] is True
    assert compiled["best_val_mae"] == pytest.approx(eager["best_val_mae"], rel=2e-2)


def test_the_optimiser_settings_come_from_the_command_line(runner, split_dir, tmp_path, monkeypatch):
    from investment_risk.training import recipe

    seen = []
    monkeypatch.setattr(recipe, "train", lambda config, **resume: seen.append(config) or {"best_val_mae": 1.0,
                                                                                        "best_epoch": 1})
    base = ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "run")]
    result = runner.invoke(main, [*base, "--weight-decay", "0", "--max-grad-norm", "0.5", "--log-every", "3"])
    assert result.exit_code == 0, result.output
    assert (seen[0].weight_decay, seen[0].max_grad_norm, seen[0].log_every) == (0.0, 0.5, 3)
    for option, value in (("--weight-decay", "-0.1"), ("--max-grad-norm", "0"), ("--log-every", "0")):
        bad = runner.invoke(main, [*base, option, value])
        assert bad.exit_code == 2 and option in bad.output, bad.output


def test_a_run_that_diverges_stops_with_exit_2_and_json_lines(split_dir, tmp_path, runner, monkeypatch):
    # It ended with exit 0 and a NaN model that evaluate, report compare and export all took for a whole one; its
    # log lines held a bare NaN, which no JSON parser reads.
    from investment_risk.training.distillation import DistillationTask

    real = DistillationTask.loss_and_preds

    def blown_up(self, *args, **kwargs):
        loss, preds, token_loss = real(self, *args, **kwargs)
        return loss * float("nan"), preds * float("nan"), token_loss

    monkeypatch.setattr(DistillationTask, "loss_and_preds", blown_up)
    args = [a if a != "2" else "1" for a in TINY_TRAIN_ARGS]  # one epoch
    result = runner.invoke(main, ["--log-format", "json", "train", *args, "--log-every", "1", "--data",
                                  str(split_dir), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "training diverged at step 1" in result.output, result.output
    assert "--learning-rate (now 0.002)" in result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["error"] for e in events if e["event"] == "command_failed"]


def test_options_that_would_overflow_are_refused_by_their_range(split_dir, tmp_path, runner):
    for option, value in (("--seed", str(2**63)), ("--learning-rate", "1e308"), ("--head-lr-multiplier", "inf")):
        result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, option, value, "--data", str(split_dir),
                                      "--out", str(tmp_path / "run"), "--dry-run"])
        assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(main, ["data", "synth", "--rows", "99999999999999", "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and "--rows" in result.output


def test_a_dry_run_refuses_an_instruction_split_without_reasoning_as_the_run_does(split_dir, tmp_path, runner):
    data = tmp_path / "data"
    shutil.copytree(split_dir, data)
    (data / "split_summary.json").unlink()  # a split edited by hand: no summary describes its files
    table = pq.read_table(data / "val.parquet")
    pq.write_table(table.drop(["reasoning"]), data / "val.parquet")
    result = runner.invoke(main, ["train", "--mode", "instruction", "--base-model", "tiny-qwen2", "--data", str(data),
                                  "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2 and "val.parquet: --mode instruction needs a 'reasoning' column" in result.output, \
        result.output


def test_dry_run_on_a_machine_without_the_named_device_fails_as_the_run_would(split_dir, tmp_path, runner):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "dry"),
                                  "--device", "cuda", "--dry-run"])
    assert result.exit_code == 1 and "--device cuda: no CUDA device is visible" in result.output, result.output
    # the run itself fails the same way, and leaves no empty run folder behind (an existing one stays)
    (tmp_path / "existing").mkdir()
    for out in (tmp_path / "new" / "run", tmp_path / "existing"):  # new/ too is made by the start
        result = runner.invoke(main, ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(out),
                                      "--device", "cuda"])
        assert result.exit_code == 1 and "no CUDA device is visible" in result.output, result.output
    assert not (tmp_path / "new").exists() and (tmp_path / "existing").is_dir()


def test_the_wall_time_counts_the_set_up(split_dir, tmp_path, monkeypatch):
    """wall_time_s began after loading and tokenising: a run's minutes of set-up were in no figure."""
    import time

    from investment_risk.modeling import presets

    load = presets.load_tokenizer
    monkeypatch.setattr(presets, "load_tokenizer", lambda path: time.sleep(2) or load(path))
    metadata = train(tiny_config(split_dir, tmp_path / "run", epochs=1))
    assert metadata["wall_time_s"] >= metadata["train_seconds"] + 2
