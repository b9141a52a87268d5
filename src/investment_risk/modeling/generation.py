"""Instruction runs writing their answer: greedy reasoning + JSON, free or under the answer grammar."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.logs import Progress
from ..core.spec import DIMENSIONS
from .prompts import answer_grammar, format_target


def generate_explanations(model: Any, tokenizer: Any, rows: list[np.ndarray], device: Any,
                          max_new_tokens: int = 512, constrained: bool = True) -> list[str]:
    """Greedy reasoning + JSON for each prompt, one at a time (no left-padding subtleties).

    Constrained (the default) is grammar-guided greedy decoding: at each step the most likely token that keeps the
    text a valid prefix of ANSWER_PATTERN wins, and the paragraph is closed in time to leave room for the JSON. The
    model still chooses every word and number; the grammar only rules out malformed output. Free decoding is plain
    greedy generation, for measuring how well the model learned the format by itself.
    """
    import torch

    texts = []
    decoder = _ConstrainedDecoder(tokenizer, max_new_tokens) if constrained else None
    with torch.inference_mode(), Progress(len(rows), "explain") as progress:
        for row in rows:
            ids = torch.as_tensor(row, device=device)[None, :]
            if decoder is not None:
                texts.append(decoder.generate(model.lm, ids))
            else:
                out = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            progress.update(1)
    return texts


class _ConstrainedDecoder:
    """Greedy decoding under the answer grammar, with a KV cache."""

    CANDIDATES = 64  # top tokens tried before scanning the whole vocabulary

    def __init__(self, tokenizer: Any, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.grammar = answer_grammar()
        # Each token's text as it reads after other text: decoded behind an anchor, because SentencePiece
        # tokenizers drop a token's leading space when it is decoded alone.
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
        offset = len(tokenizer.decode(anchor))
        self.pieces = [tokenizer.decode(anchor + [i])[offset:] for i in range(len(tokenizer))]
        self.special = set(tokenizer.all_special_ids)
        # Room for the longest JSON even if the grammar makes the model spell it one character per token.
        json_chars = len(format_target("", [10.0] * len(DIMENSIONS)))
        self.paragraph_budget = max(max_new_tokens - json_chars, 0)
        self.max_new_tokens = max_new_tokens

    def _allowed(self, text: str, piece: str, token: int, close_paragraph: bool) -> bool:
        if token in self.special or not piece:
            return False
        if close_paragraph and "\n" not in text and "\n" not in piece:
            return False
        return self.grammar.fullmatch(text + piece, partial=True) is not None

    def _pick(self, logits: Any, text: str, close_paragraph: bool) -> int | None:
        # The embedding matrix may be padded past the tokenizer's vocabulary: those ids are never candidates.
        order = logits[: len(self.pieces)].argsort(descending=True).tolist()
        for token in order[: self.CANDIDATES] + order[self.CANDIDATES:]:
            if self._allowed(text, self.pieces[token], token, close_paragraph):
                return token
        return None

    def generate(self, lm: Any, ids: Any) -> str:
        import inspect

        from transformers import DynamicCache

        # The cache argument was renamed (past_key_values -> cache) in transformers 5.2x; the cache fills in place.
        forward = inspect.signature(type(lm.get_base_model()).forward).parameters
        cache = {"cache" if "cache" in forward else "past_key_values": DynamicCache()}
        text, step_ids, generated = "", ids, []
        for step in range(self.max_new_tokens):
            out = lm(input_ids=step_ids, use_cache=True, **cache)
            token = self._pick(out.logits[0, -1].float(), text, step >= self.paragraph_budget)
            if token is None:
                break
            generated.append(token)
            text += self.pieces[token]
            if self.grammar.fullmatch(text) is not None:
                break
            step_ids = ids.new_tensor([[token]])
        # The pieces steer the grammar; the answer is the ids decoded together (multi-byte characters intact).
        return self.tokenizer.decode(generated, skip_special_tokens=True)
