"""What the pooled last block (modeling/pooled_block.py) and the instruction model's `logits_to_keep` save, in one
process, interleaved: a training step (forward + backward) and a scoring pass, pooled against the whole block.

    python bench/pooled_block.py minilm 128 16            # minilm, 16 rows of about 128 tokens
    python bench/pooled_block.py qwen:4 512 2             # 4 blocks of Qwen2.5-1.5B's width, random weights
    python bench/pooled_block.py instruction:2 1024 1     # the LM head: every position vs from the prompt's end
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from investment_risk.modeling.networks import InstructionModel, causal_lm, regression_model
from investment_risk.modeling.pooled_block import POSITIONS
from investment_risk.modeling.presets import load_tokenizer, resolve_base_model
from investment_risk.modeling.tokens import pad_batch


def qwen_width(blocks: int, vocab: int | None = None) -> Path:
    """A Qwen2.5-1.5B-wide model with `blocks` blocks and seeded random weights, tiny-qwen2's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer(resolve_base_model("tiny-qwen2").path)
    out = Path(tempfile.mkdtemp())
    config = Qwen2Config(vocab_size=vocab or len(tokenizer), hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=blocks, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def timed(fn, a, b, rounds: int = 5) -> tuple[float, float]:
    """Median seconds of `fn(a)` and `fn(b)`, after one warm-up each, in alternating rounds."""
    fn(a), fn(b)
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for side, arg in enumerate((a, b)):
            started = time.perf_counter()
            fn(arg)
            times[side].append(time.perf_counter() - started)
    return float(np.median(times[0])), float(np.median(times[1]))


def pooled_vs_whole(name: str, length: int, rows: int) -> None:
    base = resolve_base_model("minilm" if name == "minilm" else str(qwen_width(int(name.split(":")[1]))))
    tokenizer = load_tokenizer(base.path)
    pooled = regression_model(base, tokenizer)
    whole = copy.deepcopy(pooled)
    for layer in [m for m in whole.modules() if hasattr(m, POSITIONS)]:
        del layer.forward
        delattr(layer, POSITIONS)
    rng = np.random.default_rng(0)
    ids, mask = pad_batch([rng.integers(1000, 2000, size=length - (i % 3) * 5) for i in range(rows)],
                          tokenizer.pad_token_id)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def step(model):
        model.train()
        model(input_ids=ids, attention_mask=mask).logits.square().sum().backward()

    def score(model):
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    blocks = pooled.config.num_hidden_layers
    for what, fn in (("training step", step), ("scoring", score)):
        full, less = timed(fn, whole, pooled)
        print(f"{name} {rows} x {length} tokens, {what}: whole {full:.3f} s, pooled {less:.3f} s "
              f"({less / full - 1:+.1%}; one block of {blocks} is {1 / blocks:.1%})")


def lm_head(blocks: int, length: int, rows: int) -> None:
    lm, config = causal_lm(resolve_base_model(str(qwen_width(blocks, vocab=151936))))
    model = InstructionModel(lm, config.hidden_size).train()
    prompt = int(length * 0.83)  # an article's prompt and a short answer
    ids = torch.randint(10, 1000, (rows, length))
    targets = ids.clone()
    targets[:, :prompt] = -100
    end = torch.full((rows,), prompt - 1)

    def step(first: int) -> None:
        logits, scores = model(ids, torch.ones_like(ids), end, first)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[:, first + 1:])
        (loss + scores.square().mean()).backward()

    full, less = timed(step, 0, prompt - 1, rounds=3)
    print(f"instruction, {blocks} blocks, {rows} x {length} tokens ({prompt}-token prompt), training step: "
          f"LM head on every position {full:.2f} s, from the prompt's end {less:.2f} s ({less / full - 1:+.1%})")


def main() -> None:
    name, length, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if name.startswith("instruction:"):
        lm_head(int(name.split(":")[1]), length, rows)
    else:
        pooled_vs_whole(name, length, rows)


if __name__ == "__main__":
    main()
