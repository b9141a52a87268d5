import json

import numpy as np
import pytest

from investment_risk.core.errors import ConfigError
from investment_risk.core.spec import DIMENSIONS, default_spec, load_spec, parse_spec

SPEC = default_spec()
M, C, S, V, P, Y, E, A = range(8)


def scores(**kw: float) -> np.ndarray:
    """A neutral row (BLUE under every rule) with the given dimensions overridden."""
    row = {d: 0.0 for d in DIMENSIONS}
    row.update({"evidence_quality": 6.0, "actionability": 6.0, "valuation_risk": 5.0})
    short = {"macro": "macro_risk_severity", "credit": "credit_market_stress", "sentiment": "market_sentiment_extremes",
             "valuation": "valuation_risk", "policy": "policy_regulatory_risk", "systemic": "systemic_risk",
             "evidence": "evidence_quality", "action": "actionability"}
    for key, value in kw.items():
        row[short[key]] = value
    return np.array([[row[d] for d in DIMENSIONS]], dtype=np.float32)


def tier(prefiltered: bool = False, **kw: float) -> str:
    tiers, _ = SPEC.assign_tiers(scores(**kw), np.array([prefiltered]))
    return tiers[0]


def test_dimensions_are_the_contract_order():
    assert DIMENSIONS == ("macro_risk_severity", "credit_market_stress", "market_sentiment_extremes", "valuation_risk",
                          "policy_regulatory_risk", "systemic_risk", "evidence_quality", "actionability")


@pytest.mark.parametrize("kw, expected", [
    # RED: macro >= 7 or credit >= 7 or systemic >= 8, with evidence >= 5 and actionability >= 5
    ({"macro": 7.0}, "RED"), ({"macro": 6.99}, "YELLOW"), ({"credit": 7.0}, "RED"), ({"credit": 6.99}, "YELLOW"),
    ({"systemic": 8.0}, "RED"), ({"systemic": 7.99}, "BLUE"),
    ({"macro": 9, "evidence": 5.0, "action": 5.0}, "RED"), ({"macro": 9, "evidence": 4.99}, "BLUE"),
    ({"macro": 9, "action": 4.99}, "BLUE"), ({"macro": 9, "action": 4.0}, "BLUE"),
    # YELLOW: macro or credit in [5, 7), or valuation in [7, 9), with evidence >= 5 and actionability >= 4
    ({"macro": 5.0}, "YELLOW"), ({"macro": 4.99}, "BLUE"), ({"credit": 5.0}, "YELLOW"), ({"credit": 4.99}, "BLUE"),
    ({"valuation": 7.0}, "YELLOW"), ({"valuation": 6.99}, "BLUE"), ({"valuation": 8.99}, "YELLOW"),
    ({"valuation": 9.0}, "BLUE"), ({"macro": 6, "action": 4.0}, "YELLOW"), ({"macro": 6, "action": 3.99}, "BLUE"),
    ({"macro": 6, "evidence": 4.99}, "BLUE"),
    # GREEN: sentiment >= 7, valuation <= 3, evidence >= 6, actionability >= 5
    ({"sentiment": 7.0, "valuation": 3.0}, "GREEN"), ({"sentiment": 6.99, "valuation": 3.0}, "BLUE"),
    ({"sentiment": 7.0, "valuation": 3.01}, "BLUE"), ({"sentiment": 7, "valuation": 1, "evidence": 5.99}, "BLUE"),
    ({"sentiment": 7, "valuation": 1, "action": 4.99}, "BLUE"),
    # NOISE by evidence: < 4
    ({"evidence": 3.99}, "NOISE"), ({"evidence": 4.0}, "BLUE"),
    # Precedence: RED > YELLOW > GREEN > NOISE(evidence) > BLUE
    ({"macro": 7, "valuation": 8}, "RED"), ({"macro": 6, "sentiment": 9, "valuation": 8}, "YELLOW"),
    ({"credit": 6, "sentiment": 8, "valuation": 2}, "YELLOW"), ({"macro": 9, "evidence": 3}, "NOISE"),
])
def test_tier_boundaries(kw, expected):
    assert tier(**kw) == expected


def test_labels_are_tiered_in_one_precision_whatever_their_file_holds():
    # evaluate reads labels as float32 (the readers normalise them), a scored batch as its file holds them (float64
    # from pandas): tiered in their own precision, a label of 6.99999999 was YELLOW in one and RED in the other,
    # and the two commands' tier confusions differed. float32 for both, as the scores are written.
    labels = scores().astype(np.float64)
    labels[0, 0] = 6.99999999
    assert SPEC.assign_tiers(labels)[0][0] == SPEC.assign_tiers(labels.astype(np.float32))[0][0] == "RED"


def test_prefilter_noise_beats_everything():
    assert tier(prefiltered=True, macro=10, credit=10, systemic=10) == "NOISE"
    assert tier(prefiltered=False, macro=10, credit=10, systemic=10) == "RED"


def test_signal_strength_weights():
    row = scores(macro=10, credit=0, sentiment=0, valuation=0, policy=0, systemic=0, evidence=10, action=10)
    assert SPEC.signal_strength(row)[0] == pytest.approx(2.5)
    full = np.full((1, 8), 10.0)
    assert SPEC.signal_strength(full)[0] == pytest.approx(10.0)
    row = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.float32)
    expected = 0.25 * 1 + 0.20 * 2 + 0.15 * 3 + 0.15 * 4 + 0.10 * 5 + 0.15 * 6
    assert SPEC.signal_strength(row)[0] == pytest.approx(expected, rel=1e-6)


def test_assign_tiers_is_vectorised_and_checks_shape():
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0, 10, (1000, 8)).astype(np.float32)
    tiers, strength = SPEC.assign_tiers(matrix)
    assert tiers.shape == (1000,) and strength.shape == (1000,) and strength.dtype == np.float32
    assert set(tiers) <= set(SPEC.tier_names)
    one_by_one = [SPEC.assign_tiers(matrix[i:i + 1])[0][0] for i in range(50)]
    assert list(tiers[:50]) == one_by_one
    with pytest.raises(ValueError):
        SPEC.assign_tiers(np.zeros((3, 7)))


@pytest.mark.parametrize("title, content, category", [
    ("This coin is going to the moon", "Get in now.", "fomo_speculation"),
    ("Markets", "Don't miss out on 100x gains!", "fomo_speculation"),
    ("Tip", "Buy this stock before it skyrockets.", "fomo_speculation"),
    ("Tip", "This is the next Bitcoin.", "fomo_speculation"),
    ("Tip", "Don\u2019t miss out, the crowd is piling in.", "fomo_speculation"),  # a typographic apostrophe
    ("Tip", "This could be the next Nvidia: 10x your money in a year.", "fomo_speculation"),
    ("Top 5 stocks to buy now", "Our picks: Contoso and Fabrikam.", "stock_picking_without_macro"),
    ("Weekly", "This post contains an affiliate link; use promo code X.", "affiliate_promo"),
    ("You won't believe this", "A story.", "clickbait"),
])
def test_prefilter_catches_each_category_with_a_reason(title, content, category):
    reason = SPEC.prefilter_reason(title, content)
    assert reason is not None and category in reason and "'" in reason


def test_prefilter_ignores_case():
    assert "clickbait" in SPEC.prefilter_reason("YOU WON'T BELIEVE THIS", "")
    assert SPEC.prefilter_reason("Title", "Escapes like \\d stay allowed: 100X gains") is not None


def test_stock_picking_with_macro_context_is_not_noise():
    assert SPEC.prefilter_reason("Top 5 stocks to buy now", "Picks for a recession as the Fed raises interest rates.") is None


@pytest.mark.parametrize("title, content", [
    ("Credit spreads widen", "High-yield spreads rose 40bp as defaults climbed, according to official data."),
    ("Fed holds rates", "The central bank kept its policy rate unchanged and signalled patience."),
    ("", None),
    # risk reporting in the words speculation also uses: the model must see these
    ("Prime brokers", "Leverage of 10x at prime brokers raises systemic risk."),
    ("Rates shock", "The Federal Reserve raised rates; yields skyrocketed and credit spreads blew out."),
    ("Defaults", "Corporate defaults rose 50x from their 2021 lows."),
    ("Bubble watch", "Investors chasing the next Nvidia should remember 2000."),
    ("Sentiment", "Don't miss this systemic signal: FOMO is driving retail flows to record margin debt."),
])
def test_prefilter_passes_ordinary_news(title, content):
    assert SPEC.prefilter_reason(title, content) is None


def test_the_column_prefilter_gives_each_row_what_the_row_one_does():
    # The whole-column pass (RE2 in Arrow) only picks the rows to match one by one: it must never miss one.
    import pyarrow as pa

    titles = ["This coin is going TO THE MOON", None, "Top 5 stocks to buy now", "Top 5 stocks to buy now", "",
              "Caf\u00e9 shocking", "Fed", "10x your money in a week", "Tip", "\u00c9lan strong buy", "Quiet day"]
    contents = ["Get in now.", "Don\u2019t miss out on this rally", "Our picks.", "Picks for a recession.", None,
                "Prices", "The central bank held.", "", "Buy this stock before it skyrockets.",
                "x" * 5000 + " limited-time offer", "Nothing to see."]
    rows = [SPEC.prefilter_reason(t, c) for t, c in zip(titles, contents)]
    assert sum(r is not None for r in rows) == 7  # every kind of hit and miss is in the list
    chunked = (pa.chunked_array([titles[:4], titles[4:]]), pa.chunked_array([contents[:6], contents[6:]]))
    for columns in ((pa.array(titles), pa.array(contents)), chunked):
        assert SPEC.prefilter_reasons(*columns) == rows
    assert SPEC.prefiltered(pa.table({"title": titles, "content": contents})).tolist() == [r is not None for r in rows]
    # Text as pandas and Polars write it (large_string), as a view, or a column of nulls: it crashed on all three
    for kind in (pa.large_string(), pa.string_view()):
        assert SPEC.prefilter_reasons(pa.array(titles, kind), pa.array(contents, kind)) == rows
    assert SPEC.prefilter_reasons(pa.nulls(2), pa.array(["You won't believe it", "A quiet day"])) == [
        "clickbait: 'you won't believe'", None]
    # "İ": Python lowercased it to "i" and a combining dot (a word boundary), Arrow to "i": the two disagreed
    odd = ["\u0130shocking news", "Best \u0130TOP 5 stocks", "K\u0130100x gains"]
    assert SPEC.prefilter_reasons(pa.array(odd), pa.array([""] * 3)) == [SPEC.prefilter_reason(t, "") for t in odd]


def _raw() -> dict:
    from importlib import resources
    return json.loads(resources.files("investment_risk.core").joinpath("filter_spec.json").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["signal_strength_weights"].update(macro_risk_severity=0.5), "sum to"),
    (lambda r: r["signal_strength_weights"].pop("actionability"), "exactly the dimensions"),
    (lambda r: r["tiers"][0]["any"].append({"dimension": "bogus", "gte": 1}), "unknown dimension"),
    (lambda r: r["tiers"][0]["any"].append({"dimension": "systemic_risk", "above": 1}), "unknown condition keys"),
    (lambda r: r["tiers"][0]["any"].append({"dimension": "systemic_risk"}), "has no bound"),
    (lambda r: r["prefilter"]["clickbait"]["patterns"].append("(unclosed"), "bad prefilter pattern"),
    (lambda r: r.pop("tiers"), "missing key"),
    (lambda r: r["prefilter"]["clickbait"]["patterns"].append("Shocking News"), "lowercase"),
    (lambda r: r["prefilter"]["clickbait"]["patterns"].append("(?<!not )shocking"), "not a pattern RE2 can run"),
    (lambda r: r["dimensions"].reverse(), "contract's eight"),
    (lambda r: r.update(score_range=[1, 9]), "contract's \\[0.0, 10.0\\]"),
])
def test_spec_validation(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        parse_spec(raw)


def test_spec_is_frozen_and_loadable_from_a_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_raw()))
    spec = load_spec(path)
    assert spec.dimensions == DIMENSIONS and spec.version == SPEC.version
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.version = "2"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(tmp_path / "missing.json")


def test_scores_are_clipped_to_the_score_range():
    spec = parse_spec(_raw())
    clipped = spec.clip(np.array([[-3.0, 0.5, 5.0, 9.5, 12.0, 0.0, 10.0, 4.0]]))
    assert clipped.tolist() == [[0.0, 0.5, 5.0, 9.5, 10.0, 0.0, 10.0, 4.0]]
    assert spec.in_range(0.0) and spec.in_range(10.0) and not spec.in_range(10.5)


def test_importing_the_package_parses_no_spec():
    """The spec is read and its patterns compiled on first use, not as a side effect of any import."""
    import subprocess
    import sys
    code = ("import investment_risk.cli, investment_risk.scoring.pipeline, investment_risk.datasets.readers\n"
            "from investment_risk.core.spec import default_spec\n"
            "print(default_spec.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
