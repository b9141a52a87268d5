"""The one inference path: right-padded, length-sorted batches through a runner, fp32 scores in input order.

Evaluation, the scorer (either backend), export's parity check and training's validation all call `predict`;
what differs is the runner, a callable from one `PaddedBatch` to its (rows, 8) scores.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import RetryableError
from ..core.logs import Progress
from ..core.spec import NUM_DIMENSIONS
from .tokens import length_batches, pad_batch, sorted_batches, to_device

# Padded tokens per model call when --token-budget is not given, by measurement (minilm on 2 AVX-512 VNNI cores,
# interleaved rounds, rows/s at budgets 1k/2k/4k/8k): at 128 tokens ONNX Runtime int8 162/160/154/138, fp32
# 63/64/59/57, OpenVINO bf16 129/132/127/128, its static int8 (2k/4k/8k) 174/171/164; at 512 tokens 28.5/29.0/26.9/
# 26.2, 15.0/15.0/13.8/12.8, 26.3/26.6/26.2/26.2 and 36.7/37.3/37.4. ONNX Runtime's activations stay in cache in
# small batches; OpenVINO does not care. A GPU wants large batches.
CPU_TOKEN_BUDGET = 2048
GPU_TOKEN_BUDGET = 16384


def token_budget_for(device: str) -> int:
    """The scorer's default budget on `device` ("cuda" or "cpu"): what the export measures with too."""
    return GPU_TOKEN_BUDGET if device == "cuda" else CPU_TOKEN_BUDGET


@dataclass(frozen=True)
class PaddedBatch:
    rows: np.ndarray  # positions in the caller's token rows
    input_ids: np.ndarray  # (rows, width) int64, right-padded to the batch's longest row
    attention_mask: np.ndarray

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


Runner = Callable[[PaddedBatch], Any]


def padded_batches(token_rows: Sequence[np.ndarray], pad_id: int, batches: Sequence[np.ndarray]) -> Iterator[PaddedBatch]:
    for rows in batches:
        ids, mask = pad_batch([token_rows[i] for i in rows], pad_id)
        yield PaddedBatch(np.asarray(rows), ids, mask)


def predict(run: Runner, token_rows: Sequence[np.ndarray], pad_id: int, *, batch_size: int | None = None,
            token_budget: int | None = None, max_rows: int = 256, batches: Sequence[np.ndarray] | None = None,
            on_batch: Callable[[PaddedBatch, float], None] | None = None,
            progress: str | None = None) -> np.ndarray:
    """Scores (n, 8) as float32 in input order.

    Batches are given, or cut longest first by rows (`batch_size`) or by padded tokens (`token_budget`).
    `on_batch(batch, seconds)` sees each batch and how long its runner took. `progress` names the loop's progress
    events, for a caller whose loop this is (evaluate, export); the scorer keeps its own over the whole shard.
    """
    lengths = np.array([len(r) for r in token_rows], dtype=np.int64)
    if batches is None:
        if token_budget is not None:
            batches = length_batches(lengths, token_budget, max_rows)
        elif batch_size is not None:
            batches = sorted_batches(lengths, batch_size)
        else:
            raise ValueError("predict needs batches, batch_size or token_budget")
    results = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(Progress(len(token_rows), progress)) if progress else None
        for batch in padded_batches(token_rows, pad_id, batches):
            started = time.perf_counter()
            results.append((batch.rows, run(batch)))
            if on_batch is not None:
                on_batch(batch, time.perf_counter() - started)
            if bar is not None:
                bar.update(len(batch.rows))
    out = np.zeros((len(token_rows), NUM_DIMENSIONS), dtype=np.float32)
    for rows, scores in results:  # device results are copied once every batch is queued
        out[rows] = scores.float().cpu().numpy() if hasattr(scores, "cpu") else np.asarray(scores, dtype=np.float32)
    return out


def pick_device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        # A device failure (exit 1): a pod on a node whose GPU or driver is missing; another node may have one.
        raise RetryableError("--device cuda: no CUDA device is visible (no GPU, or its driver, on this machine)")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


class TorchRunner:
    """A PyTorch module `forward(input_ids, attention_mask) -> (rows, 8)` on a device, under autocast if asked."""

    def __init__(self, forward: Callable[[Any, Any], Any], device: Any, autocast_dtype: Any = None,
                 synchronous: bool = False) -> None:
        self.forward = forward
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.synchronous = synchronous  # copy to the host per batch, so batch timings are true
        self.provider = f"torch-{device.type}"

    def __call__(self, batch: PaddedBatch) -> Any:
        import torch

        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                                                    enabled=self.autocast_dtype is not None):
            scores = self.forward(to_device(batch.input_ids, self.device), to_device(batch.attention_mask, self.device))
        return scores.float().cpu().numpy() if self.synchronous else scores.float()
