"""`report compare`: two training runs side by side, in the original's tables and three plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..core.atomic import read_json, write_text_atomic
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.plots import pyplot, save_figure
from ..core.spec import DIMENSIONS
from ..modeling.description import run_data_sha256


def load_run_summary(run: Path) -> dict[str, Any]:
    """The best epoch's metrics and the metadata of a finished run."""
    meta_path, history_path = run / "training_metadata.json", run / "training_history.json"
    if not meta_path.exists() or not history_path.exists():
        raise InputError(f"{run}: not a finished training run (needs training_metadata.json and training_history.json)")
    metadata, history = read_json(meta_path), read_json(history_path)
    if not isinstance(metadata, dict):
        raise InputError(f"{meta_path}: not a JSON object")
    epochs = _checked_history(history_path, history)
    best_epoch = metadata.get("best_epoch") or min(history, key=lambda h: h["val"]["mae"])["epoch"]
    if best_epoch not in epochs:
        raise InputError(f"{meta_path}: best_epoch {best_epoch!r} is no epoch of {history_path.name}")
    best = epochs[best_epoch]
    label = f"{metadata.get('training_mode', '?')} ({run.name})"
    return {"run": str(run), "label": label, "metadata": metadata, "best": best}


def _checked_history(path: Path, history: Any) -> dict[Any, dict[str, Any]]:
    """The epochs of a training_history.json by number; each needs finite train and val MAE and the val metrics the
    comparison reads (a diverged run's NaN would read as a tie)."""
    if not isinstance(history, list) or not history:
        raise InputError(f"{path}: no epochs (a list of epoch entries is expected)")
    wanted = ["mae", "rmse", *(f"{dim}_mae" for dim in DIMENSIONS)]
    for i, entry in enumerate(history):
        if not (isinstance(entry, dict) and "epoch" in entry and all(isinstance(entry.get(s), dict) for s in ("train", "val"))):
            raise InputError(f"{path}: entry {i} needs epoch, train and val")
        bad = [f"val {key}" for key in wanted if not _finite(entry["val"].get(key))]
        bad += [] if _finite(entry["train"].get("mae")) else ["train mae"]
        if bad:
            raise InputError(f"{path}: epoch {entry['epoch']} has no finite {', '.join(bad)}")
    return {entry["epoch"]: entry for entry in history}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare_runs(run_a: Path, run_b: Path) -> dict[str, Any]:
    a, b = load_run_summary(run_a), load_run_summary(run_b)
    if a["label"] == b["label"]:
        a["label"], b["label"] = f"A: {a['label']}", f"B: {b['label']}"
    per_dimension = []
    for dim in DIMENSIONS:
        va, vb = a["best"]["val"][f"{dim}_mae"], b["best"]["val"][f"{dim}_mae"]
        per_dimension.append({"dimension": dim, "a": va, "b": vb, "gap_pct": 100.0 * (vb - va) / va if va else None,
                              "winner": "A" if va < vb else "B" if vb < va else "tie"})
    won_a = sum(row["winner"] == "A" for row in per_dimension)
    won_b = sum(row["winner"] == "B" for row in per_dimension)
    overall = {}
    for key, run in (("a", a), ("b", b)):
        best = run["best"]
        overall[key] = {"val_mae": best["val"]["mae"], "val_rmse": best["val"]["rmse"],
                        "max_tokens": run["metadata"].get("max_length"),
                        "train_val_gap": best["val"]["mae"] - best["train"]["mae"],
                        "dimensions_won": won_a if key == "a" else won_b}
        calibration = run["metadata"].get("calibration") or {}
        # a run recalibrated since (`calibrate`) holds another calibration than training's: its figure is gone
        refit = run["metadata"].get("recalibrated")
        overall[key]["recalibrated_on"] = refit.get("data") if isinstance(refit, dict) else None
        overall[key]["val_mae_calibrated_in_sample"] = (calibration.get("val_mae_calibrated")
                                                        if calibration.get("fitted") and not refit else None)
        # how far the raw scores are from calibrated (runs trained before it was recorded: None)
        overall[key]["val_calibration_error_raw"] = calibration.get("val_calibration_error_raw")
    mae_a, mae_b = overall["a"]["val_mae"], overall["b"]["val_mae"]
    winner = "A" if mae_a < mae_b else "B" if mae_b < mae_a else "tie"
    val_a, val_b = (run_data_sha256(Path(run["run"])).get("val") for run in (a, b))
    same_val = None if not (val_a and val_b) else val_a == val_b
    if same_val is False:
        get_logger().warning("comparison_not_like_for_like", runs=[a["run"], b["run"]],
                             reason="the runs were validated on different val splits: their val MAEs measure "
                                    "different articles; compare them with `evaluate` on one labelled file")
    return {"a": {"run": a["run"], "label": a["label"]}, "b": {"run": b["run"], "label": b["label"]},
            "overall": overall, "winner": winner, "per_dimension": per_dimension, "same_val_split": same_val}


def comparison_markdown(result: dict[str, Any]) -> str:
    a, b, o = result["a"], result["b"], result["overall"]
    winner = {"A": a["label"], "B": b["label"], "tie": "tie"}[result["winner"]]
    lines = [
        "# Mode comparison", "", f"- A: {a['label']} — `{a['run']}`", f"- B: {b['label']} — `{b['run']}`", "",
        "## Overall (best epoch, validation)", "", "| metric | A | B |", "|---|---|---|",
        f"| val MAE | {o['a']['val_mae']:.4f} | {o['b']['val_mae']:.4f} |",
        f"| val MAE, calibrated (in-sample) | {_maybe(o['a']['val_mae_calibrated_in_sample'])} | "
        f"{_maybe(o['b']['val_mae_calibrated_in_sample'])} |",
        f"| val calibration error, raw | {_maybe(o['a']['val_calibration_error_raw'])} | "
        f"{_maybe(o['b']['val_calibration_error_raw'])} |",
        f"| val RMSE | {o['a']['val_rmse']:.4f} | {o['b']['val_rmse']:.4f} |",
        f"| max tokens | {o['a']['max_tokens']} | {o['b']['max_tokens']} |",
        f"| train/val gap (MAE) | {o['a']['train_val_gap']:+.4f} | {o['b']['train_val_gap']:+.4f} |",
        f"| dimensions won | {o['a']['dimensions_won']} | {o['b']['dimensions_won']} |",
        f"| winner | {'**A**' if result['winner'] == 'A' else ''} | {'**B**' if result['winner'] == 'B' else ''} |",
        "", f"Winner by val MAE: **{winner}**.", "",
        "The val MAE is training's: raw scores (before calibration) on every row of the validation split, the "
        "prefiltered ones too (`evaluate` leaves those out). The calibrated figure is in-sample: each run's "
        "calibration was fitted on that same split.", "",
        *[line for side, k in (("A", "a"), ("B", "b")) if o[k].get("recalibrated_on")
          for line in (f"{side}'s calibration was refit since training (`calibrate` on `{o[k]['recalibrated_on']}`): "
                       "its calibrated val MAE is not training's any more, so it is not shown; `evaluate` measures "
                       "the calibration it holds now.", "")],
        *(["**Not like for like: the runs were validated on different val splits** (their `training_config.json` "
           "data_sha256 differ), so their val MAEs measure different articles. Compare them with `evaluate` on one "
           "labelled file.", ""] if result.get("same_val_split") is False else []),
        "## Per dimension (val MAE)", "", "| dimension | A | B | gap (B vs A) | winner |", "|---|---|---|---|---|",
    ]
    for row in result["per_dimension"]:
        gap = f"{row['gap_pct']:+.1f} %" if row["gap_pct"] is not None else "n/a"
        lines.append(f"| {row['dimension']} | {row['a']:.4f} | {row['b']:.4f} | {gap} | {row['winner']} |")
    lines += ["", "Plots: `mode_comparison_mae.png`, `mode_comparison_per_dimension.png`, "
              "`mode_comparison_improvement.png`."]
    return "\n".join(lines) + "\n"


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot_comparison(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    import numpy as np

    a, b, o = result["a"]["label"], result["b"]["label"], result["overall"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(2)
    ax.bar(x - 0.2, [o["a"]["val_mae"], o["a"]["val_rmse"]], 0.4, label=a)
    ax.bar(x + 0.2, [o["b"]["val_mae"], o["b"]["val_rmse"]], 0.4, label=b)
    ax.set_xticks(x, ["val MAE", "val RMSE"])
    ax.legend()
    ax.set_title("Overall error (lower is better)")
    save_figure(fig, out / "mode_comparison_mae.png")

    rows = result["per_dimension"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["a"] for r in rows], 0.4, label=a)
    ax.bar(x + 0.2, [r["b"] for r in rows], 0.4, label=b)
    ax.set_xticks(x, [r["dimension"].replace("_", "\n") for r in rows], fontsize=8)
    ax.set_ylabel("val MAE")
    ax.legend()
    ax.set_title("Validation MAE per dimension")
    save_figure(fig, out / "mode_comparison_per_dimension.png")

    fig, ax = plt.subplots(figsize=(12, 4.5))
    improvement = [-(r["gap_pct"] or 0.0) for r in rows]  # positive: B has the lower error
    ax.bar(x, improvement, color=["tab:green" if v > 0 else "tab:red" for v in improvement])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [r["dimension"].replace("_", "\n") for r in rows], fontsize=8)
    ax.set_ylabel("% lower MAE for B than A")
    ax.set_title(f"Improvement of {b} over {a}")
    save_figure(fig, out / "mode_comparison_improvement.png")


def write_comparison(run_a: Path, run_b: Path, out: Path) -> dict[str, Any]:
    result = compare_runs(run_a, run_b)
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(result, out)
    write_text_atomic(comparison_markdown(result), out / "comparison_report.md")
    return result
