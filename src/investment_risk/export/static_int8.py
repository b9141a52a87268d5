"""Static int8 for the CPU engines: NNCF quantises the fused fp32 graph's MatMuls (weights per channel, activations
calibrated on training articles, SmoothQuant first) into a QDQ file beside model.onnx. It quantises the graph from
before attention was packed: packed, the Q, K and V projections are inside the Attention operator, where NNCF
leaves them in fp32. OpenVINO runs it on the
CPU's int8 dot-product units (VNNI, AMX) and keeps the rest in bf16 where the CPU has bf16.

It is one more candidate for the CPU default, measured like the others on the validation split: it wins only
where it is the fastest and its val MAE stays within the tolerance of fp32's (short inputs, here), and it is
deleted when it does not win, so an export ships only the files it runs.
"""

from __future__ import annotations

import contextlib
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from ..core.logs import get_logger, library_prints_aside
from ..modeling.loading import run_split
from ..modeling.predict import padded_batches
from ..modeling.tokens import article_texts, encode, sorted_batches
from .pooling import pooled_nodes

CALIBRATION_ROWS = 128  # training articles; 16 batches of 8, as NNCF's transformer recipe suggests
CALIBRATION_BATCH = 8


# NNCF's quantisation grew by 4.8x the fp32 weights of a Qwen2.5-0.5B-shaped graph (8.8 GiB for 1.84 GiB), and a
# 1.5B one was killed for memory at 23 GiB: with less free memory than this, the twin is not attempted.
NNCF_MEMORY_PER_WEIGHT_BYTE = 5


def available_memory(cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process may still take: the machine's MemAvailable, capped by its cgroup's limit less usage (v2
    memory.max / memory.current, v1 memory.limit_in_bytes / memory.usage_in_bytes); None when neither is known."""
    found = []
    with contextlib.suppress(OSError, ValueError):
        found += [int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                  if line.startswith("MemAvailable:")]
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            bound = (cgroup / limit).read_text().strip()
            if bound != "max" and int(bound) < 2**60:  # v1 writes "no limit" as a huge number
                found.append(int(bound) - int((cgroup / usage).read_text()))
            break
    return min(found) if found else None


def int8_unavailable_reason(weight_bytes: int = 0) -> str:
    """Why no static int8 candidate can be made here for a graph with `weight_bytes` of fp32 weights ("" when it can)."""
    missing = [name for name in ("nncf", "openvino") if find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (the project's `cpu` extra)"
    return memory_shortfall(weight_bytes, NNCF_MEMORY_PER_WEIGHT_BYTE, "NNCF")


def memory_shortfall(weight_bytes: int, per_weight_byte: float, who: str) -> str:
    """Why a quantiser (`who`) that peaks at `per_weight_byte` times the weights cannot run here ("" when it can)."""
    needed, available = per_weight_byte * weight_bytes, available_memory()
    if available is not None and available < needed:
        return (f"{who} would need about {needed / 2**30:.1f} GiB ({per_weight_byte}x the "
                f"{weight_bytes / 2**30:.2f} GiB of weights) and {available / 2**30:.1f} GiB are available")
    return ""


def calibration_rows(tokenizer: Any, metadata: dict[str, Any]) -> list[np.ndarray]:
    """Training articles tokenised as the scorer will: calibration never sees the validation rows it is judged on."""
    from ..datasets.readers import read_articles

    train = run_split(metadata, "train")
    if train is None:
        return []
    table = read_articles([train]).slice(0, CALIBRATION_ROWS)
    return encode(tokenizer, article_texts(table), int(metadata["max_length"]),
                  truncation=metadata.get("truncation", "head"))


def _quiet_nncf() -> None:
    """NNCF logs every node it leaves unquantised at INFO, through a handler of its own on stdout, where each line
    must be one of our JSON events: its warnings and errors go to stderr, like every library's."""
    import logging
    import sys

    logger = logging.getLogger("nncf")
    logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler:  # NNCF's own (not a subclass someone else added: a test's)
            handler.setStream(sys.__stderr__)  # the process's own: a test's swapped stream would be closed later


def quantize_int8(model_path: Path, out: Path, rows: list[np.ndarray], pad_id: int, external: bool) -> Path:
    """Write `out` (the twin, `model.int8.onnx`, with its weights in `out`.data when `external`) from `model_path` (a fused
    fp32 graph), calibrated on `rows`."""
    import nncf
    import onnx

    _quiet_nncf()
    order = sorted_batches(np.array([len(r) for r in rows]), CALIBRATION_BATCH)
    samples = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask}
               for b in padded_batches(rows, pad_id, order)]
    # A graph over 2 GB cannot be one protobuf: NNCF then reads its weights from the folder itself.
    advanced = None
    if external:
        from nncf.onnx.quantization.backend_parameters import BackendParameters
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        advanced = AdvancedQuantizationParameters(
            backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(model_path.parent.resolve())})
    # NNCF draws progress bars on stdout (export's own progress events say where it is)
    with library_prints_aside():
        quantized = nncf.quantize(onnx.load(str(model_path), load_external_data=not external), nncf.Dataset(samples),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
                                  ignored_scope=nncf.IgnoredScope(names=pooled_nodes(model_path), validate=False),
                                  advanced_parameters=advanced)
    onnx.save(quantized, str(out), save_as_external_data=external, location=f"{out.name}.data")
    get_logger().info("int8_quantized", file=out.name, calibration_rows=len(rows), batches=len(samples))
    return out

