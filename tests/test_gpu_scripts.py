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
    "train": ("gpu-train.json", ("recipe", "target_met")),
    "export": ("gpu-export.json", ("model_json", "export_step_seconds", "score")),
}


@pytest.mark.gpu_smoke  # six minutes of the suite's twenty on 2 cores: `make gpu-smoke`
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
        assert builder["articles_per_second_first_pass"] > 0  # the steady rate and the first pass's, both
        assert results["torch_bf16_sdpa_bucketed"]["articles_per_second_first_pass"] > 0
        assert builder["fused_operators"]["GroupQueryAttention"] == 2 and dynamo["articles_per_second"] > 0
        assert dynamo["fused_operators"]["MultiHeadAttention"] == 2
        assert results["onnxruntime_cuda"]["builder_bf16"]["graph"]["precision"] == "bf16"
        assert builder["max_abs_diff_relative_to_largest_score"] < 0.05 > dynamo["max_abs_diff_relative_to_largest_score"]
        for profile in (builder["kernel_profile"], results["torch_bf16_sdpa_bucketed"]["kernel_profile"]):
            assert profile["articles"] > 0 and profile["wall_ms_per_article"] > 0  # no CUDA kernels on the CPU
    if step == "export":
        assert results["model_json"]["dtype"] == "fp16" and results["score"]["invariant_holds"]


def test_a_kernel_profile_adds_up_device_time_by_kind_and_leaves_out_host_events():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from kernel_profile import summarise
    finally:
        sys.path.remove(str(ROOT / "bench"))
    kernel = {"cat": "kernel", "ph": "X"}
    events = [
        {**kernel, "name": "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "dur": 600.0},  # cuBLAS 12.8's GEMM
        {**kernel, "name": "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64", "dur": 200.0},
        {**kernel, "name": "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "dur": 100.0},
        {**kernel, "name": "onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<half, 256, 8, true>", "dur": 50.0},
        {**kernel, "name": "_BinaryElementWiseSimple<half, Mul>", "dur": 20.0},
        {**kernel, "name": "onnxruntime::cuda::BroadcastKernel<half>", "dur": 10.0},  # "cast" in Broadcast
        {**kernel, "name": "elementwise_kernel<gpu_kernel_impl_nocast<BinaryFunctor>>", "dur": 5.0},
        {**kernel, "name": "_UnaryElementWise<half, float, OP_Cast<half>>", "dur": 5.0},
        {"cat": "gpu_memcpy", "ph": "X", "name": "Memcpy HtoD (Pinned -> Device)", "dur": 10.0},
        {"cat": "cpu_op", "ph": "X", "name": "aten::mm", "dur": 5000.0},  # host time: not the GPU's
        {**kernel, "ph": "i", "name": "an instant marker", "dur": 0.0},
    ]
    summary = summarise(events, articles=10, wall_s=0.002)
    assert summary["device_events"] == 9 and summary["gpu_ms_per_article"] == 0.1
    assert summary["gpu_busy_share_of_wall"] == 0.5
    assert summary["share_by_kind"] == {"matmul": 0.8, "attention": 0.1, "norm": 0.05, "elementwise/other": 0.035,
                                        "copy/cast": 0.015}
    assert [k["kind"] for k in summary["top_kernels"][:3]] == ["matmul", "matmul", "attention"]
    assert summary["top_kernels"][0]["ms_per_article"] == 0.06 and summary["top_kernels"][0]["calls"] == 1
