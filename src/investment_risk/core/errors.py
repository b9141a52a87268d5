"""The package's own exceptions; the CLI maps them to exit codes in one place (cli/app.py)."""


class InvestmentRiskError(Exception):
    """Bad usage, config or data: never retried (exit code 2)."""

    exit_code = 2


class InputError(InvestmentRiskError):
    """An input file or row that cannot be used; the message names the file, row or column."""


class ConfigError(InvestmentRiskError):
    """An option or configuration value that cannot be used."""


class RetryableError(InvestmentRiskError):
    """A failure a retry may fix: I/O, device, preemption (exit code 1)."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pod stopped: eviction, preemption, a deadline), raised where the process is so that half-written
    files are removed on the way out, as on Ctrl-C; exit code 1, a retry may finish the work."""
