"""The whole loop on the embedded default, end to end: synth -> split -> train -> export -> score -> report."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.atomic import write_text_atomic
from .core.logs import bind, get_logger


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    base_model: str = "minilm"
    rows: int = 2500
    batch_rows: int = 3000
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 3e-4
    max_length: int = 128
    seed: int = 7


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from .datasets.split import SplitConfig, run_split
    from .datasets.synth import SynthConfig, write_synthetic
    from .evaluation.evaluate import evaluate_run
    from .export.onnx_export import export_run
    from .modeling.presets import check_base, resolve_base_model
    from .scoring.pipeline import ScoreConfig, score
    from .training.config import TrainConfig
    from .training.recipe import train
    from .training.run_dir import resume_refusal

    log = get_logger()
    # A base model that is not here, or that cannot take the demo's settings, is refused before minutes of work.
    check_base(resolve_base_model(config.base_model), "distillation", config.max_length)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)

    def step(name: str) -> None:
        bind(stage=f"demo:{name}")

    step("synth")
    write_synthetic(SynthConfig(rows=config.rows, seed=config.seed), out / "articles.parquet")
    step("split")
    run_split([str(out / "articles.parquet")], out / "data", SplitConfig(seed=config.seed))
    step("train")
    run = out / "run"
    train_config = TrainConfig(mode="distillation", base_model=config.base_model, data=str(out / "data"), out=str(run),
                               epochs=config.epochs, batch_size=config.batch_size,
                               learning_rate=config.learning_rate, max_length=config.max_length, seed=config.seed)
    # An interrupted demo continues its run; a run of other settings or data in its folder is the demo's own
    # leftover, and starts again.
    resume = run.exists() and not (refusal := resume_refusal(train_config))
    if run.exists() and not resume:
        log.info("demo_run_restarted", run=str(run), reason=refusal)
        shutil.rmtree(run)
    metadata = train(train_config, resume=resume)
    step("evaluate")
    evaluation = evaluate_run(run, out / "data" / "test.parquet", out / "evaluation.json")
    step("export")
    info = export_run(run, out / "model", force=True)
    step("batch")
    write_synthetic(SynthConfig(rows=config.batch_rows, seed=config.seed + 1000), out / "batch" / "articles.parquet")
    step("score")
    shutil.rmtree(out / "scored", ignore_errors=True)  # a new batch (a demo run again writes new articles)
    merged = score(ScoreConfig(model=out / "model", inputs=(str(out / "batch"),), out=out / "scored",
                               keep_columns=("source", "published_at")))
    shard = json.loads((out / "scored" / "metrics" / "part-00000.json").read_text())
    step("report")
    summary = {
        "val_mae": metadata["best_val_mae"], "test_mae": evaluation["mae"], "test_baseline_mae": evaluation["baseline_mae"],
        "test_mae_raw": (evaluation.get("raw") or {}).get("mae", evaluation["mae"]), "calibrated": "raw" in evaluation,
        "rows_scored": merged["rows_scored"], "rows_rejected": merged["rows_rejected"],
        "rows_prefiltered": merged["rows_prefiltered"], "rows_per_second": shard["rows_per_second"],
        "real_token_share": merged["real_token_share"], "tier_counts": merged["tier_counts"],
        "onnx_parity": info["parity"]["fp32_max_abs_diff"], "model_version": info["model_version"],
        "outputs": {
            "articles": str(out / "articles.parquet"), "splits": str(out / "data"), "run": str(run),
            "training_reports": str(run / "training_reports"), "evaluation": str(out / "evaluation.json"),
            "model": str(out / "model"), "scored": str(out / "scored"), "metrics": str(out / "scored" / "metrics.json"),
            "report": str(out / "demo_report.md"),
        },
    }
    write_text_atomic(report_markdown(summary), out / "demo_report.md")
    log.info("demo_done", **{k: v for k, v in summary.items() if k != "outputs"})
    return summary


def report_markdown(summary: dict[str, Any]) -> str:
    tiers = ", ".join(f"{t} {n}" for t, n in summary["tier_counts"].items())
    lines = [
        "# investment-risk demo",
        "",
        "| measure | value |",
        "|---|---|",
        f"| best val MAE (training's: raw scores, every row) | {summary['val_mae']:.3f} |",
        f"| test MAE, calibrated (raw; predict-the-mean baseline), prefiltered rows aside | {summary['test_mae']:.3f} "
        f"({summary['test_mae_raw']:.3f}; {summary['test_baseline_mae']:.3f}) |",
        f"| ONNX vs PyTorch max abs diff | {summary['onnx_parity']:.2e} |",
        f"| rows scored / rejected / prefiltered | {summary['rows_scored']} / {summary['rows_rejected']} / "
        f"{summary['rows_prefiltered']} |",
        f"| scoring rows/s | {summary['rows_per_second']} |",
        f"| real-token share | {summary['real_token_share']} |",
        f"| tiers | {tiers} |",
        "",
        "## Outputs",
        "",
    ]
    lines += [f"- {name}: `{path}`" for name, path in summary["outputs"].items()]
    return "\n".join(lines) + "\n"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    tiers = " ".join(f"{t}={n}" for t, n in summary["tier_counts"].items())
    lines = [
        f"val MAE {summary['val_mae']:.3f} (raw, every row); test MAE "
        + (f"{summary['test_mae']:.3f} calibrated, " if summary["calibrated"] else "")
        + f"{summary['test_mae_raw']:.3f} raw, vs predict-the-mean {summary['test_baseline_mae']:.3f} (prefiltered "
        "rows aside)",
        f"scored {summary['rows_scored']} rows ({summary['rows_prefiltered']} prefiltered, {summary['rows_rejected']} "
        f"rejected) at {summary['rows_per_second']} rows/s; tiers: {tiers}",
    ]
    lines += [f"{name:<17} {path}" for name, path in summary["outputs"].items()]
    return lines
