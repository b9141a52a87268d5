"""Fault injection for the reliability tests: SIGKILL (or `_INVESTMENT_RISK_KILL_SIGNAL`, e.g. TERM) this process
at a named point.

`_INVESTMENT_RISK_KILL_AT` holds a glob over point names such as `after_rename:rejects/part-00000.parquet` or
`before_done:part-00001`; unset (always, outside tests) this costs one environment lookup per point.
"""

from __future__ import annotations

import os
import signal
from fnmatch import fnmatchcase


def fault_point(name: str) -> None:
    target = os.environ.get("_INVESTMENT_RISK_KILL_AT")
    if target and fnmatchcase(name, target):
        kill_now()


def kill_now() -> None:
    """Send this process SIGKILL, or the signal `_INVESTMENT_RISK_KILL_SIGNAL` names (TERM: a pod being stopped)."""
    name = os.environ.get("_INVESTMENT_RISK_KILL_SIGNAL", "KILL")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
