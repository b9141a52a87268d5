"""Where a command's human summary goes: a terminal gets text; a piped stdout, where every line is a JSON object,
gets a log event instead (the contract's rule)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..core.logs import get_logger


def on_terminal() -> bool:
    return sys.stdout.isatty()


def summary(text: str, event: str, **fields: Any) -> None:
    """A human summary on a terminal; on a piped stdout, where every line is JSON, a log event instead."""
    if on_terminal():
        click.echo(text)
    else:
        get_logger().info(event, **fields)
