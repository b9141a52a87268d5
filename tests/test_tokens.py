"""The tokenizer as the scorer loads it: the ids AutoTokenizer gives, without importing torch."""

import subprocess
import sys

import numpy as np
import pytest

from investment_risk.core.errors import InputError
from investment_risk.modeling.presets import load_tokenizer, resolve_base_model
from investment_risk.modeling.tokens import encode, tokenizer_fingerprint

TEXTS = ["Fed raises rates by 50bp; credit spreads widen.", "  ÉCB: «liquidité» €3.2tn — 中文 🙂\n\ttabs 2024-11-27",
         "word " * 700, ""]


def assert_same_as_autotokenizer(path):
    from transformers import AutoTokenizer

    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if auto.pad_token is None:
        auto.pad_token = auto.eos_token
    assert type(ours) is type(auto) and ours.pad_token_id == auto.pad_token_id
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(auto)
    for truncation in ("head", "head-tail"):
        for a, b in zip(encode(ours, TEXTS, 64, truncation=truncation), encode(auto, TEXTS, 64, truncation=truncation)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("base_name", ["tiny-qwen2", "minilm"])
def test_base_and_exported_tokenizers_load_as_autotokenizer_does(base_name, tmp_path):
    base = resolve_base_model(base_name).path
    assert_same_as_autotokenizer(base)
    load_tokenizer(base).save_pretrained(tmp_path)  # as export saves it: no config.json beside it
    assert_same_as_autotokenizer(tmp_path)


def test_onnx_scoring_path_does_not_import_torch(exported):
    """torch costs the ONNX scorer a second of start for nothing: its tokenizer and runner stay clear of it."""
    _, model_dir, _ = exported
    code = ("import sys; from pathlib import Path\n"
            "from investment_risk.modeling.description import describe_model\n"
            "from investment_risk.modeling.loading import load_runner\n"
            "from investment_risk.modeling.presets import load_tokenizer\n"
            "from investment_risk.scoring.pipeline import score\n"
            f"model = describe_model(Path({str(model_dir)!r}))\n"
            "load_runner(model, 'onnx', 'cpu'); load_tokenizer(model.tokenizer_dir)\n"
            "print(sorted(m for m in ('torch', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_tokenizer_config_naming_a_model_class_is_not_followed(tmp_path, monkeypatch):
    """The file names a class, and AutoTokenizer would call any class's from_pretrained: a model loader is refused."""
    import json

    import transformers

    path = resolve_base_model("tiny-qwen2").path
    load_tokenizer(path).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "AutoModel"}))
    called = []
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: called.append(a))
    with pytest.raises(InputError, match="tokenizer_class 'AutoModel' is not a tokenizer class"):
        load_tokenizer(tmp_path)
    assert called == []


@pytest.mark.parametrize("base_name", ["tiny-qwen2", "minilm"])
def test_special_tokens_written_in_an_article_are_text_not_control(base_name):
    """An article that says "<|endoftext|>" (Qwen2's pad and end) or "[SEP]" / "[PAD]" (BERT's) cannot end, pad or
    pool its own sequence: the model would stop reading, or pool before it, where untrusted text says."""
    from investment_risk.modeling.prompts import build_prompt

    tokenizer = load_tokenizer(resolve_base_model(base_name).path)
    specials = set(tokenizer.all_special_ids)
    prefix, suffix = (len(ids) for ids in _framing(tokenizer))
    text = f"Spreads widen {' '.join(tokenizer.all_special_tokens)} and defaults rise"
    for truncation in ("head", "head-tail"):
        [row] = encode(tokenizer, [text], 64, truncation=truncation)
        body = row[prefix:len(row) - suffix]
        assert len(body) > 0 and not specials & set(body.tolist()), (truncation, row)
    if base_name == "tiny-qwen2":  # instruction mode's prompt: the article's part of it
        prompt = build_prompt(tokenizer, "Title", text, 256).prompt_ids
        assert tokenizer.pad_token_id not in prompt


def _framing(tokenizer):
    from investment_risk.modeling.tokens import _special_tokens

    return _special_tokens(tokenizer)


@pytest.mark.parametrize("base_name", ["tiny-qwen2", "minilm"])
def test_a_long_text_cut_before_tokenising_gives_the_whole_texts_first_tokens(base_name):
    # encode cuts a long text at a word's end near 6 characters a token, then at the 16-character bound, then
    # tokenises it whole: whichever it took, the ids are those of the whole text, truncated.
    import random

    from investment_risk.modeling.tokens import TEXT

    tokenizer = load_tokenizer(resolve_base_model(base_name).path)
    rng = random.Random(7)
    words = ["Spreads", "widened", "40bp,", "the", "Fed's", "balance-sheet", "2024-11-27", "«liquidité»", "中文",
             "🙂", "don't", "(CDS)", "$3.2tn", "\n\n", "  ", "\t", "<|endoftext|>", "[SEP]", "9" * 12]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(300, 1500))) for _ in range(40)]
    texts += ["x" * 9000, "1 " * 5000, "abc  " * 1500, "word " * 700 + "end", "a" * 3000 + " b" * 10, ""]
    for max_length in (64, 512):
        whole = [np.asarray(tokenizer(t, truncation=True, max_length=max_length, **TEXT)["input_ids"]) for t in texts]
        for text, got, want in zip(texts, encode(tokenizer, texts, max_length), whole):
            np.testing.assert_array_equal(got, want, err_msg=f"{max_length} {text[:40]!r}")

    # head-tail: the whole text's first quarter of the budget and its last tokens, framed as the tokenizer frames
    # one sequence (for a text within twice the 16-character bound, which nothing cuts before tokenising)
    prefix, suffix = _framing(tokenizer)
    for max_length in (64, 512):
        budget = max_length - len(prefix) - len(suffix)
        for text, got in zip(texts, encode(tokenizer, texts, max_length, truncation="head-tail")):
            if len(text) > 2 * 16 * max_length:
                continue
            ids = tokenizer(text, add_special_tokens=False, **TEXT)["input_ids"]
            if len(ids) > budget:
                ids = ids[:budget // 4] + ids[len(ids) - (budget - budget // 4):]
            np.testing.assert_array_equal(got, prefix + ids + suffix, err_msg=f"head-tail {max_length} {text[:40]!r}")


def test_the_first_cut_falls_at_a_words_end_within_its_limit():
    # Tokenizers split before " word", so a text cut there keeps every piece before the cut whole; cut mid-word
    # (or mid-run of spaces) the last piece could tokenise differently from the whole text's.
    from investment_risk.modeling.tokens import _at_word_end

    assert _at_word_end("short", 10) is None  # not longer than the limit: not cut
    assert _at_word_end("alpha beta gamma delta", 13) == "alpha beta"  # not "alpha beta ga"
    assert _at_word_end("alpha   beta gamma", 9) == "alpha"  # before the run of spaces, not inside it
    assert _at_word_end("alpha beta", 5) == "alpha" and _at_word_end("alpha beta", 4) == ""  # none within it
    assert _at_word_end("x" * 50, 10) == ""  # no word end: an empty cut, which runs short, so the next bound


def test_a_long_text_without_a_word_end_is_not_tokenised_whole():
    # A CJK article or a minified blob has no " " to cut at: it went to the whole text (0.5-2 s for 200k-2M
    # characters) instead of the 8,192-character bound.
    import unittest.mock

    from investment_risk.modeling import tokens

    tokenizer = load_tokenizer(resolve_base_model("tiny-qwen2").path)
    seen = []
    real = tokens._token_ids

    def spy(tokenizer, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return real(tokenizer, texts, *args, **kwargs)

    with unittest.mock.patch.object(tokens, "_token_ids", spy):
        [row] = encode(tokenizer, ["\u4e2d\u6587" * 100_000], 64)
    assert len(row) == 64 and max(seen) <= 64 * 16, seen


def test_a_bert_word_over_100_characters_at_the_bound_is_not_cut_into_pieces():
    # BERT reads a word of over 100 characters as one [UNK]; the bound cut inside one, leaving word pieces where
    # the whole text has [UNK] (a text whose first cut ran short, so that the bound decided).
    from investment_risk.modeling.tokens import TEXT

    tokenizer = load_tokenizer(resolve_base_model("minilm").path)
    head = ""
    while len(head) < 8192 - 690:  # one [UNK] a word: few tokens for many characters, so the first cut runs short
        head += "f" * 120 + " "
    filler = ""
    while len(head + filler) < 8192 - 50:
        filler += "qz "
    text = head + filler + "qzqzqzqzqz" * 20 + " end"  # a 200-character word across the bound, near token 491
    want = tokenizer(text, truncation=True, max_length=512, **TEXT)["input_ids"]
    np.testing.assert_array_equal(encode(tokenizer, [text], 512)[0], want)
