"""One place that turns exceptions into one-line messages and exit codes (table in docs/exit-codes.md)."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import typer

from dpruner.errors import EXIT_INTERNAL, DprunerError


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
        except Exception as exc:  # a bug: still one line by default, the traceback on request
            if debug_enabled():
                traceback.print_exc()
            print(
                f"internal error: {type(exc).__name__}: {exc} (a bug in dpruner; rerun with DPRUNER_DEBUG=1 for the "
                "traceback and report it)",
                file=sys.stderr,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper
