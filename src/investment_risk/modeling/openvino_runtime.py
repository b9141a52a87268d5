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
    """A runner (see predict.py) compiling model.onnx for the CPU at the given inference precision.

    Compiled for throughput: OpenVINO splits the cores into streams, and each batch is cut into one slice per
    stream, scored side by side. On 2 cores (minilm, static int8) that was 2-17 % faster than one latency stream
    over both cores in 7 of 9 comparisons and 1-7 % slower in 2 (bench/cpu_engines.py reports both under
    `settings`: 37.9 against 32.5 rows/s at 512 tokens, 165.5 against 167.8 at 128). `streams=1` is the latency
    mode."""

    def __init__(self, model_path: Path, precision: str = "bf16", threads: int | None = None, label: str = "",
                 streams: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if not openvino_available():
            raise ConfigError("this model's CPU engine is OpenVINO, which is not installed (pip install openvino, "
                              "the project's `cpu` extra)")
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads or usable_cpus(),
                  "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", "CACHE_DIR": ""}
        if streams is not None and streams > 1:
            config["NUM_STREAMS"] = streams
        self.compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self.output = self.compiled.output("scores")
        self.provider = f"openvino-cpu-{label + '-' if label else ''}{precision}"

    def __call__(self, batch: PaddedBatch) -> np.ndarray:
        slices = np.array_split(np.arange(len(batch.rows)), min(self.streams, len(batch.rows)))
        for request, rows in zip(self.requests, slices):
            request.start_async({"input_ids": batch.input_ids[rows], "attention_mask": batch.attention_mask[rows]})
        for request in self.requests[:len(slices)]:
            request.wait()
        return np.concatenate([np.asarray(request.get_tensor(self.output).data, dtype=np.float32)
                               for request in self.requests[:len(slices)]])
