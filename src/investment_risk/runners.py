"""Model runners for scoring: ONNX Runtime (the production path) and the merged PyTorch model (the reference).

Both take padded numpy batches and return raw scores (n, 8) as float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputError


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OnnxRunner:
    """An ONNX Runtime session on the best provider for `device`: CUDA with I/O binding when present, else CPU."""

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

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if not self.on_cuda:
            return self.session.run(["scores"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("scores", "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)


class TorchRunner:
    """The merged PyTorch model of a run (or of an exported model's source run): bf16 + SDPA on CUDA, fp32 on CPU."""

    def __init__(self, model_path: Path, device: str = "auto") -> None:
        import torch

        from .export import merged_scoring_module
        from .train import pick_device

        run_dir = model_path
        if (model_path / "model.json").exists():
            run_dir = Path(json.loads((model_path / "model.json").read_text())["source_run"])
            if not run_dir.exists():
                raise InputError(f"{model_path}: --backend torch needs the source run {run_dir}, which is gone")
        self.device = pick_device(device)
        meta = json.loads((run_dir / "training_metadata.json").read_text())
        self.instruction = meta.get("training_mode") == "instruction"
        if self.instruction:  # the score head on the prompt's last token: one forward pass, no generation
            from .instruct_train import load_instruction_run

            module, _, _ = load_instruction_run(run_dir)
        else:
            module, _, _ = merged_scoring_module(run_dir)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.module = module.to(self.device, dtype=self.dtype or torch.float32).eval()
        self.provider = f"torch-{self.device.type}"

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        from .batching import to_device

        with torch.inference_mode():
            if self.instruction:
                prompt_end = to_device(mask.sum(axis=1) - 1, self.device)
                _, out = self.module(to_device(ids, self.device), to_device(mask, self.device), prompt_end)
            else:
                out = self.module(to_device(ids, self.device), to_device(mask, self.device))
        return out.float().cpu().numpy()


def make_runner(backend: str, model_path: Path, device: str, threads: int | None = None) -> Any:
    if backend == "onnx":
        return OnnxRunner(model_path, device, threads)
    if backend == "torch":
        return TorchRunner(model_path, device)
    raise ConfigError(f"--backend must be onnx or torch, not {backend!r}")
