"""User-facing errors. Each carries the exit code the CLI returns (documented in docs/exit-codes.md).

A DprunerError's message is one complete sentence a user can act on; the CLI prints it without a traceback
(set DPRUNER_DEBUG=1 to see one). Anything else escaping the library is a bug, and so is an EngineError.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TARGET_NOT_MET = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFICATION_FAILED = 3
EXIT_INTERNAL = 70  # EX_SOFTWARE from sysexits.h: a bug in dpruner, not the user's input


class DprunerError(Exception):
    """Base class of every error a user can cause; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_BAD_INPUT


class InputError(DprunerError):
    """A bad argument: a path that does not exist, a malformed option value."""


class CheckpointError(DprunerError):
    """A file that cannot be read as a model: corrupt, truncated, an unsupported format, or refused as unsafe."""


class ArchError(DprunerError):
    """An architecture spec that cannot be resolved, or weights that do not fit the architecture."""


class ShapeError(DprunerError):
    """An input shape that is malformed or that the model cannot run on."""


class UnsupportedError(DprunerError):
    """Something valid that dpruner does not handle (a layer, an op, a format feature)."""


class UserCodeError(DprunerError):
    """Code the user supplied (an architecture factory, a data loader, the model's own forward) raised or exited."""


class TargetNotMetError(DprunerError):
    """A pruning target (ratio or tolerance) that could not be reached."""

    exit_code = EXIT_TARGET_NOT_MET


class VerificationError(DprunerError):
    """An exported model whose outputs differ from PyTorch's beyond the tolerance."""

    exit_code = EXIT_VERIFICATION_FAILED


class EngineError(DprunerError):
    """dpruner's own fault, caught by one of its checks (e.g. a pruned model that no longer runs): exit 70, with
    what failed and a workaround in the message, so it reads like any other error but is reported as a bug."""

    exit_code = EXIT_INTERNAL
