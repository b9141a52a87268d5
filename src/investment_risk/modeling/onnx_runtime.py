"""ONNX Runtime sessions for an exported model: CUDA with I/O binding when present, else the CPU provider."""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError, RetryableError
from ..core.logs import get_logger
from .predict import PaddedBatch


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its affinity, capped by a cgroup CPU quota. A pod with a CPU limit and no
    cpuset sees every core of the node, yet gets only its quota: one thread per node core would be throttled."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = max(1, os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return min(cpus, max(1, math.ceil(quota))) if quota else cpus


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 cpu.max, or v1 cfs quota / period); None when unlimited or unknown."""
    try:
        if (cgroup / "cpu.max").exists():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def session_options(cuda: bool, threads: int | None = None) -> Any:
    """How every session here is set up: all graph optimisations, sequential execution; on the CPU one process per pod
    on every core it may use, and no SkipLayerNormalization fused back from Add + LayerNormalization at load (4x
    slower on the CPU: graph_passes.fuse_graph has the figures)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not cuda:
        # One process per pod: use every core we are allowed, no inter-op pool fighting for them.
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    return options


def load_cuda_libraries(ort: Any) -> None:
    """Load the CUDA libraries ONNX Runtime's CUDA provider links against (cuBLAS, cuDNN, the CUDA runtime) before
    its session starts: they come with PyTorch's nvidia packages, which no library path names, so the provider
    finds them only once torch has loaded them (ONNX Runtime's documented order: torch first) or once
    `onnxruntime.preload_dlls()` has found them beside it. Without either, ONNX Runtime falls back to the CPU."""
    try:
        importlib.import_module("torch")  # loads its CUDA libraries into the process
    except ImportError:
        pass
    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - a best effort (torch may have loaded them): if the provider
            # still fails, ONNX Runtime's own error names the library and OnnxRunner refuses the CPU fallback
            get_logger().debug("cuda_preload_failed", error=str(exc))


class OnnxRunner:
    """A runner (see predict.py) over an ONNX file on the best provider for `device`: the one way ONNX Runtime runs
    here, for the scorer and for the export's measurements alike."""

    def __init__(self, graph: Path, device: str = "auto", threads: int | None = None, label: str = "") -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise ConfigError(f"--device cuda: ONNX Runtime has no CUDA provider here (available: {', '.join(available)})")
        if want_cuda:
            load_cuda_libraries(ort)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(graph), session_options(want_cuda, threads), providers=providers)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        # what ran, as the scorer's metrics report it: CPUExecutionProvider-int8 for the dynamic int8 twin
        self.provider = self.session.get_providers()[0] + (f"-{label}" if label else "")
        if want_cuda and not self.on_cuda:  # ONNX Runtime falls back to the CPU with only a log line of its own
            raise RetryableError("ONNX Runtime could not start its CUDA provider (its CUDA or cuDNN libraries did not "
                                 "load: see its error above); pass --device cpu to score on the CPU")

    def __call__(self, batch: PaddedBatch) -> np.ndarray:
        ids, mask = batch.input_ids, batch.attention_mask
        if not self.on_cuda:
            return self.session.run(["scores"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        from onnxruntime import OrtValue

        # I/O binding: inputs copied to the device once, the output left there until the one copy back.
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", OrtValue.ortvalue_from_numpy(ids, "cuda", 0))
        binding.bind_ortvalue_input("attention_mask", OrtValue.ortvalue_from_numpy(mask, "cuda", 0))
        binding.bind_output("scores", "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)
