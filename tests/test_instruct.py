import json
import math

import pytest

from investment_risk.modeling.prompts import INSTRUCTION, PromptTooLong, build_prompt, format_target, parse_generation
from investment_risk.core.spec import DIMENSIONS

SCORES = dict(zip(DIMENSIONS, [7.2, 5.0, 3.3, 8.0, 1.0, 6.6, 9.1, 4.4]))


@pytest.fixture(scope="module")
def tokenizer():
    from investment_risk.modeling.presets import load_tokenizer, resolve_base_model
    return load_tokenizer(resolve_base_model("tiny-qwen2").path)


def test_target_is_reasoning_then_json_in_dimension_order():
    target = format_target("  Credit is tight. ", SCORES)
    reasoning, payload = target.split("\n")
    assert reasoning == "Credit is tight."
    assert list(json.loads(payload)) == list(DIMENSIONS) and json.loads(payload)["valuation_risk"] == 8.0
    assert parse_generation(target).complete


def test_only_the_article_is_truncated(tokenizer):
    target = format_target("Reasoning " * 20, SCORES)
    short = build_prompt(tokenizer, "Title", "Short body.", 1024, target)
    assert not short.article_truncated
    long = build_prompt(tokenizer, "Title", "word " * 5000, 600, target)
    assert long.article_truncated and len(long.input_ids) == 600
    instruction = tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"]
    assert long.prompt_ids[:len(instruction)] == instruction  # the instruction is whole
    assert long.target_ids[:-1] == tokenizer(target, add_special_tokens=False)["input_ids"]  # so is the target
    assert long.target_ids[-1] == tokenizer.eos_token_id
    assert long.labels[:len(long.prompt_ids)] == [-100] * len(long.prompt_ids)
    assert long.labels[len(long.prompt_ids):] == long.target_ids


def test_reserved_room_makes_training_and_scoring_prompts_identical(tokenizer):
    article = "word " * 5000
    short_target, long_target = format_target("Brief.", SCORES), format_target("Much longer reasoning. " * 10, SCORES)
    reserve = len(build_prompt(tokenizer, "t", "c", 1024, long_target).target_ids)
    trained = [build_prompt(tokenizer, "Title", article, 600, t, reserve) for t in (short_target, long_target)]
    scored = build_prompt(tokenizer, "Title", article, 600 - reserve)
    assert trained[0].prompt_ids == trained[1].prompt_ids == scored.prompt_ids  # whatever the target's length
    with pytest.raises(PromptTooLong, match="longer than the reserve"):
        build_prompt(tokenizer, "Title", article, 600, long_target, reserve - 1)


def test_no_room_for_the_article(tokenizer):
    with pytest.raises(PromptTooLong, match="no room for the article"):
        build_prompt(tokenizer, "t", "c", 50, format_target("r", SCORES))


@pytest.mark.parametrize("text, complete, problem", [
    ('Fine.\n{"macro_risk_severity": 1, "credit_market_stress": 2, "market_sentiment_extremes": 3, "valuation_risk": 4, '
     '"policy_regulatory_risk": 5, "systemic_risk": 6, "evidence_quality": 7, "actionability": 8}', True, None),
    ("no json at all", False, "no JSON object"),
    ('{"macro_risk_severity": 3}', False, "missing credit_market_stress"),
    ('{"macro_risk_severity": 12, ' + ", ".join(f'"{d}": 1' for d in DIMENSIONS[1:]) + "}", False, "outside [0, 10]"),
    ('{"macro_risk_severity": "high", ' + ", ".join(f'"{d}": 1' for d in DIMENSIONS[1:]) + "}", False, "not a number"),
    ('{' + ", ".join(f'"{d}": 1' for d in DIMENSIONS) + '} and then some', False, "trailing text"),
    ("{'macro_risk_severity': 2, " + ", ".join(f"'{d}': 1" for d in DIMENSIONS[1:]) + ",}", True, None),
    ('{"macro_risk_severity": 2, "credit', False, "no JSON object"),
    ('{"macro_risk_severity": 2,, }', False, "invalid JSON"),
    ('[1, 2]', False, "no JSON object"),
    ("", False, "no JSON object"),
    ('{"macro_risk_severity": NaN}', False, "not a number"),
])
def test_parser_never_crashes_and_says_what_was_wrong(text, complete, problem):
    parsed = parse_generation(text)
    assert parsed.complete is complete
    if problem:
        assert any(problem in p for p in parsed.problems), parsed.problems


def test_answer_grammar_accepts_the_trained_layout_and_its_prefixes():
    from investment_risk.modeling.prompts import answer_grammar
    grammar = answer_grammar()
    target = format_target("Credit is tight.", SCORES)
    assert grammar.fullmatch(target)
    assert all(grammar.fullmatch(target[:i], partial=True) for i in range(len(target)))
    for bad in ('{"macro', "Reasoning\n{\"macro_risk_severity\": 11", "Reasoning\n{\"credit", "a\nb\n{"):
        assert grammar.fullmatch(bad, partial=True) is None, bad


def test_out_of_range_values_are_clipped_and_vector_fills_gaps():
    parsed = parse_generation('{"macro_risk_severity": 12, "credit_market_stress": -1}')
    assert parsed.scores == {"macro_risk_severity": 10.0, "credit_market_stress": 0.0}
    vector = parsed.vector()
    assert vector[:2] == [10.0, 0.0] and all(math.isnan(v) for v in vector[2:])


def test_a_parse_counts_what_it_cannot_read_and_never_raises():
    good = format_target("Reason.", [3.0] * 8)
    # A note in braces after the JSON hid the scores (the last object was taken, and it was no JSON)
    noted = parse_generation(good + "\nNote: {see above}")
    assert noted.scores == parse_generation(good).scores and noted.problems == ["trailing text after the JSON"]
    # Integers a float cannot hold, or Python will not read: a problem, not an OverflowError that ended --explain
    for digits in (400, 5000):
        parsed = parse_generation('R\n{"macro_risk_severity": ' + "9" * digits + "}")
        assert parsed.problems and not parsed.complete
