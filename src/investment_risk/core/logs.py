"""Structured logging, configured once at the CLI edge (structlog's production recipe).

JSON lines on stdout when it is not a terminal, readable console lines when it is. `run_id`, `stage` and
`shard` are bound with contextvars so every event of a stage carries them. Secrets never reach a log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

REDACTED = "***"

# Keys whose values are secret whatever they look like.
# "hf_token" is a secret; "tokens" or "tokens_per_second" is a count and stays.
_SECRET_KEY = re.compile(
    r"((^|[_-])(token|api[_-]?key|authori[sz]ation|credentials?|private[_-]?key|passwd)$)|password|secret", re.I
)
# Values that look like credentials wherever they appear (inside longer strings too).
# A prefix counts at the start of a word only: "investment-risk-nightly-29420730" holds "sk-" and is a Job name,
# "graph_hf_exportedweightsv2long" holds "hf_" and is a file name.
_SECRET_VALUE = re.compile(
    r"((?<![A-Za-z0-9_])hf_[A-Za-z0-9]{16,}"  # Hugging Face tokens
    r"|(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|(?<![A-Za-z0-9_])sk-[A-Za-z0-9_-]{16,}"  # OpenAI-style keys
    r"|(?<![A-Za-z0-9_])AKIA[0-9A-Z]{16}"  # AWS access key ids
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs (Kubernetes service-account tokens)
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}"
    r"|(?<=[?&]token=)[^&\s]+|(?<=[?&]key=)[^&\s]+"
    # A URL's user:password, the user empty or an e-mail address, the password up to the host's "@" (it may hold
    # an "@", "?" or "#" itself; a host:port before a query's "?" is no password),
    # after "://" or after "scheme:/" (what pathlib makes of a URL given where a path goes)
    r"|(?:(?<=://)|(?<=[A-Za-z0-9]:/))[^/\s:]*:(?!\d*[?#])[^/\s]*(?=@))"
)


# A secret-named key given a value in free text: `password=...`, `"hf_token": "..."`, `AWS_SECRET_ACCESS_KEY=...`,
# `--password ...`. The value goes, quoted values whole. A key inside a path (`.../huggingface/token: ...`) is a
# file name, not a key; `tokens_per_second=12` or `token_count=5` are counts.
_SECRET_KEY_TEXT = (r"(?:[A-Za-z0-9]+[_-])*(?:token|password|passwd|passphrase|secret|credentials?|api[_-]?key"
                    r"|private[_-]?key|access[_-]?key|secret[_-](?:access[_-])?key)")
_SECRET_ASSIGNMENT = re.compile(
    rf"""((?<![\w/.-]){_SECRET_KEY_TEXT}["']?\s*[=:]\s*|(?<![\w-])--{_SECRET_KEY_TEXT}(?:\s+|=))"""
    # a quoted value whole, an escaped quote inside it too; one whose closing quote follows a backslash (a shell's
    # 'abc\') is whole up to that quote
    r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|"[^"]*"|'[^']*'|[^\s"',;&]+)""", re.I)


def redact_text(text: str) -> str:
    """Token-shaped substrings, and values given to secret-named keys, replaced: for text that leaves through other
    channels than the logger (error lines, pods' output)."""
    return _SECRET_ASSIGNMENT.sub(_redacted_assignment, _SECRET_VALUE.sub(REDACTED, text))


def _redacted_assignment(match: re.Match) -> str:
    # a quoted value keeps its quotes: a JSON line (`jobs logs --raw`) stays JSON
    quote = match.group(2)[0] if match.group(2)[0] in "\"'" else ""
    return match.group(1) + quote + REDACTED + quote


def redact_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A log event from elsewhere (a pod's JSON line) redacted as this process's own events are."""
    return redact_secrets(None, "", dict(event))


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: blank any key named like a secret and any value shaped like a token."""
    return {
        key: (REDACTED if key != "event" and _SECRET_KEY.search(key) else _redact_value(value))
        for key, value in event_dict.items()
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": a bare NaN is no JSON, and every stdout line must parse
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def finite_floats(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor (JSON lines): non-finite floats as strings."""
    return {key: _json_safe(value) for key, value in event_dict.items()}


def shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Configure structlog once. `auto` means JSON unless stdout is a terminal."""
    if log_format == "auto":
        log_format = "console" if sys.stdout.isatty() else "json"
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")
    if log_format == "json":
        renderers: list[Any] = [structlog.processors.format_exc_info, finite_floats, structlog.processors.JSONRenderer()]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]
    structlog.configure(
        processors=shared_processors() + renderers,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # A new PrintLogger per use picks up the current sys.stdout (CliRunner swaps it).
        logger_factory=_print_logger,
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (transformers, peft) go to stderr, at warning level and above.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")


_log_stream: Any = None  # where log lines go while libraries' prints are set aside (None: sys.stdout)


def _print_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=_log_stream or sys.stdout)


@contextlib.contextmanager
def library_prints_aside(keep: bool = False) -> Iterator[None]:
    """What libraries print on stdout, which carries our JSON lines, goes to stderr: always with `keep` (an
    exporter's steps and failures, for the pod's log), else on a terminal only (a quantiser's progress bars); our
    own lines meanwhile, a heartbeat thread's progress events too, stay on stdout (a plain redirect took them)."""
    global _log_stream
    saved = _log_stream
    with contextlib.ExitStack() as stack:
        aside = sys.stderr if keep or sys.stderr.isatty() else stack.enter_context(open(os.devnull, "w"))
        _log_stream = saved or sys.stdout
        try:
            stack.enter_context(contextlib.redirect_stdout(aside))
            yield
        finally:
            _log_stream = saved


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def bind(**values: Any) -> None:
    """Bind run_id / stage / shard (or anything) to every later event in this context."""
    structlog.contextvars.bind_contextvars(**values)


def bound(**values: Any) -> Any:
    """`bind` for a block only: the values before it come back after it."""
    return structlog.contextvars.bound_contextvars(**values)


def current_stage() -> str | None:
    return structlog.contextvars.get_contextvars().get("stage")


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


class Progress:
    """Progress of a long loop: a bar on a terminal, a JSON `progress` event at least every `interval_s` otherwise.

    Used as a context manager; `update(n)` after each unit of work. The final event is always emitted. Between
    updates a heartbeat thread emits the current state when `interval_s` passes without an event, so a slow unit
    (a batch of a large model on a CPU, a validation pass between training steps) never leaves a silent gap.
    `already_done`: units an earlier process finished (a resumed run): counted in `done`, not in the rate.
    Work made of a few long named steps (an export) calls `step(name)` as each begins instead: events name the
    current step, and the final one gives each step's seconds.
    """

    def __init__(self, total: int | None, what: str, interval_s: float = 30.0, unit: str = "rows",
                 already_done: int = 0) -> None:
        self.total = total
        self.what = what
        self.unit = unit
        self.interval_s = interval_s
        self.done = self.already_done = already_done
        self._log = get_logger()
        self._bar = None
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.current: str | None = None
        self.step_seconds: dict[str, float] = {}

    def step(self, name: str) -> None:
        """Begin the step `name`; the one before it is done."""
        with self._lock:
            finished = self._close_step()
            self.current, self._step_start = name, time.monotonic()
        if self._bar is not None:
            self._bar.update(finished)
            self._bar.set_postfix_str(name)

    def _close_step(self, finished: bool = True) -> int:
        if self.current is None:
            return 0
        self.step_seconds[self.current] = round(time.monotonic() - self._step_start, 1)
        self.done += finished
        return int(finished)

    def __enter__(self) -> "Progress":
        if sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.what, unit=self.unit, dynamic_ncols=True,
                             initial=self.already_done)
        elif self.interval_s > 0:
            # The thread logs with this context's run_id, stage and shard.
            context = contextvars.copy_context()
            self._heartbeat = threading.Thread(target=context.run, args=(self._beat,), daemon=True,
                                               name=f"progress-{self.what}")
            self._heartbeat.start()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        self._emit_if_due()

    def _emit_if_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last >= self.interval_s:
                self._last = now
                self._emit("progress")

    def _beat(self) -> None:
        while not self._stop.wait(max(self._last + self.interval_s - time.monotonic(), 0.01)):
            self._emit_if_due()

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.done - self.already_done) / elapsed
        eta = None
        if self.total is not None and rate > 0:
            eta = round(max(self.total - self.done, 0) / rate, 1)
        snapshot = {"what": self.what, "done": self.done, "total": self.total, "rate": round(rate, 2),
                    "unit": self.unit, "eta_s": eta, "elapsed_s": round(elapsed, 1)}
        if self.current is not None:
            snapshot["current"] = self.current
        return snapshot

    def _emit(self, event: str, **extra: Any) -> None:
        self._log.info(event, **self.snapshot(), **extra)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._bar is not None:
            self._bar.close()
        event = "progress_done" if exc[0] is None else "progress_stopped"  # an interrupted loop is not done
        if self.current is None:
            self._emit(event)
            return
        self._close_step(finished=exc[0] is None)  # a failed step keeps its seconds but is not done
        self._emit(event, step_seconds=self.step_seconds)
