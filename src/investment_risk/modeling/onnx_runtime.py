"""ONNX Runtime sessions for an exported model: CUDA with I/O binding when present, else the CPU provider."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from .predict import PaddedBatch


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cpu_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """A runner (see predict.py) over model.onnx on the best provider for `device`."""

    def __init__(self, model_dir: Path, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise ConfigError(f"--device cuda: ONNX Runtime has no CUDA provider here (available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not want_cuda:
            # One process per pod: use every core we are allowed, no inter-op pool fighting for them.
            options.intra_op_num_threads = threads or usable_cpus()
            options.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"

    @classmethod
    def from_session(cls, session: Any) -> "OnnxRunner":
        runner = cls.__new__(cls)
        runner.session, runner.provider = session, session.get_providers()[0]
        runner.on_cuda = runner.provider == "CUDAExecutionProvider"
        return runner

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
