"""The command line, one module per command group; `run` (main, with SIGTERM handled) is the `investment-risk`
entry point."""

from .app import main, run

__all__ = ["main", "run"]
