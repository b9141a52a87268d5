"""The eight dimensions and the filter spec: signal-strength weights, tier rules and the noise prefilter.

The dimensions are the contract's (names and order everywhere), so they are a constant here; the packaged
`filter_spec.json` holds the thresholds and must name the same dimensions. It is read and its patterns compiled
on first use, not on import, into frozen, validated dataclasses. Tiers and signal strength are computed from
scores, never learned, by the vectorised `assign_tiers`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

DIMENSIONS: tuple[str, ...] = (
    "macro_risk_severity", "credit_market_stress", "market_sentiment_extremes", "valuation_risk",
    "policy_regulatory_risk", "systemic_risk", "evidence_quality", "actionability",
)
NUM_DIMENSIONS = len(DIMENSIONS)
SCORE_RANGE = (0.0, 10.0)  # the contract's: every score, label and histogram lives here

_BOUNDS = {"gte": np.greater_equal, "gt": np.greater, "lte": np.less_equal, "lt": np.less}


@dataclass(frozen=True)
class Condition:
    """`dimension` within the given bounds, e.g. gte=5, lt=7 is the half-open interval [5, 7)."""

    dimension: str
    bounds: tuple[tuple[str, float], ...]

    def mask(self, scores: np.ndarray, index: int) -> np.ndarray:
        column = scores[:, index]
        out = np.ones(len(column), dtype=bool)
        for op, value in self.bounds:
            out &= _BOUNDS[op](column, value)
        return out


@dataclass(frozen=True)
class TierRule:
    """A tier applies when every `all` condition holds and, if there are any, at least one `any` condition."""

    tier: str
    any_of: tuple[Condition, ...]
    all_of: tuple[Condition, ...]


@dataclass(frozen=True)
class PrefilterCategory:
    name: str
    pattern: re.Pattern[str]  # the category's patterns as one alternation: one pass over the text
    unless: re.Pattern[str] | None

    def match(self, text: str) -> str | None:
        """The earliest hit (as a reason), unless an `unless` pattern also appears."""
        hit = self.pattern.search(text)
        if hit is None or (self.unless is not None and self.unless.search(text)):
            return None
        return f"{self.name}: '{hit.group(0)}'"


def _alternation(patterns: list[str]) -> re.Pattern[str]:
    """Patterns are matched against lowercased text (twice as fast as re.I), so they must be lowercase. They must
    also be RE2's (no look-around, no back-reference): RE2, through Arrow, scans whole columns for the rows that
    could match (`prefilter_reasons`), and ASCII classes (`\\b`, `\\d`, `\\w`) keep both engines' meaning the same."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for p in patterns:
        re.compile(p)  # a bad pattern fails here, by itself, with a message that names it
        if any(c.isupper() for c in re.sub(r"\\.", "", p)):
            raise re.error(f"write prefilter patterns in lowercase (they match lowercased text): {p!r}", pattern=p)
        try:
            pc.match_substring_regex(pa.array([""]), p)
        except pa.ArrowInvalid as exc:
            raise re.error(f"not a pattern RE2 can run ({exc}): {p!r}", pattern=p) from None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.ASCII)


@dataclass(frozen=True)
class FilterSpec:
    name: str
    version: str
    dimensions: tuple[str, ...]
    score_range: tuple[float, float]
    weights: tuple[float, ...]
    rules: tuple[TierRule, ...]
    prefilter_tier: str
    default_tier: str
    prefilter: tuple[PrefilterCategory, ...]
    any_prefilter: re.Pattern[str] | None = None  # every category's patterns: most articles need only this pass

    @property
    def tier_names(self) -> tuple[str, ...]:
        names = [self.prefilter_tier] + [r.tier for r in self.rules] + [self.default_tier]
        return tuple(dict.fromkeys(names))

    def clip(self, scores: np.ndarray) -> np.ndarray:
        """Scores held to the spec's range ([0, 10]): a regressor can step outside it."""
        low, high = self.score_range
        return np.clip(scores, low, high)

    def in_range(self, value: float) -> bool:
        low, high = self.score_range
        return low <= value <= high

    def signal_strength(self, scores: np.ndarray) -> np.ndarray:
        """Weighted sum of the scores, shape (n,), float32."""
        return (np.asarray(scores, dtype=np.float32) @ np.asarray(self.weights, dtype=np.float32)).astype(np.float32)

    def assign_tiers(self, scores: np.ndarray, prefiltered: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tiers (object array of str) and signal strength for an (n, 8) score matrix.

        Precedence: prefilter hit, then the rules in file order, then the default tier.
        """
        # float32, as scores are written and labels are read (a float64 label of 6.99999999 is 7.0 in every
        # command alike: evaluate's labels come float32 from the readers, a scored batch's as its file holds them)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 2 or scores.shape[1] != len(self.dimensions):
            raise ValueError(f"scores must have shape (n, {len(self.dimensions)}), got {scores.shape}")
        n = scores.shape[0]
        conditions, choices = [], []
        if prefiltered is not None:
            conditions.append(np.asarray(prefiltered, dtype=bool))
            choices.append(self.prefilter_tier)
        index = {d: i for i, d in enumerate(self.dimensions)}
        for rule in self.rules:
            mask = np.ones(n, dtype=bool)
            for cond in rule.all_of:
                mask &= cond.mask(scores, index[cond.dimension])
            if rule.any_of:
                any_mask = np.zeros(n, dtype=bool)
                for cond in rule.any_of:
                    any_mask |= cond.mask(scores, index[cond.dimension])
                mask &= any_mask
            conditions.append(mask)
            choices.append(rule.tier)
        tiers = np.select(conditions, choices, default=self.default_tier) if conditions else np.full(n, self.default_tier)
        return tiers.astype(object), self.signal_strength(scores)

    def prefilter_reason(self, title: str | None, content: str | None) -> str | None:
        """Why an article is noise before any model sees it ('category: matched text'), or None."""
        # A typographic apostrophe counts as one; "İ" as "I" (Python lowercases it to "i" and a combining dot,
        # Arrow to "i": the column scan must see what this sees)
        text = f"{title or ''}\n{content or ''}".replace("\u0130", "I").lower().replace("\u2019", "'")
        if self.any_prefilter is not None and not self.any_prefilter.search(text):
            return None
        reasons = [r for r in (c.match(text) for c in self.prefilter) if r]
        return "; ".join(reasons) if reasons else None

    def prefilter_reasons(self, titles: Any, contents: Any) -> list[str | None]:
        """`prefilter_reason` of every row of two Arrow string columns. RE2, in Arrow's C++ over the whole column,
        finds the few rows any category could match (Python's re took 2 ms for a 4,000-character article, longer
        than a GPU takes to score it); only those are matched one by one for their reasons."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(titles)
        if self.any_prefilter is None or n == 0:
            return [None] * n
        # Plain strings, whatever the file held (large_string from pandas or Polars, a view, an all-null column)
        titles, contents = (pc.fill_null(column.cast(pa.string()), "") for column in (titles, contents))
        text = pc.binary_join_element_wise(titles, contents, "\n")
        text = pc.replace_substring(pc.utf8_lower(pc.replace_substring(text, "\u0130", "I")), "\u2019", "'")
        candidates = pc.match_substring_regex(text, self.any_prefilter.pattern)
        reasons: list[str | None] = [None] * n
        for i in np.flatnonzero(pc.fill_null(candidates, False).to_numpy(zero_copy_only=False)):
            row = int(i)
            reasons[row] = self.prefilter_reason(titles[row].as_py(), contents[row].as_py())
        return reasons

    def prefiltered(self, table: Any) -> np.ndarray:
        """Per row of a table with title and content columns: flagged by the prefilter (never scored)."""
        reasons = self.prefilter_reasons(table.column("title"), table.column("content"))
        return np.array([reason is not None for reason in reasons], dtype=bool)


def _condition(raw: dict[str, Any], dimensions: tuple[str, ...], where: str) -> Condition:
    unknown = set(raw) - {"dimension", *_BOUNDS}
    if unknown:
        raise ConfigError(f"{where}: unknown condition keys {sorted(unknown)}")
    dimension = raw.get("dimension")
    if dimension not in dimensions:
        raise ConfigError(f"{where}: unknown dimension {dimension!r}")
    bounds = tuple((op, float(raw[op])) for op in _BOUNDS if op in raw)
    if not bounds:
        raise ConfigError(f"{where}: condition on {dimension} has no bound (gte/gt/lte/lt)")
    return Condition(dimension, bounds)


def parse_spec(raw: dict[str, Any], source: str = "filter spec") -> FilterSpec:
    try:
        dimensions = tuple(raw["dimensions"])
        if dimensions != DIMENSIONS:
            raise ConfigError(f"{source}: dimensions must be the contract's eight, in order: {', '.join(DIMENSIONS)}")
        weights_raw = raw["signal_strength_weights"]
        if set(weights_raw) != set(dimensions):
            raise ConfigError(f"{source}: signal_strength_weights must name exactly the dimensions")
        weights = tuple(float(weights_raw[d]) for d in dimensions)
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ConfigError(f"{source}: signal_strength_weights sum to {sum(weights)}, not 1")
        rules = []
        for i, rule in enumerate(raw["tiers"]):
            where = f"{source}: tiers[{i}]"
            if not rule.get("any") and not rule.get("all"):
                raise ConfigError(f"{where}: a rule needs 'any' or 'all' conditions")
            rules.append(TierRule(
                tier=str(rule["tier"]),
                any_of=tuple(_condition(c, dimensions, where) for c in rule.get("any", [])),
                all_of=tuple(_condition(c, dimensions, where) for c in rule.get("all", [])),
            ))
        prefilter = tuple(
            PrefilterCategory(
                name=name, pattern=_alternation(body["patterns"]),
                unless=_alternation(body["unless"]) if body.get("unless") else None,
            )
            for name, body in raw["prefilter"].items()
        )
        everything = [p for body in raw["prefilter"].values() for p in body["patterns"]]
        low, high = (float(x) for x in raw["score_range"])
        if (low, high) != SCORE_RANGE:
            raise ConfigError(f"{source}: score_range must be the contract's {list(SCORE_RANGE)}, not {[low, high]}")
        return FilterSpec(
            name=str(raw["name"]), version=str(raw["version"]), dimensions=dimensions, score_range=(low, high),
            weights=weights, rules=tuple(rules), prefilter_tier=str(raw["prefilter_tier"]),
            default_tier=str(raw["default_tier"]), prefilter=prefilter,
            any_prefilter=_alternation(everything) if everything else None,
        )
    except KeyError as exc:
        raise ConfigError(f"{source}: missing key {exc}") from None
    except re.error as exc:
        raise ConfigError(f"{source}: bad prefilter pattern {exc.pattern!r}: {exc}") from None


def load_spec(path: str | Path | None = None) -> FilterSpec:
    """The packaged spec, or one from `path`."""
    if path is None:
        return default_spec()
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read filter spec: {exc}") from None
    return parse_spec(raw, str(path))


@cache
def default_spec() -> FilterSpec:
    """The packaged spec, parsed once, on first use."""
    raw = json.loads(resources.files(__package__).joinpath("filter_spec.json").read_text())
    return parse_spec(raw, "filter_spec.json")
