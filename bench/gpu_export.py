"""The product's GPU path end to end, through the CLI (issue 12, item 4): a Qwen2.5-1.5B-shaped run (random base
weights, one short epoch of the real recipe so that it has an adapter, a head and a validation split), then

    investment-risk export --run RUN --out MODEL --dtype fp16 --device cuda
    investment-risk score --model MODEL --input articles.parquet --out SCORED --device cuda

each as its own process, timed whole. Reports what model.json recorded (fused operators, the fp16 graph's parity
against PyTorch bf16 on mixed-length padded batches, on which provider, its validation MAE beside fp32's) and what
the scorer's metrics.json says (rows, provider, rows/s).

    python bench/gpu_export.py --out bench-results/gpu-export.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpu_train import DEVICE, SMOKE, make_base_model, write_long_articles  # noqa: E402  (same directory)


def cli(*args: str) -> tuple[float, list[dict]]:
    """One `investment-risk` process: its seconds and its JSON log events. Its output goes on to this step's log
    line by line, so a step cut short still shows how far it got."""
    started = time.perf_counter()
    events = []
    with subprocess.Popen([sys.executable, "-m", "investment_risk", *args], stdout=subprocess.PIPE, text=True) as cmd:
        for line in cmd.stdout:
            sys.stdout.write(line)
            try:
                events.append(json.loads(line))
            except ValueError:  # a library's own print
                pass
    if cmd.returncode:
        raise subprocess.CalledProcessError(cmd.returncode, cmd.args)
    return round(time.perf_counter() - started, 1), events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results/gpu-export.json")
    parser.add_argument("--train-articles", type=int, default=400)
    parser.add_argument("--score-articles", type=int, default=4000)
    args = parser.parse_args()
    if SMOKE:
        args.train_articles, args.score_articles = 40, 64
    from investment_risk.datasets.split import SplitConfig, run_split
    from investment_risk.training.config import TrainConfig
    from investment_risk.training.recipe import train

    results: dict = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__}

    def save() -> None:  # after every section: a step cut short still returns what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        base = make_base_model(root)
        write_long_articles(args.train_articles, 11, root / "labelled.parquet")
        run_split([str(root / "labelled.parquet")], root / "data", SplitConfig())
        train(TrainConfig(mode="distillation", base_model=str(base), data=str(root / "data"), out=str(root / "run"),
                          epochs=1, batch_size=8, learning_rate=2e-5, max_length=512, checkpoint_steps=10_000,
                          device=DEVICE))
        results["run_seconds"] = round(time.perf_counter() - started, 1)
        if not SMOKE:
            torch.cuda.empty_cache()
        save()

        results["export_seconds"], events = cli("export", "--run", str(root / "run"), "--out", str(root / "model"),
                                                 "--dtype", "fp16", "--device", DEVICE)
        results["export_step_seconds"] = next(e["step_seconds"] for e in events
                                              if e["event"] == "progress_done" and e["what"] == "export")
        model = json.loads((root / "model" / "model.json").read_text())
        results["model_json"] = {key: model[key] for key in ("dtype", "external_data", "graph", "fused_operators", "parity")}
        save()

        write_long_articles(args.score_articles, 5, root / "batch.parquet")
        results["score_seconds"], _ = cli("score", "--model", str(root / "model"), "--input", str(root / "batch.parquet"),
                                       "--out", str(root / "scored"), "--device", DEVICE)
        shard = json.loads((root / "scored" / "metrics" / "part-00000.json").read_text())
        results["score"] = {key: shard.get(key) for key in ("provider", "rows_in", "rows_scored", "rows_model",
                                                             "rows_rejected", "invariant_holds", "real_token_share",
                                                             "model_rows_per_second", "rows_per_second", "batches")}
        results["score"]["articles_per_second_whole_process"] = round(shard["rows_in"] / results["score_seconds"], 1)
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
