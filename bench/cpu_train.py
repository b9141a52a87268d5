"""CPU training throughput: real training tokens/s and peak memory (RSS) for minilm and tiny-qwen2.

Each model trains one short epoch of the real recipe in its own process (so peak RSS is its own), on synthetic
articles at --max-length 128. Prints a table and writes bench-results/cpu-train.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import peak_rss_mib

MODELS = {"tiny-qwen2": {"rows": 600, "batch": 16}, "minilm": {"rows": 250, "batch": 16}}


def child(model: str, rows: int, batch: int, root: Path) -> None:
    from investment_risk.core.logs import configure_logging
    from investment_risk.datasets.split import SplitConfig, run_split
    from investment_risk.datasets.synth import SynthConfig, write_synthetic
    from investment_risk.training.config import TrainConfig
    from investment_risk.training.recipe import train

    configure_logging("json", "WARNING")
    write_synthetic(SynthConfig(rows=rows, seed=3), root / "a.parquet")
    run_split([str(root / "a.parquet")], root / "d", SplitConfig(val=0.05, test=0.05))
    meta = train(TrainConfig(mode="distillation", base_model=model, data=str(root / "d"), out=str(root / "run"),
                             epochs=1, batch_size=batch, learning_rate=3e-4, max_length=128, device="cpu"))
    peak_mib = peak_rss_mib()
    print(json.dumps({"model": model, "train_examples": meta["train_examples"], "train_tokens": meta["train_tokens"],
                      "train_seconds": meta["train_seconds"], "tokens_per_second": meta["tokens_per_second"],
                      "peak_rss_mib": round(peak_mib, 1), "batch_size": batch, "max_length": 128,
                      "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
        return
    results = []
    for model, spec in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, __file__, "--child", model, str(spec["rows"]), str(spec["batch"]), tmp],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = Path("bench-results/cpu-train.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{'model':<12} {'examples':>8} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['model']:<12} {r['train_examples']:>8} {r['train_tokens']:>8} {r['train_seconds']:>8} "
              f"{r['tokens_per_second']:>9} {r['peak_rss_mib']:>13}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
