"""The `investment-risk` command line: thin Click commands that parse, call one library function, and report.

Domain exceptions become a one-line `Error: ...` with the exit code the contract gives them, in one place
(`App.invoke`): 2 for bad usage, config or data; 1 for what a retry may fix; 130 when interrupted. Each command
group lives in its own module; this one only assembles them.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from typing import Any

import click
from safetensors import SafetensorError

from .. import __version__
from ..core.errors import InvestmentRiskError, Terminated, os_errno
from ..core.logs import bind, configure_logging, get_logger, new_run_id, redact_text
from . import data, demo, evaluate, export, jobs, report, score, train
from .options import ENV_PREFIX, option


# A path that cannot be what it is used as: a retry meets the same path (exit 2, not 1). EFBIG: a file past the
# filesystem's or the container's size limit, which a retry meets again (a full disk, ENOSPC, may be freed: 1).
_PATH_ERRORS = {errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}


def _one_line(text: str) -> str:
    """An error is one line: a library's message (pyarrow's, a path with a newline in it) may hold several."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _redacted(exc: click.ClickException) -> click.ClickException:
    """Click's own errors quote the value they refuse, which may be a token passed by mistake."""
    exc.message = redact_text(exc.message)
    return exc


class App(click.Group):
    """The root group: maps the package's exceptions to exit codes for every subcommand below it."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:  # the root's own options (--log-format, --log-level)
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            raise _redacted(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # a subcommand's usage error
            raise _redacted(exc) from None
        except InvestmentRiskError as exc:
            raise _failed(str(exc), exc.exit_code) from None  # messages echo paths and options
        except OSError as exc:
            if exc.errno in _PATH_ERRORS:
                raise _failed(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc) or
                              exc.__class__.__name__, 2) from None
            raise _failed(f"I/O error: {exc}", 1) from None
        except SafetensorError as exc:  # safetensors reports the OS's errors (a full disk) in its own
            if (code := os_errno(exc)) is None:  # a file that is not safetensors
                raise _failed(f"safetensors: {exc}", 2) from None
            raise _failed(f"I/O error: {exc}", 2 if code in _PATH_ERRORS else 1) from None
        except Terminated:
            get_logger().warning("terminated", signal="SIGTERM", exit_code=1)
            click.echo("Terminated.", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            get_logger().warning("interrupted")
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _failed(text: str, exit_code: int) -> click.ClickException:
    text = _one_line(text)
    get_logger().error("command_failed", error=text, exit_code=exit_code)
    error = click.ClickException(redact_text(text))
    error.exit_code = exit_code
    return error


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto",
        help="Log lines as JSON (default when stdout is not a terminal) or readable console lines.")
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default="INFO",
        help="The least severe level that is logged.")
@click.version_option(__version__, prog_name="investment-risk")
def main(log_format: str, log_level: str) -> None:
    """Eight calibrated capital-preservation risk scores per financial news article."""
    configure_logging(log_format, log_level)
    # The command's name is the stage until the command binds its own: an error before it did still has one.
    bind(run_id=os.environ.get(ENV_PREFIX + "RUN_ID") or new_run_id(),
         stage=click.get_current_context().invoked_subcommand)


for command in (data.data, train.train_command, train.stage_model_command, evaluate.evaluate_command,
                export.export_command, score.score_command, score.score_merge_command, evaluate.calibrate_command,
                report.report, demo.demo_command, jobs.jobs_group):
    main.add_command(command)


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated()


def run() -> None:
    """The console entry point: `main`, with SIGTERM raised as Terminated (the Kubernetes way to stop a pod)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    main()
