"""The command line, one module per command group; `main` is the `investment-risk` entry point."""

from .app import main

__all__ = ["main"]
