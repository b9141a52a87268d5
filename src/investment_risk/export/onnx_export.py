"""Export a trained run to ONNX: merge the adapter, export with dynamic batch and sequence axes, prove parity.

    run -> base + adapter + head -> merged PyTorch model -> torch.onnx (dynamo) -> onnxscript fusions ->
    [fp16 / int8 conversion] -> ONNX Runtime vs PyTorch on real tokenised batches with padding -> MODEL/ + model.json

A decoder's fp16 graph (for GPUs) is written by onnxruntime-genai's model builder instead (decoder_graph.py).
An fp32 export whose scores differ from PyTorch by more than 1e-3 fails (exit 1): a broken graph never ships.
"""

from __future__ import annotations

import datetime as dt
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.atomic import locked_dir, sha256_file, write_dir_atomic, write_json_atomic
from ..core.errors import ConfigError, InputError, InvestmentRiskError, RetryableError
from ..core.logs import Progress, get_logger, library_prints_aside
from ..core.spec import DIMENSIONS, default_spec
from ..core.drift import REFERENCE_FILE, make_reference, reference_entry
from ..modeling.calibration import CALIBRATION_FILE, Calibration, load_calibration
from ..modeling.description import (CPU_ENGINES, DYNAMIC_INT8_FILE, TWIN_FILES, describe_model, model_digest,
                                    model_version, onnx_files)
from ..modeling.loading import (cpu_engine_usable, cpu_profile, cpu_runner, in_bf16, run_split, run_splits,
                                scoring_module)
from ..modeling.onnx_runtime import OnnxRunner
from ..modeling.presets import CAUSAL_TYPES
from ..modeling.predict import TorchRunner, padded_batches, predict, token_budget_for
from ..modeling.tokens import article_texts, encode
from .cpu_engine import MAE_TOLERANCE
from .graph_passes import (DYNAMIC_INT8_MEMORY_PER_WEIGHT_BYTE, FP32_OPS, export_graph, fuse_graph,
                           fused_operator_counts, graph_opset, quantize_dynamic_int8, to_fp16, to_int8)
from .decoder_graph import (build_decoder_graph, builder_missing, builds_decoder_graph, decoder_checkpoint,
                            decoder_head_problem)

FP32_PARITY_LIMIT = 1e-3
# Above this many bytes of weights the graph keeps them in model.onnx.data (protobuf stops at 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30


class ParityError(RetryableError):
    """The exported graph does not reproduce PyTorch's scores."""


PARITY_ROWS = 24


def parity_rows(tokenizer: Any, metadata: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token rows and the batches to score them in: real articles from the run's data, short beside long so every
    batch has padding, one single-row batch and one of full length; seeded random token rows top them up when the
    data is not here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    max_length = int(metadata["max_length"])
    tables = [pq.read_table(path, columns=["title", "content"])
              for name in ("val", "train") if (path := run_split(metadata, name)) is not None]
    texts = article_texts(pa.concat_tables(tables))[:PARITY_ROWS] if tables else []
    texts = [t[: 40 + 37 * i] if i % 2 else t for i, t in enumerate(texts)]
    rows = encode(tokenizer, texts, max_length, truncation=metadata.get("truncation", "head"))
    rng = np.random.default_rng(5)
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int32)
    while len(rows) < PARITY_ROWS:
        length = max_length if len(rows) % 3 == 0 else int(rng.integers(4, max_length))
        rows.append(rng.choice(vocab, size=length))
    batches = [np.arange(0, 1), np.arange(1, 4), np.arange(4, 12), np.arange(12, PARITY_ROWS)]
    return rows, batches


MEASURE_ROWS = 256  # validation rows each CPU engine scores when export picks the default


def export_steps(decoder: bool, dtype: str, has_val: bool) -> list[str]:
    """The export's named steps, in order: its progress events count them (a step `done` of `total`)."""
    if decoder:  # the model builder's graph
        middle = [*(["validation scores, PyTorch fp32"] if has_val else []), "model builder graph", f"{dtype} parity"]
    else:  # the dynamo route
        middle = ["torch.onnx export", "fusions for ONNX Runtime",
                  "CPU engines measured" if dtype == "fp32" else f"{dtype} conversion and parity"]
    return ["PyTorch scores for parity", *middle, "drift reference", "digests and model.json"]


def measurement_rows(tokenizer: Any, metadata: dict[str, Any]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The run's validation articles (tokenised as the scorer will) and their labels; None when the split is gone."""
    from ..core.spec import DIMENSIONS
    from ..datasets.readers import label_matrix, read_articles

    val = run_split(metadata, "val")
    if val is None:
        return [], None
    table = read_articles([val], labels=DIMENSIONS)
    table = table.slice(0, MEASURE_ROWS)
    return (encode(tokenizer, article_texts(table), int(metadata["max_length"]),
                   truncation=metadata.get("truncation", "head")), label_matrix(table))


def _pick_cpu_engine(path: Path, tokenizer: Any, metadata: dict[str, Any], requested: str,
                     external: bool, int8_source: Path, padding_mask_only: bool) -> dict[str, Any]:
    """Every CPU engine on the validation rows (or the parity rows), the default chosen by measurement; an engine
    named by --cpu-engine is measured alone beside the fp32 reference (a 1.5B model takes minutes per engine). The
    int8 twins (ONNX Runtime's dynamic one and NNCF's static one, both quantised from `int8_source`) are made only where
    they could be chosen (labels to bound their error, or named) and kept only if chosen."""
    from .cpu_engine import choose_cpu_engine, measure_cpu_engines
    from .static_int8 import calibration_rows, int8_unavailable_reason, memory_shortfall, quantize_int8

    rows, labels = measurement_rows(tokenizer, metadata)
    if not rows:
        rows, _ = parity_rows(tokenizer, metadata)
    engines, skipped = list(CPU_ENGINES), []
    if requested != "auto":
        engines = [e for e in CPU_ENGINES if e in ("onnxruntime", requested)]
        skipped = [{"engine": e, "skipped": f"not measured: --cpu-engine named {requested}"}
                   for e in CPU_ENGINES if e not in engines]
    weight_bytes = sum(f.stat().st_size for f in onnx_files(path.parent))
    twins = {  # engine: (why it cannot be made here, "" when it can; how to make it)
        "onnxruntime-int8": (lambda: memory_shortfall(weight_bytes, DYNAMIC_INT8_MEMORY_PER_WEIGHT_BYTE,
                                                      "ONNX Runtime's quantiser"),
                             lambda: quantize_dynamic_int8(int8_source, path.with_name(DYNAMIC_INT8_FILE), external,
                                                           padding_mask_only)),
        "openvino-int8": (lambda: int8_unavailable_reason(weight_bytes),
                          lambda: quantize_int8(int8_source, path.with_name(TWIN_FILES["openvino-int8"]),
                                                calibration_rows(tokenizer, metadata) or rows,
                                                tokenizer.pad_token_id, external)),
    }
    for twin, (unavailable, make) in twins.items():
        if twin not in engines:
            continue
        why_not = unavailable() or (
            "" if labels is not None or requested == twin else "no validation labels to bound its error")
        if why_not:
            engines.remove(twin)
            skipped.append({"engine": twin, "skipped": why_not})
        else:
            make()
    measured = measure_cpu_engines(path, rows, labels, tokenizer.pad_token_id, tuple(engines)) + skipped
    engine, why = choose_cpu_engine(measured, requested)
    for twin, name in TWIN_FILES.items():
        if twin != engine:
            for unused in path.parent.glob(f"{name}*"):
                unused.unlink()
    get_logger().info("cpu_engine_chosen", engine=engine, why=why)
    chosen = {"engine": engine, "why": why, "rows": len(rows), "measured": measured, "measured_on": cpu_profile()}
    if engine in TWIN_FILES:
        chosen["fused_operators"] = fused_operator_counts(path.with_name(TWIN_FILES[engine]))
    return chosen


def write_reference(work: Path, tokenizer: Any, metadata: dict[str, Any], calibration: Calibration | None,
                    device: str, cpu_engine: str | None = None) -> dict[str, Any] | None:
    """The score distribution batches are compared with for drift: the validation split's predictions as scoring
    will give them (on CPUs from the `cpu_engine` export chose: the same articles through the fp32 graph gave an int8
    model's nights a PSI and tier shift of their own; on a GPU from the graph on CUDA), calibrated as scoring will,
    as histograms and tier shares (None without a validation split). Articles the prefilter calls noise are left
    out, as a batch's model-scored rows leave them out."""
    from ..datasets.readers import read_articles

    val = run_split(metadata, "val")
    if val is None:
        get_logger().warning("reference_skipped", reason="the run's validation split is gone: no drift reference")
        return None
    spec = default_spec()
    table = read_articles([val])
    keep = np.flatnonzero(~spec.prefiltered(table)).tolist()
    texts = article_texts(table)
    rows = encode(tokenizer, [texts[i] for i in keep], int(metadata["max_length"]),
                  truncation=metadata.get("truncation", "head"))
    if not rows:
        get_logger().warning("reference_skipped", reason="every validation article is prefiltered noise")
        return None
    runner = (cpu_runner(work / "model.onnx", cpu_engine) if cpu_engine and device != "cuda"
              else graph_runner(work / "model.onnx", device))
    raw = spec.clip(predict(runner, rows, tokenizer.pad_token_id, token_budget=token_budget_for(device),
                            progress="drift reference"))
    scores = calibration.apply(raw) if calibration is not None else raw
    tiers, _ = spec.assign_tiers(scores)
    reference = make_reference(scores, [str(t) for t in tiers], "validation split, calibrated" if calibration else
                               "validation split", calibration is not None, raw)
    reference["engine"] = runner.provider
    write_json_atomic(reference, work / REFERENCE_FILE)
    return reference_entry(reference)


def graph_runner(path: Path, device: str) -> Any:
    """ONNX Runtime on a graph file: the CUDA provider with I/O binding on a GPU, else the CPU provider."""
    return OnnxRunner(path, "cuda" if device == "cuda" else "cpu")


def release_weights(module: Any) -> None:
    """Free the model's weights in place. Dropping the module is not enough: onnxscript's module-level rewrite
    rules keep the last graph they matched, the exported program's, whose initializers hold the Parameters."""
    import torch

    for parameter in module.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
    if torch.cuda.is_available():  # PyTorch's allocator would keep the GPU memory from ONNX Runtime's session
        torch.cuda.empty_cache()


def torch_bf16_on_gpu(module: Any, rows: list[np.ndarray], batches: list[np.ndarray], pad_id: int
                      ) -> tuple[np.ndarray, str]:
    """PyTorch bf16's scores on the GPU, what an fp16 or bf16 graph on CUDA stands for, and their name."""
    import torch

    cuda = torch.device("cuda")
    module = in_bf16(module, cuda)
    return predict(TorchRunner(module, cuda), rows, pad_id, batches=batches), "torch-bf16-cuda"


def reduced_precision_check(path: Path, reference: tuple[np.ndarray, str], rows: list[np.ndarray],
                            batches: list[np.ndarray], pad_id: int, device: str,
                            val: tuple[list[np.ndarray], np.ndarray | None], val_fp32: np.ndarray | None
                            ) -> dict[str, Any]:
    """A reduced-precision graph against PyTorch's scores (`reference`, named) on the mixed-length parity batches,
    and its validation MAE beside the fp32 graph's."""
    runner = graph_runner(path, device)
    want, name = reference
    out: dict[str, Any] = {
        "max_abs_diff": float(np.abs(want - predict(runner, rows, pad_id, batches=batches)).max()),
        "provider": runner.provider, "reference": name}
    val_rows, labels = val
    if labels is not None and val_fp32 is not None:
        scores = default_spec().clip(predict(runner, val_rows, pad_id, token_budget=token_budget_for(device),
                                             progress="validation, reduced precision"))
        out["val_mae"] = float(np.abs(scores - labels).mean())
        out["val_mae_fp32"] = float(np.abs(val_fp32 - labels).mean())
        out["val_mae_delta"] = out["val_mae"] - out["val_mae_fp32"]
    return out


NO_GPU = "PyTorch sees no CUDA device"


def cuda_missing() -> str:
    """Why this machine cannot export for CUDA ('' when it can): no GPU visible (a device failure, exit 1, which
    another node may not have) or no CUDA provider installed (exit 2: no retry installs it)."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return NO_GPU
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"ONNX Runtime's providers here: {', '.join(ort.get_available_providers())}"
    return ""


def torch_fp32_scores(module: Any, device: str, rows: list[np.ndarray], pad_id: int) -> np.ndarray:
    """PyTorch fp32's scores on `device`, batched as the scorer batches."""
    import torch

    target = torch.device(device)
    return predict(TorchRunner(module.to(target), target), rows, pad_id, token_budget=token_budget_for(device),
                   progress="validation, PyTorch fp32")


def check_out_dir(run_dir: Path, out_dir: Path, force: bool) -> None:
    """`--out` is replaced whole at the end (--force): it must be neither the run, nor inside it or around it, nor
    the working directory or above it, and what --force replaces must be an exported model."""
    out, run, here = out_dir.resolve(), run_dir.resolve(), Path.cwd().resolve()
    if out == run or out in run.parents or run in out.parents:
        raise ConfigError(f"--out {out_dir} is, holds or lies inside the training run {run_dir}: export elsewhere "
                          "(replacing it would delete the run)")
    if out == here or out in here.parents:
        raise ConfigError(f"--out {out_dir} is the working directory or above it: export into a folder of its own")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise InputError(f"--out {out_dir} already exists and is not empty (pass --force to replace it)")
        if not (out_dir / "model.json").is_file():
            raise InputError(f"--out {out_dir} holds no model.json, so it is not an exported model that --force "
                             "replaces: remove it yourself, or export elsewhere")


def export_run(run_dir: Path, out_dir: Path, dtype: str = "fp32", force: bool = False,
               cpu_engine: str = "auto", device: str = "cpu") -> dict[str, Any]:
    """Export `run_dir` into `out_dir` (model.json's contents returned), holding --out's lock from the start."""
    check_out_dir(run_dir, out_dir, force)  # a mistyped --out is refused before anything is loaded or locked
    with locked_dir(out_dir):
        return _export_run(run_dir, out_dir, dtype, force, cpu_engine, device)


def warn_refit_replaced(run_dir: Path, out_dir: Path) -> None:
    """--force over a model whose calibration `calibrate` refit (and the run's was not): the export carries the
    run's calibration, and the refit, and its model_version, go without a word otherwise."""
    try:
        old = load_calibration(out_dir) if (out_dir / CALIBRATION_FILE).exists() else None
        new = load_calibration(run_dir / "model") if (run_dir / "model" / CALIBRATION_FILE).exists() else None
    except InvestmentRiskError:  # a damaged one is replaced: nothing to keep
        return
    if old is not None and old.fitted_on.get("split") == "refit" and (new is None or new.fitted_on != old.fitted_on):
        get_logger().warning("calibration_replaced", model=str(out_dir), refit_on=old.fitted_on.get("data"),
                             remedy=f"calibrate --model {out_dir} --data {old.fitted_on.get('data')} refits it again")


def _export_run(run_dir: Path, out_dir: Path, dtype: str, force: bool, cpu_engine: str, device: str
                ) -> dict[str, Any]:
    import torch

    log = get_logger()
    if dtype not in ("fp32", "fp16", "bf16", "int8"):
        raise ConfigError(f"--dtype {dtype}: supported are fp32, fp16, bf16 and int8")
    if cpu_engine not in ("auto", "onnxruntime") and dtype != "fp32":
        raise ConfigError(f"--cpu-engine {cpu_engine}: engines are measured and chosen for --dtype fp32 exports; "
                          f"a --dtype {dtype} graph runs on ONNX Runtime")
    if cpu_engine != "auto" and not (usable := cpu_engine_usable(cpu_engine))[0]:
        raise ConfigError(f"--cpu-engine {cpu_engine}: cannot run here ({usable[1]})")  # before minutes of export
    if dtype == "bf16" and device != "cuda":
        raise ConfigError("--dtype bf16 needs --device cuda: ONNX Runtime has no bf16 CPU kernels, so the graph can "
                          "only be proved on a GPU (the CPU engines run the fp32 file in bf16 instead)")
    if device == "cuda" and (missing := cuda_missing()):
        error = RetryableError if missing == NO_GPU else ConfigError
        raise error(f"--device cuda: needs a CUDA device and onnxruntime-gpu ({missing})")
    check_out_dir(run_dir, out_dir, force)  # again, under the lock: an export that finished meanwhile
    if describe_model(run_dir).is_instruction:
        raise ConfigError(f"{run_dir}: export takes distillation runs; score an instruction run with --backend torch")
    if force:
        warn_refit_replaced(run_dir, out_dir)
    module, tokenizer, metadata = scoring_module(run_dir)
    metadata = {**metadata, "splits": run_splits(run_dir, metadata)}
    model_type = getattr(module.inner.config, "model_type", "")
    decoder = builds_decoder_graph(model_type, dtype)
    encoder = model_type not in CAUSAL_TYPES  # its attention is masked for padding alone
    if dtype == "bf16" and not decoder:
        raise ConfigError(f"--dtype bf16: only a decoder's graph (the model builder's) is written in bf16; "
                          f"{run_dir} is a {model_type!r} model (use fp16)")
    if decoder and (problem := builder_missing() or decoder_head_problem(module.inner, tokenizer)):
        raise ConfigError(f"--dtype {dtype}: {problem}")
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    rows, batches = parity_rows(tokenizer, metadata)
    pad_id = tokenizer.pad_token_id
    batch_shapes = [[len(b), int(max(len(rows[i]) for i in b))] for b in batches]
    info: dict[str, Any] = {}

    def parity_of(path: Path) -> float:
        got = predict(graph_runner(path, "cpu"), rows, pad_id, batches=batches)
        return float(np.abs(torch_fp32 - got).max())

    def reduced_check(work: Path, torch_scores: tuple[np.ndarray, str], val: Any, val_fp32: Any,
                      parity: dict[str, Any]) -> None:
        check = reduced_precision_check(work / "model.onnx", torch_scores, rows, batches, pad_id,
                                        "cpu" if dtype == "int8" else device, val, val_fp32)
        parity[f"{dtype}_max_abs_diff"] = check.pop("max_abs_diff")
        parity[dtype] = check
        log.info("onnx_parity", dtype=dtype, max_abs_diff=parity[f"{dtype}_max_abs_diff"], **check)
        if not np.isfinite(parity[f"{dtype}_max_abs_diff"]) or not np.isfinite(check.get("val_mae", 0.0)):
            raise ParityError(f"the {dtype} graph of {run_dir} gives non-finite scores (an overflow in {dtype}); "
                              f"nothing was written to {out_dir}")
        # A reduced graph is asked for speed: it keeps the accuracy bar every reduced-precision CPU engine is held to.
        if "val_mae_delta" not in check:
            check["val_mae_checked"] = False
            log.warning("reduced_precision_unchecked", dtype=dtype, reason="the run's validation split is gone: "
                        "no validation MAE bounds this graph's error, only its max |Δ| on the parity rows is known")
        elif check["val_mae_delta"] > MAE_TOLERANCE:
            raise ParityError(f"the {dtype} graph of {run_dir} scores the validation split "
                              f"{check['val_mae_delta']:.4f} worse (MAE) than fp32 (limit {MAE_TOLERANCE}); "
                              f"nothing was written to {out_dir}")

    def decoder_graph(work: Path) -> dict[str, Any]:
        """fp16 or bf16 for a decoder: the model builder writes the graph itself, so the proof is that graph
        against PyTorch in the precision it stands for, and its validation MAE beside PyTorch fp32's."""
        val = measurement_rows(tokenizer, metadata)
        val_fp32 = None
        if val[1] is not None:
            steps.step("validation scores, PyTorch fp32")
            val_fp32 = default_spec().clip(torch_fp32_scores(module, device, val[0], pad_id))
        steps.step("model builder graph")
        log.info("onnx_export_start", run=str(run_dir), route="onnxruntime-genai model builder",
                 parameters=sum(p.numel() for p in module.parameters()), external_data=external)
        with decoder_checkpoint(module.inner, tokenizer, work) as checkpoint:  # fp32 weights, before bf16 below
            torch_scores = (torch_bf16_on_gpu(module, rows, batches, pad_id) if device == "cuda"
                            else (torch_fp32, "torch-fp32-cpu"))
            release_weights(module)  # on disk now: the builder loads its own copy
            graph = build_decoder_graph(checkpoint, work, external, dtype)
        steps.step(f"{dtype} parity")
        parity: dict[str, Any] = {"batches": batch_shapes}
        reduced_check(work, torch_scores, val, val_fp32, parity)
        return {"graph": graph, "parity": parity, "fusions": {},
                "fused_operators": fused_operator_counts(work / "model.onnx"),
                "cpu_engine": {"engine": "onnxruntime", "why": f"--dtype {dtype} runs on ONNX Runtime"}}

    def dynamo_graph(work: Path) -> dict[str, Any]:
        steps.step("torch.onnx export")
        example = next(padded_batches(rows, pad_id, batches[1:2]))
        example = (torch.from_numpy(example.input_ids), torch.from_numpy(example.attention_mask))
        log.info("onnx_export_start", run=str(run_dir), route="torch.onnx dynamo + onnxscript fusions",
                 parameters=sum(p.numel() for p in module.parameters()), external_data=external)
        with library_prints_aside(keep=True), warnings.catch_warnings():  # the exporter prints its steps on stdout
            warnings.simplefilter("ignore")
            export_graph(module, example, work / "model.onnx", external)
        parity: dict[str, Any] = {"fp32_max_abs_diff": parity_of(work / "model.onnx"), "batches": batch_shapes,
                                  "provider": "CPUExecutionProvider"}
        log.info("onnx_parity", dtype="fp32", max_abs_diff=parity["fp32_max_abs_diff"])
        if not parity["fp32_max_abs_diff"] <= FP32_PARITY_LIMIT:  # NaN included: a NaN model is refused
            raise ParityError(f"ONNX export of {run_dir} differs from PyTorch by {parity['fp32_max_abs_diff']:.2e} "
                              f"(limit {FP32_PARITY_LIMIT:g}); nothing was written to {out_dir}")
        steps.step("fusions for ONNX Runtime")
        # The int8 graphs are quantised from the graph before attention was packed (fuse_graph says why)
        unpacked = work / "unpacked"
        wants_int8 = dtype == "int8" or (dtype == "fp32" and cpu_engine in ("auto", *TWIN_FILES))
        # fp32 and int8 graphs may be scored on the CPU (an fp32 export for CUDA falls back there too)
        fusions = fuse_graph(work / "model.onnx", external, unpacked if wants_int8 else None,
                             for_cpu=dtype in ("fp32", "int8"))
        int8_source = unpacked / "model.onnx" if unpacked.exists() else None
        fused = fused_operator_counts(work / "model.onnx")
        parity["fp32_fused_max_abs_diff"] = parity_of(work / "model.onnx")
        log.info("onnx_fused", fusions=fusions, operators=fused, max_abs_diff=parity["fp32_fused_max_abs_diff"])
        if not parity["fp32_fused_max_abs_diff"] <= FP32_PARITY_LIMIT:
            raise ParityError(f"the fused ONNX graph of {run_dir} differs from PyTorch by "
                              f"{parity['fp32_fused_max_abs_diff']:.2e} (limit {FP32_PARITY_LIMIT:g})")
        # What a reduced graph is checked against: PyTorch in the precision it stands for (on the CPU, the fp32
        # scores above).
        torch_scores = (torch_bf16_on_gpu(module, rows, batches, pad_id) if dtype == "fp16" and device == "cuda"
                        else (torch_fp32, "torch-fp32-cpu"))
        release_weights(module)  # PyTorch is done: 6 GB for a 1.5B model, wanted by the conversions and NNCF
        engines: dict[str, Any] = {"engine": "onnxruntime", "why": f"--dtype {dtype} runs on ONNX Runtime"}
        if dtype == "fp32":
            steps.step("CPU engines measured")
            engines = _pick_cpu_engine(work / "model.onnx", tokenizer, metadata, cpu_engine, external,
                                       int8_source or work / "model.onnx", encoder)
        if dtype in ("fp16", "int8"):
            steps.step(f"{dtype} conversion and parity")
            val = measurement_rows(tokenizer, metadata)
            val_fp32 = None
            if val[1] is not None:
                val_fp32 = default_spec().clip(predict(graph_runner(work / "model.onnx", device), val[0], pad_id,
                                                       token_budget=token_budget_for(device),
                                                       progress="validation, fp32 graph"))
            if dtype == "fp16":
                to_fp16(work / "model.onnx", external)
            else:
                to_int8(work / "model.onnx", external, int8_source, encoder)
                fused = fused_operator_counts(work / "model.onnx")  # the shipped graph's: unpacked attention
            reduced_check(work, torch_scores, val, val_fp32, parity)
            if dtype == "fp16":
                parity["fp32_ops"] = FP32_OPS
        if unpacked.exists():
            shutil.rmtree(unpacked)
        return {"graph": {"route": "torch.onnx dynamo + onnxscript ONNX Runtime fusions"}, "parity": parity,
                "fusions": fusions, "fused_operators": fused, "cpu_engine": engines}

    def build(work: Path) -> None:
        made = decoder_graph(work) if decoder else dynamo_graph(work)
        tokenizer_files = sorted({Path(f).name for f in tokenizer.save_pretrained(work) if Path(f).is_file()})
        calibration = run_dir / "model" / CALIBRATION_FILE
        if calibration.exists():  # scores from the file are calibrated as the run's are: it is part of the model
            shutil.copyfile(calibration, work / CALIBRATION_FILE)
        # On the export's device: through the CPU provider a 1.5B graph makes this the export's longest step.
        steps.step("drift reference")
        reference = write_reference(work, tokenizer, metadata, load_calibration(run_dir / "model"),
                                    "cpu" if dtype == "int8" else device, made["cpu_engine"]["engine"])
        steps.step("digests and model.json")
        digests = model_digest(work)
        spec = default_spec()
        exporter = {"investment-risk": __version__, "torch": torch.__version__}
        if decoder:
            exporter["model_builder"] = made["graph"]["builder"]
        written = {
            "format": "onnx", "input_format": "article", "dimensions": list(DIMENSIONS), "max_length": int(metadata["max_length"]), "dtype": dtype,
            "opset": graph_opset(work / "model.onnx"), "inputs": ["input_ids", "attention_mask"], "outputs": ["scores"],
            "pad_token_id": tokenizer.pad_token_id, "source_run": str(run_dir.resolve()),
            "base_model": metadata["model_name"], "training_mode": metadata["training_mode"],
            "truncation": metadata.get("truncation", "head"), "calibrated": calibration.exists(),
            "reference": reference,
            "best_val_mae": metadata.get("best_val_mae"), "filter_name": spec.name, "filter_version": spec.version,
            "model_version": model_version(digests), "sha256": digests, "external_data": external,
            "tokenizer_sha256": {name: sha256_file(work / name) for name in tokenizer_files},
            "graph": made["graph"], "parity": made["parity"], "fusions": made["fusions"],
            "fused_operators": made["fused_operators"], "cpu_engine": made["cpu_engine"],
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "exporter": exporter,
        }
        write_json_atomic(written, work / "model.json")
        info.update(written)

    # A 1.5B model's export runs for minutes between its loops (the graph export, fusion, conversions): the
    # heartbeat names the step, and the last event gives each step's seconds.
    plan = export_steps(decoder, dtype, has_val=run_split(metadata, "val") is not None)
    with Progress(len(plan), "export", unit="steps") as steps:
        steps.step("PyTorch scores for parity")
        # PyTorch's scores on the parity rows, through the same inference path as every graph checked against them
        # (not needed for a decoder's GPU graph on a GPU, checked against PyTorch bf16 there: minutes for 1.5B on CPU).
        torch_fp32 = (None if decoder and device == "cuda" else
                      predict(TorchRunner(module, torch.device("cpu")), rows, pad_id, batches=batches))
        write_dir_atomic(out_dir, build)
    log.info("exported", out=str(out_dir), model_version=info["model_version"], dtype=dtype,
             cpu_engine=info["cpu_engine"]["engine"])
    return info
