"""Atomic output: write to a temporary file in the target folder, then rename over the destination.

A crash or Ctrl-C mid-write leaves the old file (or none), never a half-written one, and an output path that is
one of the inputs is refused before anything is written.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from dpruner.errors import InputError


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output path that is (a link to) one of the inputs."""
    try:
        out = Path(output).resolve()
    except OSError:
        return  # an unusable path: check_output_path says why
    for item in inputs:
        if item is not None and str(item) and Path(item).resolve() == out:
            raise InputError(f"Refusing to overwrite the input file '{item}'; choose another output path.")


def check_output_path(path: str | os.PathLike, what: str = "Output path") -> Path:
    """A writable file name in an existing folder, checked before any work is done (no file is created)."""
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"{what} is empty; give a file name.")
    path = Path(text)
    try:
        if path.is_dir() or text.endswith(os.sep):
            raise InputError(f"{what} '{path}' is a directory; give a file name.")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"Output folder '{parent}' of '{path}' does not exist.")
        if len(path.name.encode()) > _name_max(parent) or len(os.fsencode(path.resolve())) >= 4096:
            raise InputError(f"{what} '{_short(text)}' is longer than this file system allows.")
        if not os.access(parent, os.W_OK):
            raise InputError(f"Output folder '{parent}' of '{path}' is not writable.")
    except OSError as exc:  # e.g. ENAMETOOLONG from stat on a folder part
        raise InputError(f"{what} '{_short(text)}' cannot be used: {os.strerror(exc.errno or 0)}.") from None
    return path


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2:]


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


WRITER_FAILURE = ("inline_container", "PytorchStreamWriter", "write")  # how torch.save's zip writer fails on I/O


def is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError for a write the system refused (it carries no errno)."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and (isinstance(exc.__cause__, OSError)
                                              or any(word in str(exc) for word in WRITER_FAILURE))


def write_failure(path: Path, exc: BaseException) -> InputError:
    """One sentence for a write that the system refused (full disk, read-only file system, a name too long, ...)."""
    code = getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)
    if code is None and _free_bytes(path) < LOW_SPACE:
        code = errno.ENOSPC  # torch.save reports a full disk as 'unexpected pos ...'
    if code:
        reason = os.strerror(code)
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return InputError(f"Cannot write '{path}': {reason}; nothing was written.")


LOW_SPACE = 64 << 20


def _free_bytes(path: Path) -> int:
    try:
        stat = os.statvfs(path.parent if str(path.parent) else ".")
        return stat.f_bavail * stat.f_frsize
    except OSError:
        return 1 << 62


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, inputs: Iterable = ()) -> Path:
    """Call `write(tmp_path)` and move the result to `path` atomically; returns the final path. A write the
    system refuses (full disk, read-only folder) is an InputError and leaves neither the file nor a temporary."""
    path = check_output_path(path)
    check_not_input(path, inputs)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise write_failure(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        failure = write_failure(path, exc) if is_write_failure(exc) else None  # before the unlink frees space
        tmp.unlink(missing_ok=True)
        if failure is None:
            raise
        raise failure from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, inputs: Iterable = ()) -> Path:
    """Write bytes atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), inputs=inputs)


def atomic_torch_save(obj, path: str | os.PathLike, *, inputs: Iterable = ()) -> Path:
    """torch.save atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), inputs=inputs)
