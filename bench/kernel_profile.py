"""Where a GPU forward pass spends its time, kernel by kernel, for PyTorch and ONNX Runtime alike.

torch.profiler's CUDA activity is CUPTI's, which records every kernel the process launches, whichever library
launched it, so ONNX Runtime's CUDA provider shows up in the same trace as PyTorch's own kernels (ONNX Runtime's
own profiler times its nodes on the host, where CUDA launches return at once). The trace is read as Chrome's JSON,
because kernels that no PyTorch operator launched have no place in `key_averages()`.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

# The first pattern that matches a kernel's name names its kind; the order matters (a flash kernel may say "gemm").
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|attn|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|nvjet|matmul|hmma|wgmma", re.I)),  # nvjet: cuBLAS 12.8+
    ("norm", re.compile(r"norm", re.I)),
    ("rotary", re.compile(r"rotary|rope", re.I)),
    # ONNX Runtime's Cast is `OP_Cast`; a lower-case "cast" is in BroadcastKernel and PyTorch's "nocast" functors
    ("copy/cast", re.compile(r"(?i:memcpy|memset|copy|transpose|concat)|OP_Cast|\bCast")),
)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "elementwise/other")


def summarise(events: list[dict], articles: int, wall_s: float, top: int = 15) -> dict:
    """Chrome-trace events of one profiled run -> GPU time per article by kind of kernel and the top kernels.
    `gpu_busy_share_of_wall` below 1 is time the GPU waited on the host (launches, copies, Python); the wall
    time includes the profiler's own overhead, so the share is a lower bound."""
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and e.get("ph") == "X"]
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in device:
        entry = per_name[event["name"]]
        entry[0] += float(event.get("dur", 0.0)) / 1e3  # microseconds -> ms
        entry[1] += 1
    busy_ms = sum(ms for ms, _ in per_name.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_name.items():
        by_kind[kind_of(name)] += ms
    ranked = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "articles": articles,
        "wall_ms_per_article": round(wall_s * 1e3 / articles, 4),
        "gpu_ms_per_article": round(busy_ms / articles, 4),
        "gpu_busy_share_of_wall": round(busy_ms / (wall_s * 1e3), 3) if wall_s > 0 else None,
        "device_events": len(device),
        "share_by_kind": {kind: round(ms / busy_ms, 3) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])}
        if busy_ms else {},
        "top_kernels": [{"name": name[:160], "kind": kind_of(name), "calls": calls,
                         "ms_per_article": round(ms / articles, 4), "share": round(ms / busy_ms, 3)}
                        for name, (ms, calls) in ranked],
    }


def profile_kernels(step: Callable[[], None], articles: int, cuda: bool) -> dict:
    """Run `step` once under the profiler (CUDA kernels too when `cuda`) and summarise its device time. A failure
    (CUPTI missing or busy) is recorded, not raised: the measurements after it matter more than the profile."""
    try:
        return _profile(step, articles, cuda)
    except Exception as error:  # noqa: BLE001 - recorded in the results
        return {"error": f"{type(error).__name__}: {error}"}


def _profile(step: Callable[[], None], articles: int, cuda: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return summarise(events, articles, wall_s)
