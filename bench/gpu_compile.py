"""GPU experiment: how much torch.compile and larger batches add on top of the eager paths of gpu_score/gpu_train.

    python bench/gpu_compile.py --out bench-results/gpu-compile.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from gpu_score import build, run
from gpu_train import SMOKE, make_base_model, step_loop


def scoring(rows: list[np.ndarray], pad: int, budget: int, compiled: bool) -> float:
    from investment_risk.modeling.tokens import length_batches, pad_batch

    lengths = np.array([len(r) for r in rows])
    batches = [pad_batch([rows[i] for i in b], pad) for b in length_batches(lengths, budget, 1024)]
    model = build(torch.float32 if SMOKE else torch.bfloat16, pad)
    if compiled:
        model = torch.compile(model, dynamic=False)
        one_per_shape = {ids.shape: (ids, mask) for ids, mask in batches}
        run(model, list(one_per_shape.values()), autocast=False)  # every shape compiled outside the timing
    seconds = run(model, batches, autocast=False)
    del model
    if not SMOKE:
        torch.cuda.empty_cache()
    return round(len(rows) / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results/gpu-compile.json")
    args = parser.parse_args()
    from investment_risk.modeling.tokens import article_text, encode
    from investment_risk.modeling.tiny import tiny_tokenizer
    from investment_risk.datasets.synth import SynthConfig, generate

    results: dict = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = tiny_tokenizer(root / "tok")
        table = generate(SynthConfig(rows=48 if SMOKE else 3000, seed=5, long_tail_share=0.0))
        texts = [article_text(t, c) * 6 for t, c in zip(table.column("title").to_pylist(), table.column("content").to_pylist())]
        rows = encode(tokenizer, texts, 512)
        pad = tokenizer.pad_token_id
        results["scoring_articles_per_second"] = {
            "eager_budget_65536": scoring(rows, pad, 65536, False),
            "eager_budget_131072": scoring(rows, pad, 131072, False),
            "compiled_budget_65536": scoring(rows, pad, 65536, True),
        }
        print(json.dumps(results, indent=2), flush=True)
        base = make_base_model(root)
        steps = 2 if SMOKE else 10
        results["training_tokens_per_second"] = {
            "eager_batch_16": step_loop(base, 16, 512, steps)["tokens_per_second"],
            "compiled_batch_16": step_loop(base, 16, 512, steps, compiled=True)["tokens_per_second"],
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
