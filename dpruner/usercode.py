"""Running code the user supplied (architecture factories, `python:` data loaders, a model's own forward): whatever
it raises, and a `sys.exit()` inside it, becomes one UserCodeError sentence naming that code (exit 2), so neither a
traceback nor a silent exit with the user's code escapes dpruner."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from dpruner.errors import DprunerError, UserCodeError


def describe(exc: BaseException, limit: int = 300) -> str:
    """'TypeError: first line of the message' (cut at `limit` characters)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def user_code(what: str, error: type[DprunerError] = UserCodeError) -> Iterator[None]:
    """`with user_code("the factory 'model.py:build'"):` -- errors inside become `error` naming `what`.
    dpruner's own errors and Ctrl-C pass through unchanged."""
    try:
        yield
    except (DprunerError, KeyboardInterrupt):
        raise
    except SystemExit as exc:
        raise error(f"{what} called sys.exit({exc.code!r}); dpruner stopped there.") from None
    except RecursionError as exc:
        raise error(f"{what} recursed too deeply ({describe(exc)}).") from None
    except MemoryError:
        raise error(f"{what} ran out of memory.") from None
    except Exception as exc:
        raise error(f"{what} failed: {describe(exc)}") from exc
