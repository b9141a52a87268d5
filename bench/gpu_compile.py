"""GPU experiment: how much torch.compile and larger batches add on top of the eager paths of gpu_score/gpu_train.

    python bench/gpu_compile.py --out bench-results/gpu-compile.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_score import build, run
from gpu_train import DEVICE, SMOKE, make_base_model


def scoring(rows: list[np.ndarray], pad: int, budget: int, compiled: bool) -> float:
    from investment_risk.batching import pad_batch
    from investment_risk.score import length_batches

    lengths = np.array([len(r) for r in rows])
    batches = [pad_batch([rows[i] for i in b], pad) for b in length_batches(lengths, budget, 1024)]
    model = build(torch.float32 if SMOKE else torch.bfloat16, pad)
    if compiled:
        model = torch.compile(model, dynamic=False)
        run(model, batches[:2], autocast=False)  # compile outside the timing
    seconds = run(model, batches, autocast=False)
    del model
    if not SMOKE:
        torch.cuda.empty_cache()
    return round(len(rows) / seconds, 1)


def training_steps(base: Path, batch: int, compiled: bool, steps: int) -> float:
    from investment_risk.models import load_tokenizer, regression_model, resolve_base_model

    model = regression_model(resolve_base_model(str(base)), load_tokenizer(base),
                             dtype=torch.float32 if SMOKE else torch.bfloat16).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=not SMOKE)
    forward = torch.compile(model, dynamic=False) if compiled else model
    ids = torch.randint(0, 2000, (batch, 512), device=DEVICE)
    mask = torch.ones_like(ids)
    target = torch.rand(batch, 8, device=DEVICE) * 10
    sync = (lambda: None) if SMOKE else torch.cuda.synchronize
    for i in range(steps + 3):
        if i == 3:
            sync()
            start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=not SMOKE):
            out = forward(input_ids=ids, attention_mask=mask).logits.float()
        torch.nn.functional.mse_loss(out, target).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    rate = batch * 512 * steps / (time.perf_counter() - start)
    del model, opt, forward
    if not SMOKE:
        torch.cuda.empty_cache()
    return round(rate)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results/gpu-compile.json")
    args = parser.parse_args()
    from investment_risk.batching import article_text, encode
    from investment_risk.models import _tiny_tokenizer
    from investment_risk.synth import SynthConfig, generate

    results: dict = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = _tiny_tokenizer(root / "tok")
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
            "eager_batch_16": training_steps(base, 16, False, steps),
            "compiled_batch_16": training_steps(base, 16, True, steps),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
