"""`make bench`'s cheap sections, checked in `make test` (the whole bench runs for most of an hour): what they
measure must be what the scorer does."""

import sys
from pathlib import Path

import pytest

from investment_risk.datasets.synth import SynthConfig, write_synthetic
from investment_risk.modeling.predict import token_budget_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_score():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cpu_score
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return cpu_score


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "articles.parquet"
    write_synthetic(SynthConfig(rows=200, seed=3), path)
    return path


def test_token_shares_are_of_the_cpu_scorers_batches_at_both_lengths(cpu_score, articles):
    shares = cpu_score.token_shares(articles)
    by_length = shares["real_token_share_by_length"]
    assert by_length["token_budget"] == token_budget_for("cpu")  # not the GPU's 16k
    for length in ("128", "512"):
        entry = by_length[length]
        assert 0 < entry["real_token_share_padded"] <= entry["real_token_share_bucketed"] <= 1
    assert shares["real_token_share_bucketed"] == by_length["512"]["real_token_share_bucketed"]
    assert by_length["128"]["mean_tokens"] < by_length["512"]["mean_tokens"]


def test_tokenizer_speed_separates_the_cut_from_the_tokenizers_call(cpu_score, articles):
    speed = cpu_score.tokenizer_speed(articles)
    for figures in speed.values():
        assert set(figures) == {"articles_per_second", "tokens_per_second", "articles_per_second_whole_text",
                                "articles_per_second_tokenizer_call"}
        assert all(value > 0 for value in figures.values())
