"""Instruction mode's text side: the prompt, the target (reasoning + JSON scores) and a tolerant parser.

The model reads an instruction and the article and writes a reasoning paragraph followed by a JSON object with the
eight scores. Only the article is ever truncated: the instruction and the target always fit whole.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.spec import DIMENSIONS
from .tokens import CHARS_PER_TOKEN_BOUND, TEXT

INSTRUCTION = (
    "You assess financial news for capital-preservation investors. Score the article on eight dimensions, each from "
    "0 (none) to 10 (extreme):\n"
    "- macro_risk_severity: how severe the macroeconomic risk it describes is (growth, recession, unemployment)\n"
    "- credit_market_stress: stress in credit markets (spreads, defaults, refinancing, funding)\n"
    "- market_sentiment_extremes: how extreme investor sentiment is (euphoria or panic)\n"
    "- valuation_risk: how stretched asset valuations are\n"
    "- policy_regulatory_risk: risk from central bank, fiscal or regulatory action\n"
    "- systemic_risk: risk of contagion through the financial system\n"
    "- evidence_quality: how well the article's claims are supported by data and named sources\n"
    "- actionability: how clearly it tells an investor what to do\n"
    "First write one paragraph of reasoning, then a JSON object with exactly these eight keys and numeric values.\n"
)
ARTICLE_HEADER = "\n### Article\n"
RESPONSE_HEADER = "\n### Assessment\n"


def format_target(reasoning: str, scores: dict[str, float] | list[float]) -> str:
    """The text the model learns to write: reasoning, a newline, then the scores as JSON in dimension order."""
    values = scores if isinstance(scores, dict) else dict(zip(DIMENSIONS, scores))
    payload = {d: round(float(values[d]), 1) for d in DIMENSIONS}
    return f"{reasoning.strip()}\n{json.dumps(payload)}"


@dataclass(frozen=True)
class PromptParts:
    """Token ids of the prompt (instruction + possibly truncated article) and the target; lengths always fit."""

    prompt_ids: list[int]
    target_ids: list[int]
    article_truncated: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def labels(self) -> list[int]:
        """Prompt positions are -100 (ignored by the loss); the target is learned."""
        return [-100] * len(self.prompt_ids) + self.target_ids


class PromptTooLong(ValueError):
    """The instruction and the target alone exceed the length budget."""


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """The target's token ids, EOS-terminated so generation learns to stop."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def build_prompt(tokenizer: Any, title: str | None, content: str | None, max_length: int,
                 target: str | None = None, target_reserve: int = 0) -> PromptParts:
    """Instruction + article (+ target), cutting only the article so the whole fits in max_length tokens.

    With `target_reserve`, the article's room is the same for every row whatever its target's length, so a prompt
    built for scoring (no target, max_length - target_reserve) is token for token the prompt seen in training.
    """
    head = tokenizer(INSTRUCTION + ARTICLE_HEADER, add_special_tokens=False)["input_ids"]
    tail = tokenizer(RESPONSE_HEADER, add_special_tokens=False)["input_ids"]
    ids = target_ids(tokenizer, target) if target is not None else []
    if target_reserve and len(ids) > target_reserve:
        raise PromptTooLong(f"target ({len(ids)} tokens) is longer than the reserve of {target_reserve} tokens")
    reserved = max(target_reserve, len(ids))
    room = max_length - len(head) - len(tail) - reserved
    if room < 1:
        raise PromptTooLong(f"instruction ({len(head) + len(tail)} tokens) and target ({reserved} tokens) leave "
                            f"no room for the article within --max-length {max_length}")
    text = f"{title or ''}\n\n{content or ''}"
    # Tokenise only the text that can fit (a token rarely spans over 16 characters); all of it if that runs short.
    article = tokenizer(text[: room * CHARS_PER_TOKEN_BOUND], add_special_tokens=False, **TEXT)["input_ids"]
    if len(article) < room and len(text) > room * CHARS_PER_TOKEN_BOUND:
        article = tokenizer(text, add_special_tokens=False, **TEXT)["input_ids"]
    truncated = len(article) > room
    return PromptParts(head + article[:room] + tail, ids, truncated)


def prompt_tokens(tokenizer: Any, titles: list[str | None], contents: list[str | None], max_length: int) -> list[np.ndarray]:
    """Prompt-only token ids (instruction + article, no target): what the score head and generation read."""
    return [np.asarray(build_prompt(tokenizer, t, c, max_length).prompt_ids, dtype=np.int64)
            for t, c in zip(titles, contents)]


@dataclass
class ParsedScores:
    """What a generation yielded: scores for the dimensions found, and what was wrong, if anything."""

    scores: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reasoning: str = ""

    @property
    def complete(self) -> bool:
        return len(self.scores) == len(DIMENSIONS) and not self.problems

    def vector(self, fill: float = math.nan) -> list[float]:
        return [self.scores.get(d, fill) for d in DIMENSIONS]


_OBJECT = re.compile(r"\{[^{}]*\}", re.S)


def parse_generation(text: str) -> ParsedScores:
    """Never raises. Takes the last JSON object in the text that holds a score key (else the last); missing keys, non-numbers, values outside [0, 10] and
    unparseable JSON are reported in `problems` (out-of-range values are clipped and kept)."""
    result = ParsedScores()
    candidates = list(_OBJECT.finditer(text or ""))
    if not candidates:
        result.problems.append("no JSON object")
        result.reasoning = (text or "").strip()
        return result
    # The last object that reads as scores: a note in braces after the JSON must not hide it.
    loaded = [(match, _load(match.group(0))) for match in candidates]
    match, obj = next(((m, o) for m, o in reversed(loaded) if isinstance(o, dict) and set(o) & set(DIMENSIONS)),
                      loaded[-1])
    result.reasoning = text[:match.start()].strip()
    if isinstance(obj, str):
        result.problems.append(obj)
        return result
    if not isinstance(obj, dict):
        result.problems.append("JSON is not an object")
        return result
    for dim in DIMENSIONS:
        if dim not in obj:
            result.problems.append(f"missing {dim}")
            continue
        value = obj[dim]
        try:  # a 400-digit integer overflows a float
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not math.isfinite(number):
            result.problems.append(f"{dim} is not a number")
            continue
        if not 0.0 <= number <= 10.0:
            result.problems.append(f"{dim} = {value} is outside [0, 10]")
        result.scores[dim] = min(max(number, 0.0), 10.0)
    extra = sorted(set(obj) - set(DIMENSIONS))
    if extra:
        result.problems.append(f"unexpected keys {', '.join(map(str, extra))}")
    trailing = text[match.end():].strip()
    if trailing:
        result.problems.append("trailing text after the JSON")
    return result


def _load(raw: str) -> Any:
    """A JSON object's text as Python, or a string saying why it is not JSON."""
    for attempt in (raw, re.sub(r",\s*}", "}", raw.replace("'", '"'))):  # common slips: single quotes, trailing commas
        try:
            return json.loads(attempt)
        except json.JSONDecodeError as exc:
            why = f"invalid JSON ({exc.msg})"
        except ValueError:  # an integer past Python's 4,300-digit limit
            why = "invalid JSON (a number too long to read)"
    return why


# What a well-formed answer looks like: one paragraph with no brace or newline, a newline, then the eight keys in
# dimension order with values 0-10 (at most one decimal) -- exactly the layout format_target teaches.
_NUMBER = r"(?:10(?:\.0)?|[0-9](?:\.[0-9])?)"
ANSWER_PATTERN = r"[^{\n]*\n\{" + ", ".join(f'"{d}": {_NUMBER}' for d in DIMENSIONS) + r"\}"


def answer_grammar() -> Any:
    """The compiled answer pattern; `regex` (a transformers dependency) can tell a valid prefix from a dead end."""
    import regex

    return regex.compile(ANSWER_PATTERN)
