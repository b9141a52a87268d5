"""Every CPU engine side by side (issue 12): same model, same rows, same batches, same threads.

minilm trained briefly here, exported once (fused); at 128 and at 512 tokens, on the same validation rows:
PyTorch fp32 eager and bf16 autocast (the model as transformers runs it, and with its last block pooled as
`score --backend torch` runs it), ONNX Runtime fp32 on the unfused dynamo graph, on the fused one and on
the older TorchScript + ONNX Runtime optimizer graph, ONNX Runtime int8 (dynamic, after fusion), OpenVINO f32 and
bf16, OpenVINO on the static int8 (NNCF) graph, and the product's default CPU path (the engine export chose, as
`score` runs it without flags), timed in interleaved rounds. rows/s, ratios, and each engine's val MAE beside fp32's
(on clipped raw scores, as export's rule reads them: `score` then applies the model's calibration, which was fitted
on this same split, to whichever engine's scores; so the delta is the engine's own error, calibration aside).
Beside them the fp32 roofline: the machine's fp32 matrix-multiply peak, the model's arithmetic per row, and so the
most any fp32 engine could gain over PyTorch fp32 eager here; and the int8 roofline, the same for ONNX Runtime's
dynamic int8 (its int8 kernels' best speed on the model's projection shapes, nothing else costing time).

    python bench/cpu_engines.py [--rows 512] [--out bench-results/cpu-engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def trained_run(root: Path, max_length: int, rows: int) -> Path:
    from investment_risk.datasets.split import SplitConfig, run_split
    from investment_risk.datasets.synth import SynthConfig, write_synthetic
    from investment_risk.training.config import TrainConfig
    from investment_risk.training.recipe import train

    write_synthetic(SynthConfig(rows=rows, seed=12), root / "articles.parquet")
    run_split([str(root / "articles.parquet")], root / "data", SplitConfig(val=0.5, test=0.05))
    out = root / f"run-{max_length}"
    train(TrainConfig(mode="distillation", base_model="minilm", data=str(root / "data"), out=str(out), epochs=1,
                      batch_size=16, learning_rate=3e-4, max_length=max_length, device="cpu"))
    return out


def interleaved(runners: dict, rows, pad_id, rounds: int = 3,
                budgets: dict[str, int] | None = None) -> dict[str, tuple[float, np.ndarray]]:
    """rows/s of each runner (median over `rounds`) and its scores. Each round runs every runner once, in turn,
    so a slower or faster spell of a shared machine falls on all of them alike. `budgets`: padded tokens per call
    by runner name, else the scorer's CPU default."""
    from investment_risk.modeling.predict import predict
    from investment_risk.modeling.predict import CPU_TOKEN_BUDGET

    budget = {name: (budgets or {}).get(name, CPU_TOKEN_BUDGET) for name in runners}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    scores: dict[str, np.ndarray] = {}
    for name, run in runners.items():
        predict(run, rows[:16], pad_id, token_budget=budget[name])  # warm-up: allocations, compilation
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            scores[name] = np.clip(predict(run, rows, pad_id, token_budget=budget[name]), 0, 10)
            rates[name].append(len(rows) / (time.perf_counter() - started))
    return {name: (float(np.median(rates[name])), scores[name]) for name in runners}


def torchscript_route(module, example: tuple, path: Path) -> Path:
    """The older route the issue asked to measure beside ours: the TorchScript exporter, then ONNX Runtime's
    transformer optimizer (BERT fusions)."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    traced = path.with_name("torchscript-raw.onnx")
    torch.onnx.export(module, example, str(traced), input_names=["input_ids", "attention_mask"],
                      output_names=["scores"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}})
    config = module.inner.config
    optimized = optimize_model(str(traced), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(path))
    return path


def matmul_model(x: np.ndarray, w: np.ndarray):
    """The ONNX model of x @ w, w an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def cpu_session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def fp32_matmul_peak(hidden: int, intermediate: int, threads: int, tokens: int = 8192) -> float:
    """This machine's fp32 matrix-multiply rate in GFLOP/s: the better of ONNX Runtime (MLAS) and PyTorch on the
    model's own feed-forward shapes, a batch of `tokens` rows. No fp32 engine's linear layers run faster."""
    import torch

    best = 0.0
    for k, n in ((hidden, intermediate), (intermediate, hidden)):
        x, w = np.random.randn(tokens, k).astype(np.float32), np.random.randn(k, n).astype(np.float32)
        session = cpu_session(matmul_model(x, w).SerializeToString(), threads)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        for multiply in (lambda: session.run(None, {"x": x}), lambda: xt @ wt):
            multiply()
            for _ in range(10):  # the best of many: a shared machine's speed drifts
                started = time.perf_counter()
                multiply()
                best = max(best, 2 * tokens * k * n / (time.perf_counter() - started) / 1e9)
    return best


def int8_projection_gops(hidden: int, intermediate: int, threads: int, tokens: int = 8192) -> float:
    """The rate (GOP/s) of one layer's projections in int8 as ONNX Runtime runs the dynamic twin, at best: the
    product's quantiser on each of the layer's shapes (Q, K and V as one packed hidden x 3 hidden matrix, the
    fastest way to run them; the output; the feed-forward pair), a batch of `tokens` rows, activation quantisation
    included as in the graph, the best of many runs."""
    import shutil

    from onnx import save

    from investment_risk.export.graph_passes import quantize_dynamic_int8

    folder = Path(tempfile.mkdtemp())
    seconds = 0.0  # for `tokens` tokens through the layer's projections
    try:
        for k, n in ((hidden, 3 * hidden), (hidden, hidden), (hidden, intermediate), (intermediate, hidden)):
            x = np.random.randn(tokens, k).astype(np.float32)
            w = (np.random.randn(k, n) / np.sqrt(k)).astype(np.float32)
            save(matmul_model(x, w), str(folder / "fp32.onnx"))
            quantize_dynamic_int8(folder / "fp32.onnx", folder / "int8.onnx", external=False)
            session = cpu_session(str(folder / "int8.onnx"), threads)
            session.run(None, {"x": x})
            best = float("inf")
            for _ in range(10):
                started = time.perf_counter()
                session.run(None, {"x": x})
                best = min(best, time.perf_counter() - started)
            seconds += best
    finally:
        shutil.rmtree(folder)
    return tokens * 2 * (4 * hidden * hidden + 2 * hidden * intermediate) / seconds / 1e9


def gflop_per_row(config, lengths: np.ndarray, pooled: bool = False) -> tuple[float, float]:
    """Matrix-multiply work per row in the batches the scorer forms (padded widths included), as (projections,
    attention): per layer and token the Q, K, V, output and two feed-forward projections; and the scores and their
    weighted sum over the row's batch width. Embeddings, norms, softmax and the head are left out (little
    arithmetic). For minilm at 128 tokens the projections are what torch's FlopCounterMode counts for the same
    batches (2.718 GFLOP/row). `pooled`: the work of a pooled encoder (this bench's minilm), whose last block runs
    its query, attention, output and feed-forward projections for the one position the head reads, its keys and
    values at every position (export/pooling.py, modeling/pooled_block.py)."""
    from investment_risk.modeling.tokens import length_batches
    from investment_risk.modeling.predict import CPU_TOKEN_BUDGET

    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    projections = attention = 0
    for batch in length_batches(lengths, CPU_TOKEN_BUDGET, 256):
        width = int(lengths[batch].max())
        projections += len(batch) * layers * 2 * width * (4 * h * h + 2 * h * i)
        attention += len(batch) * layers * 2 * 2 * width * width * h
        if pooled:  # the last block's query, output and feed-forward projections at one position, not `width`
            projections -= len(batch) * 2 * (width - 1) * (2 * h * h + 2 * h * i)
            attention -= len(batch) * 2 * 2 * (width - 1) * width * h  # its scores for one query row
    return projections / len(lengths) / 1e9, attention / len(lengths) / 1e9


# The engines whose last block runs at one position: the fused graphs' (export/pooling.py) and PyTorch's
# (modeling/pooled_block.py); the unfused graph is exported as it is.
POOLED_ENGINES = ("torch_fp32_pooled", "onnx_fp32_fused", "openvino_f32", "onnx_int8_fused", "default_cpu")


def fp32_roofline(config, rows: list, threads: int, measured: dict) -> dict:
    """How close each fp32 engine runs to this machine's fp32 matrix-multiply peak (on the work its graph does),
    and the most an fp32 engine on the exported graph could gain over PyTorch fp32 eager here (its ceiling)."""
    peak = fp32_matmul_peak(config.hidden_size, config.intermediate_size, threads)
    lengths = np.array([len(r) for r in rows])
    work = {pooled: sum(gflop_per_row(config, lengths, pooled)) for pooled in (False, True)}
    out = {"fp32_matmul_peak_gflops": round(peak, 1), "gflop_per_row": round(work[False], 3),
           "gflop_per_row_pooled_graph": round(work[True], 3),
           "fp32_ceiling_rows_per_second": round(peak / work[True], 1),
           "fp32_ceiling_vs_torch_fp32": round(peak / work[True] / measured["torch_fp32"][0], 2),
           "fp32_ceiling_vs_torch_fp32_pooled": round(peak / work[True] / measured["torch_fp32_pooled"][0], 2)}
    for name in ("torch_fp32", "torch_fp32_pooled", "onnx_fp32_fused", "onnx_fp32_unfused", "openvino_f32"):
        if name in measured:
            out[f"{name}_share_of_peak"] = round(measured[name][0] * work[name in POOLED_ENGINES] / peak, 3)
    print(f"fp32 roofline: {out}", flush=True)
    return out


def int8_roofline(config, rows: list, threads: int, measured: dict, fp32_peak: float) -> dict:
    """The most ONNX Runtime's dynamic int8 could gain over PyTorch fp32 eager here: every row's projections in the
    pooled graph at the int8 kernels' best measured speed on the model's shapes, attention scores and their
    weighted sum (fp32 in the twin) at the fp32 peak, and nothing else (norms, GELU, softmax) costing any time."""
    projection_gflop, attention_gflop = gflop_per_row(config, np.array([len(r) for r in rows]), pooled=True)
    int8_gops = int8_projection_gops(config.hidden_size, config.intermediate_size, threads)
    seconds = projection_gflop / int8_gops + attention_gflop / fp32_peak
    out = {"int8_projection_gops": round(int8_gops, 1),
           "int8_ceiling_rows_per_second": round(1 / seconds, 1),
           "int8_ceiling_vs_torch_fp32": round(1 / seconds / measured["torch_fp32"][0], 2)}
    for name in ("onnx_int8_fused", "default_cpu"):
        out[f"{name}_share_of_int8_ceiling"] = round(measured[name][0] * seconds, 3)
    print(f"int8 roofline: {out}", flush=True)
    return out


def engines_at(root: Path, max_length: int, rows_n: int) -> dict:
    import torch

    from investment_risk.core.spec import DIMENSIONS
    from investment_risk.datasets.readers import label_matrix, read_articles
    from investment_risk.export.graph_passes import export_graph, fused_operator_counts
    from investment_risk.export.onnx_export import export_run
    from investment_risk.modeling.description import describe_model
    from investment_risk.modeling.loading import cpu_engine_usable, cpu_runner, load_runner, scoring_module
    from investment_risk.modeling.predict import TorchRunner, padded_batches
    from investment_risk.modeling.tokens import article_texts, encode

    run = trained_run(root, max_length, rows_n * 2 + 64)
    module, tokenizer, meta = scoring_module(run)  # what export traces (the graphs below are exported from it)
    pooled_module, _, _ = scoring_module(run, pooled=True)  # as score --backend torch runs it
    val = read_articles([root / "data" / "val.parquet"], labels=DIMENSIONS).slice(0, rows_n)
    rows, labels = encode(tokenizer, article_texts(val), max_length), label_matrix(val)
    pad = tokenizer.pad_token_id
    model_dir = root / f"model-{max_length}"
    info = export_run(run, model_dir)
    # the int8 twins, kept even where export's rule would not choose them
    dynamic_int8 = root / f"model-{max_length}-dynamic-int8"
    export_run(run, dynamic_int8, cpu_engine="onnxruntime-int8")
    static_int8 = root / f"model-{max_length}-static-int8"
    if cpu_engine_usable("openvino-int8")[0]:
        export_run(run, static_int8, cpu_engine="openvino-int8")
    example = next(padded_batches(rows, pad, [np.arange(4)]))
    export_graph(module, (torch.from_numpy(example.input_ids), torch.from_numpy(example.attention_mask)),
            root / f"unfused-{max_length}.onnx", False)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    candidates = {
        # The issue's baselines: the model as transformers runs it. Beside them PyTorch doing the fused graphs'
        # work (its last block pooled too), as `score --backend torch` runs it: the engines' own difference.
        "torch_fp32": TorchRunner(module, cpu),
        "torch_bf16_autocast": TorchRunner(module, cpu, torch.bfloat16),
        "torch_fp32_pooled": TorchRunner(pooled_module, cpu),
        "torch_bf16_pooled": TorchRunner(pooled_module, cpu, torch.bfloat16),
        "onnx_fp32_unfused": cpu_runner(root / f"unfused-{max_length}.onnx", "onnxruntime", threads),
        "onnx_fp32_fused": cpu_runner(model_dir / "model.onnx", "onnxruntime", threads),
        "onnx_fp32_torchscript_ort_optimizer": cpu_runner(
            torchscript_route(module, (torch.from_numpy(example.input_ids), torch.from_numpy(example.attention_mask)),
                              root / f"torchscript-{max_length}.onnx"), "onnxruntime", threads),
        "onnx_int8_fused": cpu_runner(dynamic_int8 / "model.onnx", "onnxruntime-int8", threads),
    }
    for engine in ("openvino-f32", "openvino-bf16"):
        if cpu_engine_usable(engine)[0]:
            candidates[engine.replace("-", "_")] = cpu_runner(model_dir / "model.onnx", engine, threads)
    if (static_int8 / "model.json").exists():
        candidates["openvino_int8_static"] = cpu_runner(static_int8 / "model.onnx", "openvino-int8", threads)
    candidates["default_cpu"] = load_runner(describe_model(model_dir), "onnx", "cpu", threads)
    out: dict = {"rows": len(rows), "threads": threads, "mean_tokens": round(float(np.mean([len(r) for r in rows])), 1),
                 "default_engine": info["cpu_engine"]["engine"], "fused_operators": info["fused_operators"],
                 "torchscript_route_fused_operators": fused_operator_counts(root / f"torchscript-{max_length}.onnx")}
    measured = interleaved(candidates, rows, pad)
    fp32 = None
    for name, (rate, scores) in measured.items():
        mae = float(np.abs(scores - labels).mean())
        fp32 = mae if name == "torch_fp32" else fp32
        out[name] = {"rows_per_second": round(rate, 1), "val_mae": round(mae, 4), "val_mae_delta": round(mae - fp32, 4)}
        print(f"{max_length:4d} tok  {name:36s} {rate:8.1f} rows/s  val MAE {mae:.4f} ({mae - fp32:+.4f})", flush=True)
    ratio = lambda a, b: round(out[a]["rows_per_second"] / out[b]["rows_per_second"], 2)  # noqa: E731
    out.update({"default_cpu_vs_torch_fp32": ratio("default_cpu", "torch_fp32"),
                "default_cpu_vs_torch_bf16": ratio("default_cpu", "torch_bf16_autocast"),
                "default_cpu_mae_delta": out["default_cpu"]["val_mae_delta"],
                "onnx_fp32_fused_vs_torch_fp32": ratio("onnx_fp32_fused", "torch_fp32"),
                "default_cpu_vs_torch_fp32_pooled": ratio("default_cpu", "torch_fp32_pooled"),
                "default_cpu_vs_torch_bf16_pooled": ratio("default_cpu", "torch_bf16_pooled"),
                "onnx_fp32_fused_vs_torch_fp32_pooled": ratio("onnx_fp32_fused", "torch_fp32_pooled"),
                "onnx_fp32_fused_vs_unfused": ratio("onnx_fp32_fused", "onnx_fp32_unfused")})
    out["fp32_roofline"] = fp32_roofline(module.inner.config, rows, threads, measured)
    out["int8_roofline"] = int8_roofline(module.inner.config, rows, threads, measured,
                                         out["fp32_roofline"]["fp32_matmul_peak_gflops"])
    out["settings"] = settings(model_dir, info["cpu_engine"]["engine"], rows, pad)
    return out


def _worker(args: tuple) -> float:
    """One scoring process on its share of the rows, one thread: seconds for its share, timed from a start shared by
    every worker (the barrier, once each has loaded and run its share once: warm on every shape, as the one process
    on all cores is). Each is held to its own core, as a one-CPU pod would be: left free, the engines' own thread
    pinning (OpenVINO's) put every worker on the same core."""
    model_path, engine, rows, pad_id, budget, ready, core = args
    os.sched_setaffinity(0, {core})
    from investment_risk.modeling.loading import cpu_runner
    from investment_risk.modeling.predict import predict

    try:
        runner = cpu_runner(Path(model_path), engine, threads=1)
        predict(runner, rows, pad_id, token_budget=budget)
    except BaseException:
        ready.abort()  # the other workers stop waiting (BrokenBarrierError) and this error comes through
        raise
    ready.wait()
    started = time.perf_counter()
    predict(runner, rows, pad_id, token_budget=budget)
    return time.perf_counter() - started


def settings(model_dir: Path, engine: str, rows: list, pad_id: int) -> dict:
    """Execution settings for the default engine: token budget per call, and one process using every core vs one
    single-threaded process per core (each on its share of the rows, all at once)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from investment_risk.modeling.loading import cpu_runner
    from investment_risk.modeling.predict import predict, token_budget_for

    threads = len(os.sched_getaffinity(0))
    budget = token_budget_for("cpu")  # the scorer's: the sweep above is where budgets are compared
    runner = cpu_runner(model_dir / "model.onnx", engine, threads)
    budgets = {str(budget): budget for budget in (2048, 4096, 8192, 16384, 32768)}
    by_budget = interleaved({name: runner for name in budgets}, rows, pad_id, budgets=budgets)
    out: dict = {"engine": engine, "token_budget_rows_per_second": {b: round(r, 1) for b, (r, _) in by_budget.items()}}
    shares = [rows[i::threads] for i in range(threads)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(threads, mp_context=context) as pool:
        ready = manager.Barrier(threads)  # every worker loaded and warm
        seconds = list(pool.map(_worker, [(str(model_dir / "model.onnx"), engine, share, pad_id, budget, ready, core)
                                          for core, share in zip(sorted(os.sched_getaffinity(0)), shares)]))
    out["token_budget"] = budget
    out["one_process_per_core_rows_per_second"] = round(len(rows) / max(seconds), 1)
    started = time.perf_counter()
    predict(runner, rows, pad_id, token_budget=budget)
    out["one_process_all_cores_rows_per_second"] = round(len(rows) / (time.perf_counter() - started), 1)
    if engine.startswith("openvino"):  # throughput streams (the default) vs one latency stream
        modes = interleaved({"streams": runner, "latency": cpu_runner(model_dir / "model.onnx", engine, threads,
                                                                       streams=1)}, rows, pad_id)
        out["openvino_streams"] = runner.streams
        out["openvino_streams_rows_per_second"] = round(modes["streams"][0], 1)
        out["openvino_one_latency_stream_rows_per_second"] = round(modes["latency"][0], 1)
    print(f"settings ({engine}): {out}", flush=True)
    return out


def end_to_end(root: Path, max_length: int, rounds: int = 3) -> dict:
    """`score` with default flags vs `score --backend torch` on the same batch: each a whole process, as a pod runs
    it (imports, model load and compile, reading, tokenising, writing); the median of `rounds` taken in turn (one
    run each read 2.3x where three pairs read 3.0x, 2026-12-06)."""
    import subprocess
    import sys

    from investment_risk.datasets.synth import SynthConfig, write_synthetic

    write_synthetic(SynthConfig(rows=600, seed=31), root / "batch" / "a.parquet")
    seconds: dict[str, list[float]] = {"default": [], "torch": []}
    for n in range(rounds):
        for backend, model in (("default", root / f"model-{max_length}"), ("torch", root / f"run-{max_length}")):
            flags = [] if backend == "default" else ["--backend", "torch"]
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "investment_risk", "score", "--model", str(model), "--input",
                            str(root / "batch"), "--out", str(root / f"e2e-{backend}-{max_length}-{n}"), *flags],
                           check=True, stdout=subprocess.DEVNULL)
            seconds[backend].append(time.perf_counter() - started)
    out = {f"{backend}_seconds": round(float(np.median(runs)), 2) for backend, runs in seconds.items()}
    out["score_default_vs_torch"] = round(out["torch_seconds"] / out["default_seconds"], 2)
    print(f"{max_length:4d} tok  score default {out['default_seconds']} s, --backend torch {out['torch_seconds']} s: "
          f"{out['score_default_vs_torch']}x", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--out", default="bench-results/cpu-engines.json")
    args = parser.parse_args()
    from investment_risk.core.logs import configure_logging
    from investment_risk.modeling.loading import cpu_profile

    configure_logging("json", "WARNING")
    results: dict = {"cpu": cpu_profile()}  # the engines rank differently on other CPUs
    with tempfile.TemporaryDirectory() as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            root = Path(tmp) / str(length)
            root.mkdir()
            results[f"tokens_{length}"] = engines_at(root, length, args.rows)
            results[f"tokens_{length}"].update(end_to_end(root, length))
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
