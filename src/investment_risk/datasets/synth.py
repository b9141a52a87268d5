"""A deterministic generator of labelled articles for tests, the demo and benchmarks.

Latent scores per dimension decide which phrases an article carries: each dimension's lede sentence comes from
one of five severity levels, with a clause that tells the upper from the lower half of the level, and higher
scores add more supporting sentences in the body. Labels are the latent scores plus Gaussian noise, so the
mapping is learnable but not exact. Noise articles (FOMO, stock tips, affiliate, clickbait) carry the phrases
the prefilter looks for; a few exact and near duplicates exercise de-duplication.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..core.errors import ConfigError
from ..core.logs import Progress
from ..core.spec import DIMENSIONS, default_spec
from .readers import JSONL_SUFFIXES, PARQUET_SUFFIXES, is_jsonl

LEVEL_WORDS = ("very low", "low", "moderate", "high", "very high")

# Per dimension: sentence subjects (unique to the dimension), then one predicate per severity level (0-2, 2-4,
# 4-6, 6-8, 8-10). Short on purpose: the whole lede fits in 128 tokens, as a real wire lede would.
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "macro_risk_severity": (
        ("Growth", "The economy", "Macro data"),
        ("looks robust", "is softening slightly", "is slowing clearly", "signals a likely recession",
         "is collapsing into deep recession"),
    ),
    "credit_market_stress": (
        ("Credit markets", "Bond spreads", "Lending conditions"),
        ("are calm", "are widening slightly", "are tightening noticeably", "are under severe strain",
         "are freezing up as defaults surge"),
    ),
    "market_sentiment_extremes": (
        ("Sentiment", "Positioning", "Market mood"),
        ("is balanced", "is leaning one-sided", "is getting stretched", "is at an extreme", "is at a historic extreme"),
    ),
    "valuation_risk": (
        ("Valuations", "Multiples", "Asset prices"),
        ("are cheap", "are near average", "are somewhat rich", "are stretched", "are at bubble levels"),
    ),
    "policy_regulatory_risk": (
        ("Policy risk", "Regulatory risk", "Policy uncertainty"),
        ("is stable", "is modest", "is rising", "is high", "is extreme amid emergency measures"),
    ),
    "systemic_risk": (
        ("Systemic risk", "Contagion risk", "Financial stability risk"),
        ("is negligible", "is contained", "is building", "is elevated", "is acute"),
    ),
    "evidence_quality": (
        ("Reporting", "Sourcing", "The evidence"),
        ("is rumour only", "is mostly opinion", "mixes data and opinion", "cites official data",
         "is comprehensive and transparent"),
    ),
    "actionability": (
        ("For investors, the piece", "Practically, the article", "For portfolios, the report"),
        ("offers nothing to act on", "offers vague ideas", "suggests broad positioning", "sets clear steps",
         "gives specific hedging actions"),
    ),
}
UPPER_HALF = ("and worsening", "and deteriorating")
LOWER_HALF = ("but steady", "for now")
# For the two quality dimensions a higher score is better, so the half-level clauses read differently.
UPPER_HALF_QUALITY = ("and unusually thorough", "in detail")
LOWER_HALF_QUALITY = ("with gaps", "with caveats")

HEADLINES = {
    "macro_risk_severity": ("Growth worries mount as data weaken", "Economy at a crossroads", "Recession signals flash"),
    "credit_market_stress": ("Credit spreads in focus", "Bond market strains test borrowers", "Refinancing wall looms"),
    "market_sentiment_extremes": ("Sentiment swings to extremes", "Investors pile in", "Fear grips trading floors"),
    "valuation_risk": ("Are stocks too expensive?", "Valuations under the microscope", "Multiples stretch higher"),
    "policy_regulatory_risk": ("Regulators weigh new rules", "Policy shift rattles markets", "Central bank in the spotlight"),
    "systemic_risk": ("Contagion fears spread", "Banks under pressure", "Financial stability in question"),
}

FILLER = (
    "Trading volumes were {adj} compared with the previous session.",
    "{company} shares moved {pct}% as traders digested the news.",
    "Analysts at {company} said they would revisit their forecasts after the quarter.",
    "The dollar was little changed against a basket of major currencies.",
    "Commodity prices drifted, with oil trading near ${price} a barrel.",
    "Several market participants said they were waiting for more information before committing capital.",
    "Regional indexes closed mixed, with technology and utilities leading.",
    "A spokesperson for {company} declined to comment on the matter.",
    "The figures will be revised next month as more complete surveys arrive.",
    "Strategists noted that seasonal patterns often distort data at this time of year.",
    "Earnings season continues next week with reports from {company} and {company2}.",
    "Historical comparisons are imperfect because the structure of the economy has changed.",
    "Long-dated yields were broadly steady through the afternoon.",
    "Some fund managers said they had rebalanced portfolios toward quality.",
    "The meeting minutes will be published in three weeks.",
)
EVIDENCE_SENTENCES = (
    "Official figures show the measure at {pct}% in the latest quarter, according to the statistics office.",
    "Data from the central bank's survey of {n} lenders support the assessment.",
    "The study, led by a named team at {company}, covers {n} firms over ten years.",
)
COMPANIES = ("Northwind", "Contoso", "Fabrikam", "Litware", "Adventure Works", "Tailspin", "Woodgrove", "Proseware",
             "Alpine Capital", "Blue Yonder", "Coho Holdings", "Humongous Insurance", "Lamna", "Margie's Finance")
ADJECTIVES = ("light", "heavy", "average", "subdued", "brisk")
SOURCES = ("Harbor Street Journal", "Global Markets Wire", "Capital Preservation Weekly", "The Macro Ledger",
           "Finance Daily Brief", "Market Pulse Blog")

NOISE_TITLES = (
    "This stock is going to the moon - don't miss out!",
    "Top 5 stocks to buy now before it's too late",
    "You won't believe what this penny stock did today",
    "Get rich with the next Bitcoin: 100x gains ahead",
    "Sponsored post: use promo code SAVE20 for our trading course",
    "This one weird trick Wall Street doesn't want you to know",
)
NOISE_SENTENCES = (
    "Our analysts see 100x returns for early buyers of {company}.",
    "Buy this stock before it skyrockets, with a price target of ${price}.",
    "Don't miss out on the next big winner, the crowd is piling in.",
    "Sign up now and get a free trial of our premium picks newsletter.",
    "Use promo code RICH50 at checkout, this is a limited-time offer.",
    "This post contains affiliate links and we may earn a commission.",
    "My top picks for the week are {company} and {company2}, a strong buy.",
    "What happens next will shock you.",
)


@dataclass(frozen=True)
class SynthConfig:
    rows: int
    seed: int = 0
    label_noise: float = 0.5
    noise_share: float = 0.06
    duplicate_share: float = 0.01
    near_duplicate_share: float = 0.01
    long_tail_share: float = 0.03


def latent_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Correlated latent scores, shape (n, 8), in DIMENSIONS order."""
    clip = lambda x: np.clip(x, 0.0, 10.0)  # noqa: E731
    regime = rng.beta(2.0, 2.5, n) * 10
    macro = clip(regime + rng.normal(0, 1.2, n))
    credit = clip(0.7 * regime + rng.normal(0.5, 1.8, n))
    systemic = clip(0.6 * np.maximum(macro, credit) + rng.normal(-0.3, 1.6, n))
    sentiment = rng.uniform(0, 10, n)
    valuation = rng.beta(2.0, 2.0, n) * 10
    policy = rng.beta(1.8, 2.5, n) * 10
    evidence = clip(rng.normal(6.0, 2.2, n))
    action = clip(0.45 * evidence + 0.35 * np.maximum(macro, credit) + rng.normal(0.3, 1.4, n))
    return np.stack([macro, credit, sentiment, valuation, policy, systemic, evidence, action], axis=1)


def _fill(rng: np.random.Generator, template: str) -> str:
    c1, c2 = rng.choice(len(COMPANIES), 2, replace=False)
    return template.format(company=COMPANIES[c1], company2=COMPANIES[c2], pct=round(float(rng.uniform(-4, 6)), 1),
                           price=int(rng.integers(20, 400)), n=int(rng.integers(50, 5000)),
                           adj=ADJECTIVES[int(rng.integers(len(ADJECTIVES)))])


def dimension_sentence(rng: np.random.Generator, dim: str, score: float) -> str:
    subjects, predicates = PHRASES[dim]
    level = min(int(score // 2), 4)
    upper = (score % 2) >= 1.0 or score >= 10
    quality = dim in ("evidence_quality", "actionability")
    clauses = (UPPER_HALF_QUALITY if upper else LOWER_HALF_QUALITY) if quality else (UPPER_HALF if upper else LOWER_HALF)
    subject = subjects[int(rng.integers(len(subjects)))]
    return f"{subject} {predicates[level]} {clauses[int(rng.integers(len(clauses)))]}."


def _target_words(rng: np.random.Generator, long_tail_share: float) -> int:
    if rng.random() < long_tail_share:
        return int(rng.uniform(3000, 5500))
    return int(np.clip(rng.lognormal(np.log(400), 0.5), 120, 2400))


def _article(rng: np.random.Generator, scores: np.ndarray, long_tail_share: float) -> tuple[str, str]:
    risk_dims = list(HEADLINES)
    top = risk_dims[int(np.argmax([scores[DIMENSIONS.index(d)] for d in risk_dims]))]
    title = HEADLINES[top][int(rng.integers(3))]
    lede = [dimension_sentence(rng, d, float(s)) for d, s in zip(DIMENSIONS, scores)]
    rng.shuffle(lede)
    body: list[str] = []
    # Higher risk scores bring more supporting sentences; better evidence brings data citations.
    for d, s in zip(DIMENSIONS[:6], scores[:6]):
        body += [dimension_sentence(rng, d, float(s)) for _ in range(int(rng.poisson(s / 4)))]
    body += [_fill(rng, EVIDENCE_SENTENCES[int(rng.integers(3))]) for _ in range(int(rng.poisson(scores[6] / 3)))]
    target = _target_words(rng, long_tail_share)
    words = sum(len(s.split()) for s in lede + body)
    while words < target:
        sentence = _fill(rng, FILLER[int(rng.integers(len(FILLER)))])
        body.append(sentence)
        words += len(sentence.split())
    rng.shuffle(body)
    paragraphs = [" ".join(lede)] + [" ".join(body[i:i + 6]) for i in range(0, len(body), 6)]
    return title, "\n\n".join(paragraphs)


def _noise_article(rng: np.random.Generator) -> tuple[str, str]:
    title = NOISE_TITLES[int(rng.integers(len(NOISE_TITLES)))]
    n = int(rng.integers(4, 12))
    body = [_fill(rng, NOISE_SENTENCES[int(rng.integers(len(NOISE_SENTENCES)))]) for _ in range(n)]
    return title, " ".join(body)


def reasoning_for(scores: np.ndarray) -> str:
    """A short paragraph consistent with the (noisy) labels, as an oracle would write it."""
    spec = default_spec()
    tiers, strength = spec.assign_tiers(scores[None, :])
    parts = []
    for dim, score in zip(DIMENSIONS, scores):
        level = LEVEL_WORDS[min(int(score // 2), 4)]
        subject, predicate = PHRASES[dim][0][0], PHRASES[dim][1][min(int(score // 2), 4)]
        subject = subject if subject.startswith(("For ", "In ")) else subject[0].lower() + subject[1:]
        parts.append(f"{dim.replace('_', ' ').capitalize()} is {level} ({score:.1f}): {subject} {predicate}.")
    return " ".join(parts) + f" Overall this reads as a {tiers[0]} signal with strength {strength[0]:.1f}."


def _near_duplicate(rng: np.random.Generator, text: str) -> str:
    """Same text up to case, whitespace and punctuation: what republished wire copy looks like."""
    words = text.split(" ")
    for i in rng.choice(len(words), size=min(5, len(words)), replace=False):
        words[int(i)] = words[int(i)].upper()
    return "  ".join(words).replace(",", " ,") + " "


def generate(config: SynthConfig) -> pa.Table:
    """`config.rows` labelled articles, deterministic in `config.seed`."""
    if config.rows <= 0:
        raise ValueError("rows must be positive")
    rng = np.random.default_rng(config.seed)
    latent = latent_scores(rng, config.rows)
    labels = np.clip(latent + rng.normal(0, config.label_noise, latent.shape), 0, 10).round(1)
    kinds = rng.choice(["article", "noise", "duplicate", "near_duplicate"], size=config.rows, p=[
        1 - config.noise_share - config.duplicate_share - config.near_duplicate_share,
        config.noise_share, config.duplicate_share, config.near_duplicate_share])
    kinds[0] = "article"  # a duplicate needs something before it to copy
    rows: dict[str, list] = {k: [] for k in ("id", "title", "content", "source", "url", "published_at", "language",
                                             "reasoning", "kind")}
    start = dt.date(2024, 1, 1)
    with Progress(config.rows, "synth") as progress:  # a million rows take half an hour
        for i in range(config.rows):
            kind = str(kinds[i])
            if kind == "noise":
                labels[i] = np.clip([rng.uniform(0, 3), rng.uniform(0, 2), rng.uniform(6, 10), rng.uniform(3, 8),
                                     rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0, 3), rng.uniform(0, 3)],
                                    0, 10).round(1)
                title, content = _noise_article(rng)
            elif kind in ("duplicate", "near_duplicate"):
                j = int(rng.integers(i))
                labels[i] = labels[j]
                title, content = rows["title"][j], rows["content"][j]
                if kind == "near_duplicate":
                    content = _near_duplicate(rng, content)
            else:
                title, content = _article(rng, latent[i], config.long_tail_share)
            id_ = f"syn-{config.seed}-{i:06d}"
            rows["id"].append(id_)
            rows["title"].append(title)
            rows["content"].append(content)
            rows["source"].append(SOURCES[int(rng.integers(len(SOURCES)))])
            rows["url"].append(f"https://news.example/{id_}")
            rows["published_at"].append((start + dt.timedelta(days=int(rng.integers(0, 700)))).isoformat())
            rows["language"].append("en")
            rows["reasoning"].append(reasoning_for(labels[i]))
            rows["kind"].append(kind)
            if i % 1000 == 999:
                progress.update(1000)
        progress.update(config.rows - progress.done)
    columns = {k: pa.array(v, type=pa.string()) for k, v in rows.items() if k != "kind"}
    for d, dim in enumerate(DIMENSIONS):
        columns[dim] = pa.array(labels[:, d].astype(np.float32))
    columns["kind"] = pa.array(rows["kind"], type=pa.string())
    return pa.table(columns)


def write_synthetic(config: SynthConfig, out: str | Path) -> Path:
    """Generate and write atomically, in the format the readers take from the name: Parquet, or JSON lines."""
    from ..core.atomic import atomic_path, write_parquet_atomic

    out = Path(out)
    # not .json: a folder or glob reads a .json file as metadata, so the rows written would be skipped there
    lines = [suffix for suffix in JSONL_SUFFIXES if suffix != ".json"]
    if out.suffix.lower() not in PARQUET_SUFFIXES + tuple(lines):
        raise ConfigError(f"--out {out}: name a Parquet ({', '.join(PARQUET_SUFFIXES)}) or JSON lines "
                          f"({', '.join(lines)}) file")
    table = generate(config)
    if is_jsonl(out):
        with atomic_path(out) as tmp, tmp.open("w") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row) + "\n")
        return out
    return write_parquet_atomic(table, out)
