"""`tiny-qwen2`: a 2-layer Qwen2 with seeded random weights and a tokenizer trained here, for tests (no download)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the tiny build changes, so an old cached build is never mistaken for the new one.
TINY_QWEN2_BUILD = "tiny-qwen2-v2"


def tiny_tokenizer(workdir: Path) -> Any:
    """A byte-level BPE trained on synthetic articles: covers any text, deterministic, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..core.spec import DIMENSIONS
    from ..datasets.synth import SynthConfig, generate
    from .prompts import ARTICLE_HEADER, INSTRUCTION, RESPONSE_HEADER, format_target

    corpus = generate(SynthConfig(rows=300, seed=0))
    labels = [[corpus.column(d)[i].as_py() for d in DIMENSIONS] for i in range(corpus.num_rows)]
    # The instruction prompt and JSON targets are in the corpus too, so instruction-mode sequences stay short.
    texts = (corpus.column("title").to_pylist() + corpus.column("content").to_pylist()
             + [INSTRUCTION + ARTICLE_HEADER + RESPONSE_HEADER] * corpus.num_rows
             + [format_target(r, s) for r, s in zip(corpus.column("reasoning").to_pylist(), labels)])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=2048)
    fast.save_pretrained(workdir)
    return fast


def build_tiny_qwen2(target: Path) -> Path:
    """Build (once) a 2-layer Qwen2 with seeded random weights and its tokenizer under `target`."""
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tiny-qwen2-", dir=target.parent))
    try:
        tokenizer = tiny_tokenizer(work)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        generator_state = torch.get_rng_state()
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        torch.set_rng_state(generator_state)
        model.save_pretrained(work, safe_serialization=True)
        try:
            os.rename(work, target)  # atomic; a concurrent builder that got there first wins
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


