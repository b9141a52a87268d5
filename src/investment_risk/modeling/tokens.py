"""Tokenising once, batching by length and dynamic padding.

Training batches are grouped by length inside windows of shuffled examples, so padding is small without giving
up the randomness of the order; inference batches are sorted by length, cut by rows or by a token budget. Each
batch is padded to its own longest sequence, never to max length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CHARS_PER_TOKEN_BOUND = 16  # cut text before tokenising; re-tokenise in full when the cut might have mattered
# A first, closer cut (news runs 4-5.5 characters a token), made at a word's end: most long articles are tokenised
# from 3,072 characters instead of 8,192, the Rust tokenizer being most of scoring's host time (1.1 ms of 1.2 ms
# an article of 4,000 characters); a text the cut leaves short of max_length goes on to the bound above.
FIRST_CUT_CHARS_PER_TOKEN = 6
# Article text is data: "<|endoftext|>" or "[SEP]" written in it is tokenised as the characters it is, never as the
# special token (which would end or pool the sequence where the text says, and the pad id would hide real tokens).
TEXT = {"split_special_tokens": True}


def article_text(title: str | None, content: str | None) -> str:
    """The model input: title, a blank line, then the content."""
    return f"{title or ''}\n\n{content or ''}"


def article_texts(table: Any) -> list[str]:
    """`article_text` for every row of a table with title and content columns."""
    return [article_text(t, c) for t, c in zip(table.column("title").to_pylist(), table.column("content").to_pylist())]


TRUNCATIONS = ("head", "head-tail")
# head-tail keeps this share of the budget from the start and the rest from the end: Sun et al. (2019, "How to
# fine-tune BERT for text classification") found 128 head + 382 tail tokens best of the cuts they tried at 512.
HEAD_SHARE = 0.25


def encode(tokenizer: Any, texts: Sequence[str], max_length: int, chunk: int = 512,
           truncation: str = "head") -> list[np.ndarray]:
    """Token ids per text with the tokenizer's special tokens, at most max_length: the first tokens of a long text
    (`head`), or its first and last ones (`head-tail`)."""
    if truncation == "head-tail":
        specials = _special_tokens(tokenizer)
        return [row for start in range(0, len(texts), chunk)
                for row in _head_tail(tokenizer, list(texts[start:start + chunk]), max_length, specials)]
    if truncation != "head":
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, not {truncation!r}")
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start:start + chunk])
        rows = _head_rows(tokenizer, part, max_length, [_at_word_end(t, max_length * FIRST_CUT_CHARS_PER_TOKEN)
                                                        for t in part])
        if redo := [i for i, row in enumerate(rows) if row is None]:
            limit = max_length * CHARS_PER_TOKEN_BOUND
            # at a word's end again (a cut inside a word of over 100 characters made BERT's [UNK] word pieces);
            # a text with none in 8,192 characters (CJK, one long token) mid-word, as before, not whole
            cuts = [_at_word_end(part[i], limit) for i in redo]
            again = _head_rows(tokenizer, [part[i] for i in redo], max_length,
                               [part[i][:limit] if cut == "" else cut for i, cut in zip(redo, cuts)])
            for i, row in zip(redo, again):  # still short: the whole text, exactly
                rows[i] = row if row is not None else np.asarray(_token_ids(tokenizer, [part[i]], max_length)[0],
                                                                 dtype=np.int32)
        out += rows
    return out


def _at_word_end(text: str, limit: int) -> str | None:
    """`text` cut before the last space that follows a non-space within `limit` characters; None where it is not
    longer, "" where it has no such space (an empty cut runs short: the next bound takes it). Tokenizers split
    text at such a space (BERT's at every space, byte-level BPE before " word"), so every piece before the cut is
    the whole text's, and so are its tokens."""
    if len(text) <= limit:
        return None
    k = text.rfind(" ", 0, limit + 1)
    while k > 0 and text[k - 1].isspace():
        k = text.rfind(" ", 0, k)
    return text[:k] if k > 0 else ""


def _head_rows(tokenizer: Any, texts: list[str], max_length: int, cuts: list[str | None]
               ) -> list[np.ndarray | None]:
    """The first max_length tokens of each text, from its cut where it has one; None where the cut ran short of
    max_length (the tokens past it might have mattered)."""
    given = [text if cut is None else cut for text, cut in zip(texts, cuts)]
    ids = _token_ids(tokenizer, given, max_length)
    return [None if cut is not None and len(row) < max_length else np.asarray(row, dtype=np.int32)
            for cut, row in zip(cuts, ids)]


def _token_ids(tokenizer: Any, texts: list[str], max_length: int | None, special: bool = True) -> list[list[int]]:
    """Each text's token ids (its first max_length, where given; with the tokenizer's special tokens, if
    `special`): straight from the Rust tokenizer's `encode_batch_fast` where there is one. It skips the character
    offsets, which nothing here reads, and the tokenizer's Python call, together 25-35 % of tokenising's time. The
    backend is left set as that call leaves it (truncation as asked, the text's special tokens split, no padding):
    the call resets what it needs each time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, truncation=max_length is not None, max_length=max_length, add_special_tokens=special,
                         **TEXT)["input_ids"]
    backend.encode_special_tokens = TEXT["split_special_tokens"]
    if max_length is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
    backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=special)]


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one sequence ([CLS] / [SEP] for BERT, none for Qwen2)."""
    core = tokenizer("risk", add_special_tokens=False)["input_ids"]
    full = tokenizer("risk", add_special_tokens=True)["input_ids"]
    at = next(i for i in range(len(full) - len(core) + 1) if full[i:i + len(core)] == core)
    return list(full[:at]), list(full[at + len(core):])


def _head_tail(tokenizer: Any, texts: list[str], max_length: int, specials: tuple[list[int], list[int]]
               ) -> list[np.ndarray]:
    prefix, suffix = specials
    limit = max_length * CHARS_PER_TOKEN_BOUND
    # only the ends can be kept: tokenise those, not a whole book
    ends = [text[:limit] + "\n" + text[-limit:] if len(text) > 2 * limit else text for text in texts]
    budget = max_length - len(prefix) - len(suffix)
    head = int(budget * HEAD_SHARE)
    rows = []
    for ids in _token_ids(tokenizer, ends, None, special=False):
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head):]
        rows.append(np.asarray(prefix + ids + suffix, dtype=np.int32))
    return rows


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    for name, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{name}\n".encode("utf-8", "surrogatepass"))
    h.update(repr(tokenizer.all_special_tokens).encode())
    return h.hexdigest()[:16]


def encode_cached(tokenizer: Any, texts: Sequence[str], max_length: int, cache_file: Path,
                  truncation: str = "head") -> list[np.ndarray]:
    """`encode`, stored once per run as safetensors and reused (resume, evaluation) while the inputs match."""
    from safetensors.numpy import load_file, save_file

    from ..core.atomic import atomic_path

    h = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{max_length}|{truncation}|{len(texts)}|{TEXT}".encode())
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    key = h.hexdigest()
    if cache_file.exists():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(cache_file, "np") as handle:
                if (handle.metadata() or {}).get("key") == key:
                    arrays = load_file(cache_file)
                    ids, offsets = arrays["ids"], arrays["offsets"]
                    return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        except (SafetensorError, OSError, KeyError) as exc:  # a damaged cache is only a cache: tokenise again
            from ..core.logs import get_logger

            get_logger().warning("token_cache_unusable", path=str(cache_file), reason=str(exc))
    rows = encode(tokenizer, texts, max_length, truncation=truncation)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
    with atomic_path(cache_file) as tmp:
        save_file({"ids": ids, "offsets": offsets}, str(tmp), metadata={"key": key})
    return rows


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, window: int = 50) -> list[np.ndarray]:
    """Shuffle, then inside each window of `window` batches sort by length and cut; shuffle the batches.

    Deterministic in (seed, epoch): a resumed run sees the same batches in the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * window
    batches: list[np.ndarray] = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    permutation = rng.permutation(len(batches))
    return [batches[i] for i in permutation]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches for inference: longest first, in order, no shuffling."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def length_batches(lengths: np.ndarray, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Batches for inference under a token budget: rows sorted by length, cut so rows x longest stays within it."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)  # the longest row of this batch comes first
        rows = max(1, min(max_rows, token_budget // width))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def pad_batch(rows: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask padded on the right to the longest row."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def to_device(array: np.ndarray, device: Any) -> Any:
    """numpy -> tensor on `device`; pinned first on CUDA so the copy is truly asynchronous (no host sync)."""
    import torch

    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
