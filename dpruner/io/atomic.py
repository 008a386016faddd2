"""Atomic output: write to a temporary file in the target folder, then rename over the destination.

A crash or Ctrl-C mid-write leaves the old file (or none), never a half-written one, and an output path that is
one of the inputs is refused before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from dpruner.errors import InputError


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output path that is (a link to) one of the inputs."""
    out = Path(output).resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == out:
            raise InputError(f"Refusing to overwrite the input file '{item}'; choose another output path.")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, inputs: Iterable = ()) -> Path:
    """Call `write(tmp_path)` and move the result to `path` atomically; returns the final path."""
    path = Path(path)
    check_not_input(path, inputs)
    if path.is_dir():
        raise InputError(f"Output path '{path}' is a directory; give a file name.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"Output folder '{parent}' does not exist.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
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
