"""Export a trained run to ONNX: merge the adapter, export with dynamic batch and sequence axes, prove parity.

    run -> base + adapter + head -> merged PyTorch model -> torch.onnx (dynamo) -> [fp16 conversion] ->
    ONNX Runtime vs PyTorch on real tokenised batches with padding -> MODEL/ with model.json

An fp32 export whose scores differ from PyTorch by more than 1e-3 fails (exit 1): a broken graph never ships.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .batching import encode, pad_batch
from .dataio import write_dir_atomic, write_json_atomic
from .errors import ConfigError, InputError, RetryableError
from .logs import get_logger
from .spec import DIMENSIONS, default_spec

OPSET = 18
FP32_PARITY_LIMIT = 1e-3
# Above this many bytes of weights the graph keeps them in model.onnx.data (protobuf stops at 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30
# Kept in fp32 in a reduced-precision graph: reductions and exponentials that overflow in fp16.
FP32_OPS = ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Softmax", "Exp", "Div",
            "RotaryEmbedding", "Cos", "Sin"]


class ParityError(RetryableError):
    """The exported graph does not reproduce PyTorch's scores."""


def merged_scoring_module(run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The run's model with the adapter merged in, as a module (input_ids, attention_mask) -> scores (n, 8)."""
    import torch

    from .models import load_run_model

    model, tokenizer, metadata = load_run_model(run_dir)
    merged = model.merge_and_unload()

    class ScoringModel(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    return ScoringModel(merged).eval(), tokenizer, metadata


def parity_batches(tokenizer: Any, run_dir: Path, metadata: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real articles (the run's validation split, else synthetic ones), tokenised, in batches of several shapes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .synth import SynthConfig, generate

    max_length = int(metadata["max_length"])
    val = Path(metadata.get("config", {}).get("data", "")) / "val.parquet"
    tables = [pq.read_table(val, columns=["title", "content"]).slice(0, 24)] if val.exists() else []
    have = sum(t.num_rows for t in tables)
    if have < 24:  # too few real ones: top up with synthetic articles
        tables.append(generate(SynthConfig(rows=24 - have, seed=5)).select(["title", "content"]))
    table = pa.concat_tables(tables)
    from .batching import article_text

    texts = [article_text(t, c) for t, c in zip(table.column("title").to_pylist(), table.column("content").to_pylist())]
    # Short texts beside long ones so every batch has padding; one single-row batch; one full-length batch.
    texts = [t[: 40 + 37 * i] if i % 2 else t for i, t in enumerate(texts)]
    rows = encode(tokenizer, texts, max_length)
    pad = tokenizer.pad_token_id
    return [pad_batch(rows[:1], pad), pad_batch(rows[1:4], pad), pad_batch(rows[4:12], pad), pad_batch(rows[12:24], pad)]


def max_abs_difference(session: Any, module: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    import torch

    worst = 0.0
    with torch.inference_mode():
        for ids, mask in batches:
            reference = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            got = session.run(["scores"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
            worst = max(worst, float(np.abs(reference - got).max()))
    return worst


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.name.startswith("model.onnx"))


def model_digest(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in onnx_files(model_dir)}


def model_version(digests: dict[str, str]) -> str:
    joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _to_fp16(path: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    for stale in onnx_files(path.parent):
        stale.unlink()
    onnx.save_model(converted, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx.data" if external else None)


# ONNX Runtime's transformer optimizer for the architectures it knows (fuses LayerNorm + residual, bias + GELU).
ORT_OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert"}


def _optimize(path: Path, config: Any, external: bool) -> dict[str, int] | None:
    """Fuse with ONNX Runtime's transformer optimizer where it supports the architecture; None where it does not."""
    model_type = ORT_OPTIMIZER_TYPES.get(getattr(config, "model_type", ""))
    if model_type is None:
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(path), model_type=model_type, num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    for stale in onnx_files(path.parent):
        stale.unlink()
    optimized.save_model_to_file(str(path), use_external_data_format=external)
    return fused


def _to_int8(path: Path, external: bool) -> None:
    """Dynamic int8 quantisation of the MatMuls (ONNX Runtime's quantiser): for CPU scoring."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = path.with_name("fp32.onnx")
    for stale in onnx_files(path.parent):
        stale.rename(stale.with_name(stale.name.replace("model.onnx", "fp32.onnx")))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser advises pre-processing on the root logger at every call
    try:
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=external,
                         # fused ops (SkipLayerNormalization) defeat shape inference; their outputs are fp32
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    for stale in path.parent.glob("fp32.onnx*"):
        stale.unlink()


def cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: Any, example: tuple[Any, ...], path: Path, external: bool) -> None:
    import torch

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        module, example, str(path), input_names=["input_ids", "attention_mask"], output_names=["scores"],
        opset_version=OPSET, dynamo=True, external_data=external, verbose=False,
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
    )


def export_run(run_dir: Path, out_dir: Path, dtype: str = "fp32", force: bool = False) -> dict[str, Any]:
    import torch

    log = get_logger()
    if dtype not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"--dtype {dtype}: supported are fp32, fp16 and int8 (bf16 has no ONNX Runtime CPU kernels "
                          "to prove parity with)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise InputError(f"--out {out_dir} already exists and is not empty (pass --force to replace it)")
    run_meta = run_dir / "training_metadata.json"
    if run_meta.exists() and json.loads(run_meta.read_text()).get("training_mode") == "instruction":
        raise ConfigError(f"{run_dir}: export takes distillation runs; score an instruction run with --backend torch")
    module, tokenizer, metadata = merged_scoring_module(run_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    batches = parity_batches(tokenizer, run_dir, metadata)
    info: dict[str, Any] = {}

    def build(work: Path) -> None:
        example = tuple(torch.from_numpy(a) for a in batches[1])
        log.info("onnx_export_start", run=str(run_dir), parameters=sum(p.numel() for p in module.parameters()),
                 external_data=external)
        # The exporter prints progress on stdout, which carries our JSON log lines: send it to stderr.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export(module, example, work / "model.onnx", external)
        parity: dict[str, Any] = {"fp32_max_abs_diff": max_abs_difference(cpu_session(work / "model.onnx"), module, batches),
                                  "batches": [list(ids.shape) for ids, _ in batches], "provider": "CPUExecutionProvider"}
        log.info("onnx_parity", dtype="fp32", max_abs_diff=parity["fp32_max_abs_diff"])
        if parity["fp32_max_abs_diff"] > FP32_PARITY_LIMIT:
            raise ParityError(f"ONNX export of {run_dir} differs from PyTorch by {parity['fp32_max_abs_diff']:.2e} "
                              f"(limit {FP32_PARITY_LIMIT:g}); nothing was written to {out_dir}")
        fused = _optimize(work / "model.onnx", module.inner.config, external)
        if fused is not None:
            parity["fp32_optimized_max_abs_diff"] = max_abs_difference(cpu_session(work / "model.onnx"), module, batches)
            log.info("onnx_optimized", fused=fused, max_abs_diff=parity["fp32_optimized_max_abs_diff"])
            if parity["fp32_optimized_max_abs_diff"] > FP32_PARITY_LIMIT:
                raise ParityError(f"the optimized ONNX graph of {run_dir} differs from PyTorch by "
                                  f"{parity['fp32_optimized_max_abs_diff']:.2e} (limit {FP32_PARITY_LIMIT:g})")
        if dtype == "fp16":
            _to_fp16(work / "model.onnx", external)
            parity["fp16_max_abs_diff"] = max_abs_difference(cpu_session(work / "model.onnx"), module, batches)
            parity["fp32_ops"] = FP32_OPS
            log.info("onnx_parity", dtype="fp16", max_abs_diff=parity["fp16_max_abs_diff"])
        if dtype == "int8":
            _to_int8(work / "model.onnx", external)
            parity["int8_max_abs_diff"] = max_abs_difference(cpu_session(work / "model.onnx"), module, batches)
            log.info("onnx_parity", dtype="int8", max_abs_diff=parity["int8_max_abs_diff"])
        tokenizer.save_pretrained(work)
        digests = model_digest(work)
        spec = default_spec()
        written = {
            "format": "onnx", "dimensions": list(DIMENSIONS), "max_length": int(metadata["max_length"]), "dtype": dtype,
            "opset": OPSET, "inputs": ["input_ids", "attention_mask"], "outputs": ["scores"],
            "pad_token_id": tokenizer.pad_token_id, "source_run": str(run_dir.resolve()),
            "base_model": metadata["model_name"], "training_mode": metadata["training_mode"],
            "best_val_mae": metadata.get("best_val_mae"), "filter_name": spec.name, "filter_version": spec.version,
            "model_version": model_version(digests), "sha256": digests, "external_data": external,
            "parity": parity, "ort_fused_operators": fused, "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "exporter": {"investment-risk": __version__, "torch": torch.__version__},
        }
        write_json_atomic(written, work / "model.json")
        info.update(written)

    write_dir_atomic(out_dir, build)
    log.info("exported", out=str(out_dir), model_version=info["model_version"], dtype=dtype)
    return info


def verify_model_dir(model_dir: Path) -> dict[str, Any]:
    """model.json, checked against the ONNX files it describes: a mismatch is an error (exit 2)."""
    meta_path = model_dir / "model.json"
    if not meta_path.exists():
        raise InputError(f"{model_dir}: not an exported model (no model.json)")
    info = json.loads(meta_path.read_text())
    actual = model_digest(model_dir)
    if actual != info.get("sha256"):
        raise InputError(f"{model_dir}: ONNX files do not match the sha256 in model.json (expected "
                         f"{info.get('sha256')}, found {actual}); re-export the model")
    if list(info.get("dimensions", [])) != list(DIMENSIONS):
        raise InputError(f"{model_dir}: model.json dimensions {info.get('dimensions')} are not {list(DIMENSIONS)}")
    return info
