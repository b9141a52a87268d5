"""Options that also read INVESTMENT_RISK_<OPTION>, and a helper that stacks them (a leaf: imports nothing of ours)."""

from __future__ import annotations

import functools
from typing import Any

import click

ENV_PREFIX = "INVESTMENT_RISK_"


class EnvOption(click.Option):
    """Every option can also come from INVESTMENT_RISK_<OPTION> (the contract's rule, not Click's nested prefix)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)
        flags = [opt for opt in self.opts if opt.startswith("--")]
        if self.envvar is None and flags:  # named after the flag the user types, not the Python parameter
            self.envvar = ENV_PREFIX + max(flags, key=len)[2:].replace("-", "_").upper()


option = functools.partial(click.option, cls=EnvOption)


def stacked(*decorators: Any) -> Any:
    """One decorator applying several Click options, listed in the order --help shows them."""
    def apply(fn: Any) -> Any:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply
