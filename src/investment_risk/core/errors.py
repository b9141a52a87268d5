"""The package's own exceptions; the CLI maps them to exit codes in one place (cli/app.py)."""

from __future__ import annotations

import errno
import re
from pathlib import Path


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


# A read that failed for the storage's sake, not the file's (NFS and network volumes): exit 1, so the Job retries it.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ENETDOWN,
                              errno.ENETUNREACH, errno.ECONNRESET, errno.EHOSTUNREACH})


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind `exc`: an OSError's, or the one a Rust library (safetensors) wrote into its
    message as "(os error N)"."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    match = _OS_ERROR.search(str(exc))
    return int(match.group(1)) if match else None


def unreadable(path: str | Path, exc: BaseException, what: str) -> InvestmentRiskError:
    """The error for a failed read of `path`: a storage hiccup is retried (exit 1), anything else names the file
    and what is wrong with it (exit 2)."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # the path is named already
    if os_errno(exc) in TRANSIENT_ERRNOS:
        return RetryableError(f"{path}: I/O error while reading ({detail}); a retry may succeed")
    return InputError(f"{path}: {what} ({detail})")


def damaged(path: str | Path, exc: BaseException, what: str) -> InvestmentRiskError:
    """The error for a library's failure to load `path`: a storage hiccup is retried (exit 1, as `unreadable`);
    anything else is the file's damage, named with the error's kind and first line (exit 2)."""
    if os_errno(exc) in TRANSIENT_ERRNOS:
        return unreadable(path, exc, what)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return InputError(f"{path}: {what} ({type(exc).__name__}: {first})")
