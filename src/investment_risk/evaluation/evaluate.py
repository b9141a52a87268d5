"""Score a labelled file with a training run or an exported model, beside the predict-the-train-mean baseline."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import check_output_file, write_json_atomic
from ..core.decisions import decision_metrics, format_decisions
from ..core.errors import ConfigError, InputError
from ..core.logs import Progress, get_logger
from ..core.metrics import calibration_metrics, regression_metrics
from ..core.spec import DIMENSIONS, default_spec
from ..datasets.readers import label_matrix, read_articles
from ..datasets.split import check_split_file
from ..modeling.description import ModelDescription, data_sha256, describe_model, in_sample
from ..modeling.loading import load_runner
from ..modeling.predict import predict
from ..modeling.presets import load_tokenizer


def explain(instruction_model: Any, tokenizer: Any, rows: list[np.ndarray], device: Any, max_new_tokens: int,
            constrained: bool) -> dict[str, Any]:
    """Generated reasoning + JSON for each prompt, parsed tolerantly: parse rate, problems, the generated scores."""
    from ..modeling.generation import generate_explanations
    from ..modeling.prompts import format_target, parse_generation

    needed = len(tokenizer(format_target("", [10.0] * len(DIMENSIONS)), add_special_tokens=False)["input_ids"])
    if max_new_tokens < needed:  # every answer would be cut inside its JSON: a parse rate of 0 that says nothing
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: the scores' JSON alone takes {needed} tokens; give "
                          "more, with room for the reasoning before it")
    texts = generate_explanations(instruction_model, tokenizer, rows, device, max_new_tokens, constrained)
    parsed = [parse_generation(t) for t in texts]
    return {
        "decoding": "constrained" if constrained else "free", "explanations": texts,
        "parse_rate": sum(p.complete for p in parsed) / len(parsed) if parsed else None,
        # Counted by kind: "macro_risk_severity = 12 is outside [0, 10]" as "... is outside [0, 10]".
        "parse_problems": dict(Counter(_VALUE.sub("", problem) for p in parsed for problem in p.problems)),
        "generated": np.array([p.vector() for p in parsed], dtype=np.float64),
    }


_VALUE = re.compile(r" = \S+")


def plot_confusion(decisions: dict[str, Any], dest: Path) -> None:
    """The tier confusion matrix as a heatmap (rows: labels, columns: predictions)."""
    from ..core.plots import pyplot, save_figure

    plt = pyplot()
    names, matrix = decisions["tiers"], np.asarray(decisions["confusion"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted tier")
    ax.set_ylabel("label tier")
    ax.set_title("Tier confusion")
    save_figure(fig, dest)


TOKENISE_ROWS = 2048


def raw_scores(model: ModelDescription, table: Any, device: str, batch_size: int, what: str = "evaluate"
               ) -> tuple[np.ndarray, Any, Any, list[np.ndarray]]:
    """A model's clipped, uncalibrated scores for the articles of `table` (with the runner, the tokenizer and the
    token rows they came from): ONNX Runtime for an exported model, PyTorch for a run."""
    runner = load_runner(model, "onnx" if model.exported else "torch", device)
    tokenizer = load_tokenizer(model.tokenizer_dir)
    titles, contents = table.column("title").to_pylist(), table.column("content").to_pylist()
    rows: list[np.ndarray] = []
    # Tens of thousands of long articles take minutes to tokenise: progress events, not silence, meanwhile.
    with Progress(len(titles), f"{what}: tokenise") as progress:
        for start in range(0, len(titles), TOKENISE_ROWS):
            chunk = slice(start, start + TOKENISE_ROWS)
            rows += model.token_rows(tokenizer, titles[chunk], contents[chunk])
            progress.update(len(titles[chunk]))
    raw = default_spec().clip(predict(runner, rows, model.pad_id(tokenizer), batch_size=batch_size, progress=what))
    return raw, runner, tokenizer, rows


def evaluate_run(run_dir: Path, data: Path, out: Path | None = None, batch_size: int = 32,
                 device_name: str = "auto", explain_generation: bool = False, max_new_tokens: int = 512,
                 constrained: bool = True, calibration: bool = True, top_k: int = 50) -> dict[str, Any]:
    """Evaluate a training run (PyTorch) or an exported model directory (ONNX Runtime) on a labelled file.

    An instruction run is scored by its head; `explain_generation` also generates reasoning + JSON and reports the
    parse rate and the MAE of the generated scores (grammar-constrained decoding unless `constrained` is False).
    Scores are calibrated where the model has a calibration (unless `calibration` is False); the raw scores' metrics
    stand beside them. Decision metrics: tiers, rank correlation, Recall@k / NDCG@k of signal strength."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if out is not None:  # before minutes of scoring, not after them
        check_output_file(out, "--out")
    model = describe_model(run_dir)
    if explain_generation and not model.is_instruction:
        raise ConfigError(f"--explain: {run_dir} is no instruction run (only those generate reasoning)")
    if Path(data).is_file():  # a split's file must be the one its summary describes
        check_split_file(Path(data))
    table = read_articles([data], labels=DIMENSIONS, unique_ids=True)
    raw, runner, tokenizer, rows = raw_scores(model, table, device_name, batch_size)
    spec = default_spec()
    # As `score` decides: a prefiltered article is NOISE with no scores, so it is left out of the MAE and counts
    # as a NOISE prediction in the decisions; evaluate and a scored batch of the same file agree.
    prefiltered = spec.prefiltered(table)
    scored = ~prefiltered
    if not scored.any():
        raise InputError(f"{data}: every row is prefiltered as noise; there is no score to evaluate")
    extra: dict[str, Any] = {}
    if explain_generation:  # the rows the head is judged on, so that the two MAEs compare
        explained = np.flatnonzero(scored)
        extra = explain(runner.forward.inner, tokenizer, [rows[i] for i in explained], runner.device,
                        max_new_tokens, constrained)
        ids = table.column("id").to_pylist()
        extra["explanation_ids"] = [ids[i] for i in explained]
    pred = model.calibrated(raw, calibration)
    labels = label_matrix(table)
    # The baseline predicts the training mean; without the training run, the mean of these labels stands in.
    trained_mean = model.train_label_mean
    mean = np.asarray(trained_mean if trained_mean is not None else labels.mean(axis=0), dtype=np.float32)
    model_metrics = regression_metrics(pred[scored], labels[scored])
    calibration_figures = calibration_metrics(pred[scored], labels[scored])
    decisions = decision_metrics(pred, labels, spec, top_k, prefiltered)
    baseline = regression_metrics(np.broadcast_to(mean, labels.shape)[scored], labels[scored])
    result: dict[str, Any] = {
        "run": str(run_dir), "data": str(data), "rows": table.num_rows, "rows_prefiltered": int(prefiltered.sum()),
        "mae": model_metrics["mae"], "rmse": model_metrics["rmse"],
        "baseline_mae": baseline["mae"], "baseline_rmse": baseline["rmse"],
        "mae_vs_baseline": model_metrics["mae"] / baseline["mae"] if baseline["mae"] else None,
        "per_dimension": {d: {"mae": model_metrics[f"{d}_mae"], "rmse": model_metrics[f"{d}_rmse"],
                              "baseline_mae": baseline[f"{d}_mae"], "baseline_rmse": baseline[f"{d}_rmse"],
                              **calibration_figures["per_dimension"][d]}
                          for d in DIMENSIONS},
        "calibration_error": calibration_figures["calibration_error"],
        "baseline": ("predict the training-set mean of each dimension" if trained_mean is not None
                     else "predict the evaluated labels' own mean (the training run was not found)"),
        "backend": "onnx" if model.exported else "torch", "provider": runner.provider,
        "calibration": ("applied" if calibration and model.calibration is not None
                        else "off (--no-calibration)" if model.calibration is not None else "none fitted"),
        "truncation": model.truncation, "decisions": decisions,
        # What of the model has seen this file already: its metrics here are optimistic ([] for new data).
        "in_sample": [seen for seen in in_sample(model, data_sha256(data)) if calibration or seen == "trained on it"],
    }
    if result["in_sample"]:
        get_logger().warning("evaluated_in_sample", data=str(data), model=str(run_dir), seen=result["in_sample"],
                             reason="metrics on articles the model or its calibration was fitted on are optimistic; "
                                    "evaluate on the test split or new labelled articles")
    if result["calibration"] != "none fitted":
        # The other side of the comparison: without calibration when it was applied, with it when turned off.
        other = model.calibrated(raw, not calibration)
        other_metrics = regression_metrics(other[scored], labels[scored])
        other_decisions = decision_metrics(other, labels, spec, top_k, prefiltered)
        other_calibration = calibration_metrics(other[scored], labels[scored])
        result["raw" if calibration else "if_calibrated"] = {
            "mae": other_metrics["mae"], "rmse": other_metrics["rmse"],
            "calibration_error": other_calibration["calibration_error"],
            "per_dimension_mae": {d: other_metrics[f"{d}_mae"] for d in DIMENSIONS},
            "red_recall": other_decisions.get("red_recall"), "tier_accuracy": other_decisions["tier_accuracy"],
            "ranking": other_decisions["ranking"]}
    if extra:
        generated = extra.pop("generated")
        ok = ~np.isnan(generated).any(axis=1)
        result.update(extra)
        result["generated_rows"] = int(ok.sum())
        result["generated_mae"] = (float(np.abs(generated[ok] - labels[scored][ok]).mean()) if ok.any() else None)
        result["head_mae"] = result["mae"]
    result["reliability"] = calibration_figures["reliability"]
    if out is not None:
        write_json_atomic(result, out)
        plot_confusion(decisions, confusion_plot_path(out))
        plot_reliability(result["reliability"], reliability_plot_path(out))
    # Every figure the terminal's table shows, for a piped stdout too (the generated texts and the reliability
    # diagram's points only in --out)
    figures = {k: v for k, v in result.items() if k not in ("explanations", "explanation_ids", "run", "reliability")}
    get_logger().info("evaluated", **figures, model=str(run_dir), out=str(out) if out else None)
    return result


def confusion_plot_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-tiers.png")


def reliability_plot_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-reliability.png")


def plot_reliability(reliability: dict[str, list[dict[str, float]]], dest: Path) -> None:
    """Mean label against mean score in each score bin, per dimension: calibrated scores lie on the diagonal."""
    from ..core.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.5), sharex=True, sharey=True)
    for ax, dim in zip(axes.flat, DIMENSIONS):
        points = reliability[dim]
        ax.plot([0, 10], [0, 10], color="grey", linewidth=0.8, linestyle="--")
        ax.scatter([p["mean_score"] for p in points], [p["mean_label"] for p in points],
                   s=[12 + 120 * p["rows"] / max(q["rows"] for q in points) for p in points], color="tab:blue")
        ax.set_title(dim.replace("_", " "), fontsize=9)
        ax.set_xlim(0, 10)
        ax.set_ylim(0, 10)
    for ax in axes[1]:
        ax.set_xlabel("mean score in the bin")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean label")
    fig.suptitle("Reliability: mean label per score bin (point size: rows); on the diagonal when calibrated")
    fig.tight_layout()
    save_figure(fig, dest)


def _ratio(value: float | None) -> str:
    return "n/a (the baseline is exact)" if value is None else f"{value:.3f}"


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'dimension':<28} {'MAE':>7} {'RMSE':>7} {'base MAE':>9} {'base RMSE':>10} {'bias':>7} {'cal.err':>8}"]
    for dim, m in result["per_dimension"].items():
        lines.append(f"{dim:<28} {m['mae']:>7.3f} {m['rmse']:>7.3f} {m['baseline_mae']:>9.3f} {m['baseline_rmse']:>10.3f} "
                     f"{m['bias']:>+7.3f} {m['calibration_error']:>8.3f}")
    lines.append(f"{'overall':<28} {result['mae']:>7.3f} {result['rmse']:>7.3f} {result['baseline_mae']:>9.3f} "
                 f"{result['baseline_rmse']:>10.3f} {'':>7} {result['calibration_error']:>8.3f}")
    lines.append(f"rows={result['rows']} (prefiltered, no scores: {result['rows_prefiltered']})  "
                 f"MAE / baseline MAE = {_ratio(result['mae_vs_baseline'])}  "
                 f"calibration: {result['calibration']}")
    for key, label in (("raw", "raw (uncalibrated)"), ("if_calibrated", "with calibration")):
        if key in result:
            other = result[key]
            red = "n/a" if other["red_recall"] is None else f"{other['red_recall']:.3f}"
            lines.append(f"{label}: MAE {other['mae']:.3f}, RMSE {other['rmse']:.3f}, calibration error "
                         f"{other['calibration_error']:.3f}, RED recall {red}")
    lines.append(format_decisions(result["decisions"]))
    if "parse_rate" in result:
        generated = result["generated_mae"]
        lines.append(f"generated JSON: parse rate {result['parse_rate']:.3f}, MAE "
                     f"{'n/a' if generated is None else f'{generated:.3f}'} over {result['generated_rows']} rows; "
                     f"problems {result['parse_problems']}")
    return "\n".join(lines)
