"""Score a labelled file with a trained run and compare with the predict-the-train-mean baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .batching import encode, predict
from .dataio import read_articles, write_json_atomic
from .logs import get_logger
from .metrics import regression_metrics
from .spec import DIMENSIONS
from .train import label_matrix, pick_device, texts_of


def _predict_run(run_dir: Path, table: Any, batch_size: int, device_name: str) -> tuple[np.ndarray, dict[str, Any]]:
    import torch

    from .models import load_run_model

    device = pick_device(device_name)
    model, tokenizer, metadata = load_run_model(run_dir, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model.to(device)
    tokens = encode(tokenizer, texts_of(table), int(metadata["max_length"]))
    return predict(model, tokens, tokenizer.pad_token_id, batch_size, device,
                   torch.bfloat16 if device.type == "cuda" else None), metadata


def _predict_instruction(run_dir: Path, table: Any, batch_size: int, device_name: str, explain: bool,
                         max_new_tokens: int, constrained: bool) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Head scores (one forward pass) and, with `explain`, generated reasoning + JSON parsed tolerantly."""
    from collections import Counter

    from .instruct import parse_generation
    from .instruct_train import generate_explanations, head_scores, load_instruction_run, prompt_budget, prompt_tokens

    device = pick_device(device_name)
    model, tokenizer, metadata = load_instruction_run(run_dir)
    model.to(device)
    rows = prompt_tokens(tokenizer, table.column("title").to_pylist(), table.column("content").to_pylist(),
                         prompt_budget(metadata))
    pred = head_scores(model, rows, tokenizer.pad_token_id, batch_size, device)
    extra: dict[str, Any] = {}
    if explain:
        texts = generate_explanations(model, tokenizer, rows, device, max_new_tokens, constrained)
        parsed = [parse_generation(t) for t in texts]
        extra["decoding"] = "constrained" if constrained else "free"
        extra["explanations"] = texts
        complete = [p.complete for p in parsed]
        extra["parse_rate"] = sum(complete) / len(parsed) if parsed else None
        extra["parse_problems"] = dict(Counter(problem.split(" = ")[0] for p in parsed for problem in p.problems))
        extra["generated"] = np.array([p.vector() for p in parsed], dtype=np.float64)
    return pred, metadata, extra


def _predict_exported(model_dir: Path, table: Any, batch_size: int, device_name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """An exported ONNX model; the baseline comes from its source run's training means when that run is here."""
    import json

    from .batching import pad_batch, sorted_batches
    from .export import verify_model_dir
    from .models import load_tokenizer
    from .runners import OnnxRunner

    info = verify_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    runner = OnnxRunner(model_dir, device_name)
    tokens = encode(tokenizer, texts_of(table), int(info["max_length"]))
    lengths = np.array([len(t) for t in tokens])
    pred = np.zeros((len(tokens), len(DIMENSIONS)), dtype=np.float32)
    for idx in sorted_batches(lengths, batch_size):
        pred[idx] = runner(*pad_batch([tokens[i] for i in idx], tokenizer.pad_token_id))
    source = Path(info["source_run"]) / "training_metadata.json"
    metadata = json.loads(source.read_text()) if source.exists() else {}
    return pred, metadata


def _is_instruction_run(run_dir: Path) -> bool:
    import json

    meta = run_dir / "training_metadata.json"
    return meta.exists() and json.loads(meta.read_text()).get("training_mode") == "instruction"


def evaluate_run(run_dir: Path, data: Path, out: Path | None = None, batch_size: int = 32,
                 device_name: str = "auto", explain: bool = False, max_new_tokens: int = 512,
                 constrained: bool = True) -> dict[str, Any]:
    """Evaluate a training run (PyTorch) or an exported model directory (ONNX Runtime) on a labelled file.

    An instruction run is scored by its head; `explain` also generates reasoning + JSON and reports the parse
    rate and the MAE of the generated scores (grammar-constrained decoding unless `constrained` is False)."""
    table = read_articles([data], labels=DIMENSIONS)
    exported = (run_dir / "model.json").exists()
    extra: dict[str, Any] = {}
    if _is_instruction_run(run_dir):
        raw, metadata, extra = _predict_instruction(run_dir, table, batch_size, device_name, explain, max_new_tokens,
                                                    constrained)
    else:
        raw, metadata = (_predict_exported if exported else _predict_run)(run_dir, table, batch_size, device_name)
    pred = np.clip(raw, 0.0, 10.0)
    labels = label_matrix(table)
    # The baseline predicts the training mean; without the training run, the mean of these labels stands in.
    mean = np.asarray(metadata.get("train_label_mean", labels.mean(axis=0)), dtype=np.float32)
    model_metrics = regression_metrics(pred, labels)
    baseline = regression_metrics(np.broadcast_to(mean, labels.shape), labels)
    result: dict[str, Any] = {
        "run": str(run_dir), "data": str(data), "rows": table.num_rows,
        "mae": model_metrics["mae"], "rmse": model_metrics["rmse"],
        "baseline_mae": baseline["mae"], "baseline_rmse": baseline["rmse"],
        "mae_vs_baseline": model_metrics["mae"] / baseline["mae"] if baseline["mae"] else None,
        "per_dimension": {d: {"mae": model_metrics[f"{d}_mae"], "rmse": model_metrics[f"{d}_rmse"],
                              "baseline_mae": baseline[f"{d}_mae"], "baseline_rmse": baseline[f"{d}_rmse"]}
                          for d in DIMENSIONS},
        "baseline": ("predict the training-set mean of each dimension" if "train_label_mean" in metadata
                     else "predict the evaluated labels' own mean (the training run was not found)"),
        "backend": "onnx" if exported else "torch",
    }
    if extra:
        generated = extra.pop("generated")
        ok = ~np.isnan(generated).any(axis=1)
        result.update(extra)
        result["generated_rows"] = int(ok.sum())
        result["generated_mae"] = (float(np.abs(generated[ok] - labels[ok]).mean()) if ok.any() else None)
        result["head_mae"] = result["mae"]
    if out is not None:
        write_json_atomic(result, out)
    get_logger().info("evaluated", rows=table.num_rows, mae=round(result["mae"], 4), parse_rate=result.get("parse_rate"),
                      baseline_mae=round(result["baseline_mae"], 4), out=str(out) if out else None)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'dimension':<28} {'MAE':>7} {'RMSE':>7} {'base MAE':>9} {'base RMSE':>10}"]
    for dim, m in result["per_dimension"].items():
        lines.append(f"{dim:<28} {m['mae']:>7.3f} {m['rmse']:>7.3f} {m['baseline_mae']:>9.3f} {m['baseline_rmse']:>10.3f}")
    lines.append(f"{'overall':<28} {result['mae']:>7.3f} {result['rmse']:>7.3f} {result['baseline_mae']:>9.3f} "
                 f"{result['baseline_rmse']:>10.3f}")
    lines.append(f"rows={result['rows']}  MAE / baseline MAE = {result['mae_vs_baseline']:.3f}")
    if "parse_rate" in result:
        generated = result["generated_mae"]
        lines.append(f"generated JSON: parse rate {result['parse_rate']:.3f}, MAE "
                     f"{'n/a' if generated is None else f'{generated:.3f}'} over {result['generated_rows']} rows; "
                     f"problems {result['parse_problems']}")
    return "\n".join(lines)
