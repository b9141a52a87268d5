"""The prepared device runs (bench/gpu.sh) on the CPU with a tiny model (BENCH_SMOKE=1): a lent GPU is rare and its
15 minutes must not be spent on a script that a refactor broke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHAT_EACH_STEP_WRITES = {
    "score": ("gpu-score.json", ("torch_bf16_sdpa_bucketed", "onnxruntime_cuda", "original_fp32_pad512_batch8")),
    "train": ("gpu-train.json", ("recipe",)),
    "export": ("gpu-export.json", ("model_json", "score")),
}


@pytest.mark.parametrize("step", sorted(WHAT_EACH_STEP_WRITES))
def test_each_gpu_step_runs_through_on_the_cpu(step, tmp_path):
    env = {**os.environ, "BENCH_SMOKE": "1", "OUT": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # gpu.sh calls python3
    done = subprocess.run(["bash", "bench/gpu.sh", step], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    name, sections = WHAT_EACH_STEP_WRITES[step]
    results = json.loads((tmp_path / name).read_text())
    assert all(section in results for section in sections), results
    onnx_parts = results.get("onnxruntime_cuda", {})  # each graph records its own error and the next one still runs
    assert not [part for part in [onnx_parts, *onnx_parts.values()] if "error" in part], onnx_parts
    assert (tmp_path / f"{step}.log").exists() and "Traceback" not in (tmp_path / f"gpu-info-{step}.txt").read_text()
    if step == "score":
        builder, dynamo = results["onnxruntime_cuda"]["builder"], results["onnxruntime_cuda"]["dynamo"]
        assert builder["articles_per_second"] > 0 and len(builder["articles_per_second_by_token_budget"]) == 4
        assert builder["fused_operators"]["GroupQueryAttention"] == 2 and dynamo["articles_per_second"] > 0
        assert dynamo["fused_operators"]["MultiHeadAttention"] == 2
        assert results["onnxruntime_cuda"]["builder_bf16"]["graph"]["precision"] == "bf16"
        assert builder["max_abs_diff_relative_to_largest_score"] < 0.05 > dynamo["max_abs_diff_relative_to_largest_score"]
    if step == "export":
        assert results["model_json"]["dtype"] == "fp16" and results["score"]["invariant_holds"]
