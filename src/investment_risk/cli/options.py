"""Options that also read INVESTMENT_RISK_<OPTION>, and a helper that stacks them (a leaf: imports nothing of ours)."""

from __future__ import annotations

import functools
import re
from typing import Any

import click

ENV_PREFIX = "INVESTMENT_RISK_"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: Any) -> bool:
    return isinstance(value, str) and bool(_URL.match(value))


class EnvOption(click.Option):
    """Every option can also come from INVESTMENT_RISK_<OPTION> (the contract's rule, not Click's nested prefix)."""

    def __init__(self, *args: Any, once: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)
        self.once = once  # given twice is an error, not the last one winning (the data a command reads)
        flags = [opt for opt in self.opts if opt.startswith("--")]
        if self.envvar is None and flags:  # named after the flag the user types, not the Python parameter
            self.envvar = ENV_PREFIX + max(flags, key=len)[2:].replace("-", "_").upper()


    def process_value(self, ctx: click.Context, value: Any) -> Any:
        # A path option given a URL (s3://bucket/scored): pathlib reads it as the folder ./s3:/bucket, where a
        # command wrote without a word, or deep in a library's traceback.
        if isinstance(self.type, click.Path):
            for item in value if isinstance(value, (list, tuple)) else (value,):  # not Click's unset marker
                if is_url(item):
                    raise click.BadParameter(f"{item}: a URL; this takes a local or mounted path (copy the files "
                                             "there, or mount the bucket)", ctx, self)
        return super().process_value(ctx, value)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        if not self.once:  # a repeated setting (--epochs 2 --epochs 3) is an override: the last one wins
            return
        # Click keeps the last of a repeated one-value option without a word: `--data a --data b` read b alone.
        parsed = {id(p): p for opt in self.opts for p in (parser._long_opt.get(opt), parser._short_opt.get(opt)) if p}
        for entry in parsed.values():
            store = entry.process

            def once(value: Any, state: Any, store: Any = store) -> None:
                if self.name in state.opts:
                    raise click.UsageError(f"{'/'.join(self.opts)} was given more than once; it takes one value", ctx)
                store(value, state)

            entry.process = once


class RepeatedPath(click.Path):
    """A path option given once per path: its environment value lists them separated by whitespace, as every
    repeatable option's does (click.Path's would split at ':'), and a URL among them is refused as in any path."""

    envvar_list_splitter = None


option = functools.partial(click.option, cls=EnvOption)


def stacked(*decorators: Any) -> Any:
    """One decorator applying several Click options, listed in the order --help shows them."""
    def apply(fn: Any) -> Any:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply
