"""Which engine scores an exported model on CPUs, chosen by measurement when it is exported.

Every candidate scores the same validation rows: ONNX Runtime on the fused fp32 graph and on its dynamic int8 twin
(MatMul weights per channel), OpenVINO on that graph with bf16 inference precision (where the CPU has bf16 units:
AMX or AVX-512 BF16) and in fp32, and OpenVINO on the static int8 twin of the graph (static_int8.py). The fastest
whose validation MAE is within MAE_TOLERANCE of the fp32 reference wins; without labels only the fp32 engines may
win. The scorer reads the choice from model.json and falls back to ONNX Runtime where the chosen engine cannot run
(not installed, no bf16 units), saying so in its logs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from ..core.logs import get_logger
from ..core.spec import default_spec
from ..modeling.description import CPU_ENGINES, TWIN_FILES
from ..modeling.loading import cpu_engine_usable, cpu_runner
from ..modeling.predict import CPU_TOKEN_BUDGET, predict

MAE_TOLERANCE = 0.02
FP32_ENGINES = ("onnxruntime", "openvino-f32")  # the rest trade precision for speed and need labels to be chosen
MEASURE_PASSES = 2


def _rows_per_second(runner: Any, rows: list[np.ndarray], pad_id: int, token_budget: int,
                     what: str) -> tuple[float, np.ndarray]:
    predict(runner, rows[:8], pad_id, token_budget=token_budget)  # warm-up: first-call allocations, JIT
    best, scores = float("inf"), None
    for _ in range(MEASURE_PASSES):
        started = time.perf_counter()
        scores = predict(runner, rows, pad_id, token_budget=token_budget, progress=what)
        best = min(best, time.perf_counter() - started)
    return len(rows) / best, scores


def measure_cpu_engines(model_path: Path, rows: list[np.ndarray], labels: np.ndarray | None, pad_id: int,
                        engines: tuple[str, ...] = CPU_ENGINES, threads: int | None = None,
                        token_budget: int = CPU_TOKEN_BUDGET) -> list[dict[str, Any]]:
    """rows/s, max |score - fp32 ONNX Runtime's| and (with labels) val MAE of each engine that can run here, run as
    the scorer runs it (the same runner, threads and token budget).
    ONNX Runtime comes first: its scores (within 1e-3 of PyTorch, proved before) are the reference."""
    out = []
    reference = None
    for engine in engines:
        usable, why = cpu_engine_usable(engine)
        if usable and engine in TWIN_FILES and not model_path.with_name(TWIN_FILES[engine]).exists():
            usable, why = False, f"no {TWIN_FILES[engine]} beside {model_path.name}"
        if not usable:
            out.append({"engine": engine, "skipped": why})
            continue
        rate, scores = _rows_per_second(cpu_runner(model_path, engine, threads), rows, pad_id, token_budget,
                                       f"measure {engine}")
        scores = default_spec().clip(scores)
        reference = scores if reference is None else reference
        row = {"engine": engine, "rows_per_second": round(rate, 2),
               "max_abs_diff": float(np.abs(scores - reference).max())}
        if labels is not None:
            row["val_mae"] = float(np.abs(scores - labels).mean())
        out.append(row)
        get_logger().info("cpu_engine_measured", **row)
    return out


def choose_cpu_engine(measured: list[dict[str, Any]], requested: str = "auto") -> tuple[str, str]:
    """(engine, why) from the measurements: `requested` if named, else the fastest accurate one."""
    ran = [m for m in measured if "rows_per_second" in m]
    if requested != "auto":
        if requested not in {m["engine"] for m in ran}:
            reason = next((m.get("skipped") for m in measured if m["engine"] == requested), "not a CPU engine")
            raise ConfigError(f"--cpu-engine {requested}: cannot run here ({reason})")
        return requested, "named by --cpu-engine"
    fp32 = next(m for m in ran if m["engine"] == "onnxruntime")
    if "val_mae" in fp32:
        accurate = [m for m in ran if m["val_mae"] - fp32["val_mae"] <= MAE_TOLERANCE]
        rule = f"the fastest whose val MAE is within {MAE_TOLERANCE} of fp32's ({fp32['val_mae']:.4f})"
    else:
        accurate = [m for m in ran if m["engine"] in FP32_ENGINES]
        rule = "the fastest fp32 engine (no labels to bound a reduced precision's error)"
    best = max(accurate, key=lambda m: m["rows_per_second"])
    return best["engine"], f"{rule}: {best['rows_per_second']} rows/s"
