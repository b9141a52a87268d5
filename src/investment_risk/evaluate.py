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


def evaluate_run(run_dir: Path, data: Path, out: Path | None = None, batch_size: int = 32,
                 device_name: str = "auto") -> dict[str, Any]:
    import torch

    from .models import load_run_model

    table = read_articles([data], labels=DIMENSIONS)
    device = pick_device(device_name)
    model, tokenizer, metadata = load_run_model(run_dir, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model.to(device)
    tokens = encode(tokenizer, texts_of(table), int(metadata["max_length"]))
    pred = np.clip(predict(model, tokens, tokenizer.pad_token_id, batch_size, device,
                           torch.bfloat16 if device.type == "cuda" else None), 0.0, 10.0)
    labels = label_matrix(table)
    mean = np.asarray(metadata["train_label_mean"], dtype=np.float32)
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
        "baseline": "predict the training-set mean of each dimension",
    }
    if out is not None:
        write_json_atomic(result, out)
    get_logger().info("evaluated", rows=table.num_rows, mae=round(result["mae"], 4),
                      baseline_mae=round(result["baseline_mae"], 4), out=str(out) if out else None)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'dimension':<28} {'MAE':>7} {'RMSE':>7} {'base MAE':>9} {'base RMSE':>10}"]
    for dim, m in result["per_dimension"].items():
        lines.append(f"{dim:<28} {m['mae']:>7.3f} {m['rmse']:>7.3f} {m['baseline_mae']:>9.3f} {m['baseline_rmse']:>10.3f}")
    lines.append(f"{'overall':<28} {result['mae']:>7.3f} {result['rmse']:>7.3f} {result['baseline_mae']:>9.3f} "
                 f"{result['baseline_rmse']:>10.3f}")
    lines.append(f"rows={result['rows']}  MAE / baseline MAE = {result['mae_vs_baseline']:.3f}")
    return "\n".join(lines)
