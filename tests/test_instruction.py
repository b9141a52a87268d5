import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from investment_risk.cli import main
from investment_risk.datasets.split import SplitConfig, run_split
from investment_risk.datasets.synth import SynthConfig, generate
from investment_risk.modeling.prompts import parse_generation
from investment_risk.training.config import TrainConfig
from investment_risk.training.recipe import train

from .conftest import assert_json_stdout, assert_same_history

EXE = str(Path(sys.executable).parent / "investment-risk")
ARGS = ["--mode", "instruction", "--base-model", "tiny-qwen2", "--epochs", "2", "--batch-size", "8",
        "--learning-rate", "3e-3", "--warmup-steps", "1", "--checkpoint-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instruction-data")
    pq.write_table(generate(SynthConfig(rows=50, seed=8, long_tail_share=0.0)), root / "all.parquet")
    run_split([str(root / "all.parquet")], root / "data", SplitConfig(val=0.2, test=0.1, seed=3))
    return root / "data"


@pytest.fixture(scope="module")
def instruction_run(small_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruction-run") / "run"
    metadata = train(TrainConfig(mode="instruction", base_model="tiny-qwen2", data=str(small_split), out=str(out), epochs=2,
                                 batch_size=8, learning_rate=3e-3, warmup_steps=1, checkpoint_steps=2, device="cpu",
                                 train_embeddings=True))
    return out, metadata


def test_run_package_and_falling_losses(instruction_run):
    out, metadata = instruction_run
    assert metadata["training_mode"] == "instruction" and metadata["include_prompt"] is True
    assert metadata["max_length"] == 1024
    # scoring builds prompts with the room left after the longest target, as training did
    assert 0 < metadata["prompt_max_length"] < metadata["max_length"]
    for name in ("adapter_model.safetensors", "regression_head.safetensors", "regression_head.json", "tokenizer.json",
                 "token_embeddings.safetensors"):
        assert (out / "model" / name).exists(), name
    history = json.loads((out / "training_history.json").read_text())
    assert history[1]["train"]["token_loss"] < history[0]["train"]["token_loss"]
    assert history[1]["val"]["token_loss"] < history[0]["val"]["token_loss"]
    assert history[1]["train"]["loss"] < history[0]["train"]["loss"]  # the head's MSE
    assert (out / "training_reports" / "training_report.docx").exists()


def test_evaluate_head_and_constrained_generation(instruction_run, small_split, runner, tmp_path):
    out, _ = instruction_run
    result = runner.invoke(main, ["evaluate", "--model", str(out), "--data", str(small_split / "test.parquet"), "--explain",
                                  "--max-new-tokens", "160", "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["head_mae"] == report["mae"] > 0 and report["decoding"] == "constrained"
    # two epochs on 35 rows teach no format, yet every answer parses: the grammar rules out malformed output
    # Generated for the rows the head is judged on (prefiltered noise has no scores), so the two MAEs compare
    judged = report["rows"] - report["rows_prefiltered"]
    assert report["parse_rate"] == 1.0 and report["generated_rows"] == judged and not report["parse_problems"]
    assert report["generated_mae"] is not None and len(report["explanations"]) == judged == len(report["explanation_ids"])
    [event] = [e for e in assert_json_stdout(result) if e["event"] == "evaluated"]
    assert event["parse_rate"] == 1.0


def test_free_generation_reports_what_went_wrong(instruction_run, small_split, runner, tmp_path):
    out, _ = instruction_run
    result = runner.invoke(main, ["evaluate", "--model", str(out), "--data", str(small_split / "test.parquet"), "--explain",
                                  "--free-generation", "--max-new-tokens", "100", "--out", str(tmp_path / "e.json"),
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["decoding"] == "free" and len(report["explanations"]) == report["rows"] - report["rows_prefiltered"]
    # The report's figures are those of its own texts, parsed again here.
    parsed = [parse_generation(text) for text in report["explanations"]]
    assert report["parse_rate"] == sum(p.complete for p in parsed) / len(parsed)
    assert report["generated_rows"] == sum(not any(np.isnan(p.vector())) for p in parsed)
    assert sum(report["parse_problems"].values()) == sum(len(p.problems) for p in parsed)


def test_a_token_budget_too_small_for_the_json_is_refused(instruction_run, small_split, runner):
    # Every answer was cut inside its JSON: parse rate 0, read as a model that failed the format.
    out, _ = instruction_run
    result = runner.invoke(main, ["evaluate", "--model", str(out), "--data", str(small_split / "test.parquet"), "--explain",
                                  "--max-new-tokens", "24", "--device", "cpu"])
    assert result.exit_code == 2 and "--max-new-tokens 24: the scores' JSON alone takes" in result.output, result.output


def test_trained_embeddings_are_saved_and_restored(instruction_run):
    import torch
    from safetensors.torch import load_file

    from investment_risk.modeling.loading import EMBEDDINGS_FILE, load_instruction_run
    out, _ = instruction_run
    saved = load_file(str(out / "model" / EMBEDDINGS_FILE))["weight"]
    model, _, _ = load_instruction_run(out)
    assert torch.equal(model.lm.get_input_embeddings().weight, saved)
    assert torch.equal(model.lm.get_output_embeddings().weight, saved)  # tied: the LM head learned too


def test_train_embeddings_needs_instruction_mode(small_split, tmp_path, runner):
    args = [a if a != "instruction" else "distillation" for a in ARGS]
    result = runner.invoke(main, ["train", *args, "--train-embeddings", "--data", str(small_split), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--train-embeddings needs --mode instruction" in result.output


def test_score_with_the_head(instruction_run, small_split, tmp_path, runner):
    from investment_risk.scoring.pipeline import ScoreConfig, score
    out, _ = instruction_run
    # the ONNX backend names the one that scores it, not export (which refuses instruction runs)
    result = runner.invoke(main, ["score", "--model", str(out), "--input", str(small_split / "test.parquet"),
                                  "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "an instruction run is scored with --backend torch" in result.output
    merged = score(ScoreConfig(model=out, inputs=(str(small_split / "test.parquet"),), out=tmp_path / "s", backend="torch"))
    parts = pq.read_table(tmp_path / "s" / "part-00000.parquet")
    assert merged["invariant_holds"] and parts.num_rows == merged["rows_in"]
    # The scorer's numbers are the head's on the prompts training built, read here without the scorer.
    from investment_risk.modeling.loading import load_instruction_run
    from investment_risk.modeling.prompts import prompt_tokens
    model, tokenizer, metadata = load_instruction_run(out)
    test = pq.read_table(small_split / "test.parquet")
    rows = prompt_tokens(tokenizer, test.column("title").to_pylist(), test.column("content").to_pylist(),
                         metadata["prompt_max_length"])
    with torch.inference_mode():
        expected = [model.score(torch.as_tensor(r)[None, :], torch.ones((1, len(r)), dtype=torch.long))[0].numpy()
                    for r in rows]
    by_id = dict(zip(parts.column("id").to_pylist(), parts.column("macro_risk_severity").to_pylist()))
    for id_, head in zip(test.column("id").to_pylist(), expected):
        if by_id[id_] is not None:  # prefiltered rows have no score
            assert by_id[id_] == pytest.approx(float(np.clip(head[0], 0, 10)), abs=1e-4)


def test_resume_after_kill_matches(instruction_run, small_split, tmp_path):
    """Killed mid-run and resumed, the run's history is that of the unbroken `instruction_run` (token embeddings
    trained too, so their checkpoint is proved as well)."""
    args = ["--log-format", "json", "train", *ARGS, "--train-embeddings", "--data", str(small_split),
            "--out", str(tmp_path / "broken")]
    killed = subprocess.run([EXE, *args], capture_output=True, text=True,
                            env={**os.environ, "_INVESTMENT_RISK_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    resumed = subprocess.run([EXE, *args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_history(instruction_run[0], tmp_path / "broken", None)


def test_missing_reasoning_is_exit_2(small_split, tmp_path, runner):
    data = tmp_path / "noreason"
    data.mkdir()
    for name in ("train", "val", "test"):
        pq.write_table(pq.read_table(small_split / f"{name}.parquet").drop_columns(["reasoning"]), data / f"{name}.parquet")
    result = runner.invoke(main, ["train", *ARGS, "--data", str(data), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "needs a 'reasoning' column" in result.output


def test_encoder_models_are_refused(small_split, tmp_path, runner):
    args = [a if a != "tiny-qwen2" else "minilm" for a in ARGS]
    result = runner.invoke(main, ["train", *args, "--data", str(small_split), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "needs a causal language model" in result.output


def test_resume_refuses_another_mode(instruction_run, small_split, runner):
    out, _ = instruction_run
    args = [a if a != "instruction" else "distillation" for a in ARGS]
    result = runner.invoke(main, ["train", *args, "--data", str(small_split), "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "was trained with --mode instruction" in result.output


def test_dry_run_counts_the_instruction_model(instruction_run, small_split, tmp_path):
    from investment_risk.training.dry_run import dry_run
    _, metadata = instruction_run
    report = dry_run(TrainConfig(mode="instruction", base_model="tiny-qwen2", data=str(small_split),
                                 out=str(tmp_path / "never"), batch_size=8, train_embeddings=True))
    assert report["num_parameters"] == metadata["num_parameters"]
    assert report["num_trainable_parameters"] == metadata["num_trainable_parameters"]
    assert not (tmp_path / "never").exists()


def test_export_refuses_instruction_runs(instruction_run, tmp_path, runner):
    out, _ = instruction_run
    result = runner.invoke(main, ["export", "--run", str(out), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "score an instruction run with --backend torch" in result.output


def test_a_dry_run_builds_the_prompts_and_refuses_a_max_length_that_leaves_no_room(small_split, tmp_path, runner):
    # It said yes (counting bare articles) to a --max-length the run then refused
    args = ["train", "--mode", "instruction", "--base-model", "tiny-qwen2", "--data", str(small_split), "--dry-run"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "a"), "--max-length", "64"])
    assert result.exit_code == 2 and "no room for the article within --max-length 64" in result.output, result.output
    assert "(the longest reasoning, whose room every prompt keeps)" in result.output  # the row that is the cause
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), "--max-length", "1024"])
    assert result.exit_code == 0, result.output
    [report] = [e for e in assert_json_stdout(result) if e["event"] == "dry_run"]
    assert report["train_mean_tokens"] > 64  # instruction, article and target, not the article alone
    assert [e["what"] for e in assert_json_stdout(result) if e["event"] == "progress_done"] == ["dry_run"]
    # the share of articles cut to their prompt's room, not of rows at full length (only the longest target's)
    tight = runner.invoke(main, [*args, "--out", str(tmp_path / "c"), "--max-length", "600"])
    [tight] = [e for e in assert_json_stdout(tight) if e["event"] == "dry_run"]
    assert tight["train_truncated_share"] > report["train_truncated_share"] and tight["train_truncated_share"] > 0.5
