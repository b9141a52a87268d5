"""OpenVINO reading the same model.onnx on CPUs (bf16 on AMX / AVX-512 BF16 cores, else fp32), or its static int8 twin."""

from __future__ import annotations

from pathlib import Path
import numpy as np

from ..core.errors import ConfigError
from .onnx_runtime import usable_cpus
from .predict import PaddedBatch

PRECISIONS = ("bf16", "f32")


def openvino_available() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def cpu_supports(precision: str) -> bool:
    """Whether this CPU runs `precision` natively (bf16 needs AMX or AVX-512 BF16, else OpenVINO emulates it)."""
    import openvino as ov

    if precision == "f32":
        return True
    return precision.upper() in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRunner:
    """A runner (see predict.py) compiling model.onnx for the CPU at the given inference precision."""

    def __init__(self, model_path: Path, precision: str = "bf16", threads: int | None = None, label: str = "") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if not openvino_available():
            raise ConfigError("this model's CPU engine is OpenVINO, which is not installed (pip install openvino, "
                              "the project's `cpu` extra)")
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads or usable_cpus(),
                  "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
        self.compiled = core.compile_model(str(model_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.provider = f"openvino-cpu-{label + '-' if label else ''}{precision}"

    def __call__(self, batch: PaddedBatch) -> np.ndarray:
        result = self.request.infer({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        return np.asarray(result[self.compiled.output("scores")], dtype=np.float32)
