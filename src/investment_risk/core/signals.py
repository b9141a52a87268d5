"""SIGTERM as a request to stop at the next safe point, for the loops that can save their work first.

Kubernetes stops a pod (eviction, preemption, a drain) with SIGTERM and, a grace period later, SIGKILL. Elsewhere
SIGTERM raises `Terminated` where it lands (cli/app.py); inside `StopRequest.catching()` it only sets a flag, so
the training step or the read batch under way finishes, a checkpoint is written, and the loop stops itself (exit 1):
the retried pod continues from there, not from a checkpoint taken minutes earlier.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class StopRequest:
    """Whether SIGTERM came while `catching()` ran."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def catching(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return

        def request(_signum: int, _frame: Any) -> None:
            self.requested = True

        previous = signal.signal(signal.SIGTERM, request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
