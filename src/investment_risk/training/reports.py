"""The run's training reports: plots, a plain-text summary (with the calibration), a Word report, and the training
labels' dimension redundancy (dimensions.md and its two plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import atomic_path, write_text_atomic
from ..core.plots import pyplot, save_figure
from ..core.spec import DIMENSIONS
from ..datasets.dimensions import FEW_ROWS, strong_pairs_line, write_dimension_report


def plot_overall(history: list[dict[str, Any]], dest: Path) -> None:
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("mae", "rmse")):
        for split, style in (("train", "o-"), ("val", "s--")):
            ax.plot(epochs, [h[split][metric] for h in history], style, label=split)
        ax.set_title(f"Overall {metric.upper()}")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, dest)


def plot_per_dimension(history: list[dict[str, Any]], dest: Path) -> None:
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for ax, dim in zip(axes.flat, DIMENSIONS):
        for split, style in (("train", "o-"), ("val", "s--")):
            ax.plot(epochs, [h[split][f"{dim}_mae"] for h in history], style, label=split)
        ax.set_title(dim.replace("_", " "), fontsize=10)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("MAE per dimension")
    save_figure(fig, dest)


def plot_losses(history: list[dict[str, Any]], step_losses: list[list[float]], steps_per_epoch: float, dest: Path,
                mode: str = "distillation") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    # An instruction run's steps minimise token cross-entropy plus the score MSE; its epoch points are the score
    # MSE alone: one label for both drew a gap between train and val that is not there.
    objective = "token cross-entropy + score MSE" if mode == "instruction" else "score MSE"
    if step_losses:
        ax.plot([s for s, _ in step_losses], [l for _, l in step_losses], "-", alpha=0.6,
                label=f"train objective, {objective} (logged steps)")
    ends = [h["epoch"] * steps_per_epoch for h in history]
    ax.plot(ends, [h["train"]["loss"] for h in history], "o", label="train score MSE (epoch)")
    ax.plot(ends, [h["val"]["loss"] for h in history], "s--", label="val score MSE (epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, dest)


def summary_text(history: list[dict[str, Any]], metadata: dict[str, Any],
                 redundancy: dict[str, Any] | None = None) -> str:
    """The run in plain text; `redundancy`: the training labels' dimension analysis, when there is one."""
    best = next(h for h in history if h["epoch"] == metadata.get("best_epoch", history[-1]["epoch"]))
    lines = [
        f"Training summary ({metadata['training_mode']}, {metadata['model_name']})",
        f"Best epoch: {best['epoch']} of {len(history)}",
        "",
        "Overall metrics (best epoch, raw scores, every row: prefiltered noise too):",
        f"  Train MAE={best['train']['mae']:.4f} RMSE={best['train']['rmse']:.4f} loss={best['train']['loss']:.4f}",
        f"  Val   MAE={best['val']['mae']:.4f} RMSE={best['val']['rmse']:.4f} loss={best['val']['loss']:.4f}",
        f"  Train/val MAE gap={best['val']['mae'] - best['train']['mae']:+.4f}",
        "",
        "Per-dimension MAE (best epoch):",
    ]
    for dim in DIMENSIONS:
        train, val = best["train"][f"{dim}_mae"], best["val"][f"{dim}_mae"]
        lines.append(f"  {dim:<28} Train={train:.4f} Val={val:.4f} Gap={val - train:+.4f}")
    lines += ["", f"Examples: train={metadata['train_examples']} val={metadata['val_examples']}",
              f"Parameters: {metadata['num_parameters']:,} total, {metadata['num_trainable_parameters']:,} trainable",
              f"Wall time: {metadata['wall_time_s']} s, {metadata['tokens_per_second']} training tokens/s"]
    calibration = metadata.get("calibration") or {}
    if calibration.get("fitted"):
        lines += ["", "Calibration (isotonic per dimension, fitted on the best epoch's val predictions; in-sample; "
                  "the rows the prefilter lets through, as scoring and evaluate count them):",
                  f"  Val MAE raw={calibration['val_mae_raw']:.4f} calibrated={calibration['val_mae_calibrated']:.4f}"]
        if "val_calibration_error_raw" in calibration:  # runs before it was recorded have none
            lines.append(f"  Val calibration error (binned |mean score - mean label|) "
                         f"raw={calibration['val_calibration_error_raw']:.4f} "
                         f"calibrated={calibration['val_calibration_error_calibrated']:.4f}")
        lines += [f"  {dim:<28} raw={m['raw']:.4f} calibrated={m['calibrated']:.4f}"
                  for dim, m in calibration["per_dimension"].items()]
    elif calibration:
        lines += ["", f"Calibration: not fitted ({calibration.get('reason')})"]
    if redundancy is not None:
        lines += ["", "Dimension redundancy of the training labels (dimensions.md):"]
        if redundancy["explained_variance"]:
            lines.append(f"  First principal component: {redundancy['explained_variance'][0]:.0%} of the standardised "
                         f"labels' variance ({redundancy['rows']} articles)")
        lines.append(f"  {strong_pairs_line(redundancy)}")
        if redundancy["too_few_rows"]:
            lines.append(f"  Too few rows to read much into (below {FEW_ROWS}: chance alone gives |r| up to "
                         f"{redundancy['chance_r']:.2f})")
    return "\n".join(lines) + "\n"


def word_report(history: list[dict[str, Any]], metadata: dict[str, Any], reports: Path, dest: Path) -> None:
    from docx import Document
    from docx.shared import Inches

    best = next(h for h in history if h["epoch"] == metadata.get("best_epoch", history[-1]["epoch"]))
    doc = Document()
    doc.add_heading("investment-risk training report", 0)
    doc.add_paragraph(f"Mode: {metadata['training_mode']}. Base model: {metadata['model_name']}. "
                      f"Best epoch {best['epoch']} of {len(history)}, val MAE {best['val']['mae']:.4f}.")
    doc.add_heading("Configuration", 1)
    table = doc.add_table(rows=1, cols=2)
    table.style = "Light Grid Accent 1"
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "setting", "value"
    for key in ("epochs", "batch_size", "learning_rate", "max_length", "warmup_steps", "train_examples", "val_examples",
                "num_parameters", "num_trainable_parameters", "wall_time_s", "tokens_per_second"):
        row = table.add_row().cells
        row[0].text, row[1].text = key, str(metadata.get(key))
    doc.add_heading("Metrics per epoch", 1)
    table = doc.add_table(rows=1, cols=5)
    table.style = "Light Grid Accent 1"
    for cell, text in zip(table.rows[0].cells, ("epoch", "train MAE", "val MAE", "train RMSE", "val RMSE")):
        cell.text = text
    for h in history:
        values = (h["epoch"], h["train"]["mae"], h["val"]["mae"], h["train"]["rmse"], h["val"]["rmse"])
        for cell, value in zip(table.add_row().cells, values):
            cell.text = f"{value:.4f}" if isinstance(value, float) else str(value)
    doc.add_heading("Per-dimension MAE (best epoch)", 1)
    table = doc.add_table(rows=1, cols=4)
    table.style = "Light Grid Accent 1"
    for cell, text in zip(table.rows[0].cells, ("dimension", "train", "val", "gap")):
        cell.text = text
    for dim in DIMENSIONS:
        train, val = best["train"][f"{dim}_mae"], best["val"][f"{dim}_mae"]
        for cell, text in zip(table.add_row().cells, (dim, f"{train:.4f}", f"{val:.4f}", f"{val - train:+.4f}")):
            cell.text = text
    calibration = metadata.get("calibration") or {}
    if calibration.get("fitted"):
        doc.add_heading("Calibration (val, best epoch, in-sample)", 1)
        table = doc.add_table(rows=1, cols=3)
        table.style = "Light Grid Accent 1"
        for cell, text in zip(table.rows[0].cells, ("dimension", "raw MAE", "calibrated MAE")):
            cell.text = text
        rows = [*calibration["per_dimension"].items(), ("overall", {"raw": calibration["val_mae_raw"],
                                                                    "calibrated": calibration["val_mae_calibrated"]})]
        for dim, m in rows:
            for cell, text in zip(table.add_row().cells, (dim, f"{m['raw']:.4f}", f"{m['calibrated']:.4f}")):
                cell.text = text
    for name, title in (("overall_metrics.png", "Overall metrics"), ("per_dimension_mae.png", "MAE per dimension"),
                        ("loss_curves.png", "Loss curves"), ("dimension_correlations.png", "Training labels: correlations"),
                        ("dimension_variance.png", "Training labels: principal components")):
        if not (reports / name).exists():
            continue
        doc.add_heading(title, 1)
        doc.add_picture(str(reports / name), width=Inches(6.3))
    with atomic_path(dest) as tmp:
        doc.save(str(tmp))


def write_training_reports(run_dir: Path, history: list[dict[str, Any]], metadata: dict[str, Any],
                           step_losses: list[list[float]], train_labels: np.ndarray | None = None) -> Path:
    reports = run_dir / "training_reports"
    reports.mkdir(parents=True, exist_ok=True)
    redundancy = None
    if train_labels is not None:  # the redundancy of the eight labels this run learned from
        redundancy = write_dimension_report(train_labels, reports, heading="##")
    plot_overall(history, reports / "overall_metrics.png")
    plot_per_dimension(history, reports / "per_dimension_mae.png")
    plot_losses(history, step_losses, metadata["steps_per_epoch"], reports / "loss_curves.png",
                metadata.get("training_mode", "distillation"))
    write_text_atomic(summary_text(history, metadata, redundancy), reports / "training_summary.txt")
    word_report(history, metadata, reports, reports / "training_report.docx")
    return reports
