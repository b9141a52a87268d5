"""Build a small Qwen2 with seeded random weights (hidden 192, 4 layers) and tiny-qwen2's tokenizer into a
directory, for benchmarks that need more capacity than tiny-qwen2 and no download: `python bench/small_qwen2.py DIR`."""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from investment_risk.modeling.presets import resolve_base_model


def build(out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("tiny-qwen2").path)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
