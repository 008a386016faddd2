"""One place that turns exceptions into one-line messages and exit codes (table in docs/exit-codes.md)."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import typer

from dpruner.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, DprunerError
from dpruner.usercode import describe


def _exit_origin(exc: SystemExit) -> str:
    """'code in model.py line 12': the innermost frame of the traceback, where sys.exit was called."""
    tb = exc.__traceback__
    if tb is None:
        return "Code"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"Code in '{tb.tb_frame.f_code.co_filename}' line {tb.tb_lineno}"


def debug_enabled() -> bool:
    """DPRUNER_DEBUG=1 shows tracebacks."""
    return os.environ.get("DPRUNER_DEBUG", "") not in ("", "0", "false", "no")


def handle_errors(command):
    """Wrap a command: a DprunerError becomes 'error: <sentence>' on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except DprunerError as exc:
            if debug_enabled():
                traceback.print_exc()
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except SystemExit as exc:  # sys.exit() in code dpruner ran (a model's forward, a loader): never silent
            if debug_enabled():
                traceback.print_exc()
            print(f"error: {_exit_origin(exc)} called sys.exit({exc.code!r}) while dpruner was running; dpruner "
                  "stopped there.", file=sys.stderr)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:  # a bug: still one line by default, the traceback on request
            if debug_enabled():
                traceback.print_exc()
            print(
                f"internal error: {describe(exc)} (a bug in dpruner, not in your input; rerun with DPRUNER_DEBUG=1 "
                "for the traceback and report it).",
                file=sys.stderr,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper
