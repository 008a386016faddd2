"""Data-set specs: the text a user passes to `--data`, parsed and checked before anything heavy is imported.

Accepted forms: `cifar10:ROOT`, `cifar100:ROOT`, `imagefolder:ROOT`, `digits` and `python:FILE.py:FN`.
This module must not import torch: the CLI validates specs before deciding whether it needs torch at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpruner.errors import InputError

ACCEPTED_FORMS = "cifar10:ROOT, cifar100:ROOT, imagefolder:ROOT, digits or python:FILE.py:FN"
ROOTED_KINDS = ("cifar10", "cifar100", "imagefolder")
KINDS = (*ROOTED_KINDS, "digits", "python")


class DataError(InputError):
    """A data set that cannot be used: a malformed spec, missing or empty folders, inconsistent splits or labels."""


@dataclass(frozen=True)
class DataSpec:
    """A parsed `--data` value; `root` is set for the folder-based kinds, `file`/`function` for `python:`."""

    kind: str  # "cifar10" | "cifar100" | "imagefolder" | "digits" | "python"
    root: Path | None
    file: Path | None = None
    function: str | None = None

    def __str__(self) -> str:
        if self.kind == "python":
            return f"python:{self.file}:{self.function}"
        return self.kind if self.root is None else f"{self.kind}:{self.root}"


def parse_data_spec(text: str, *, download: bool = False) -> DataSpec:
    """Parse and check a data spec; paths must exist, except a CIFAR root that `download=True` may create."""
    text = text.strip()
    kind, sep, rest = text.partition(":")  # partition, not split: Windows paths carry a colon of their own
    kind = kind.lower()
    if kind not in KINDS:
        raise DataError(f"Unknown data set '{text}'; use {ACCEPTED_FORMS}.")
    if kind == "digits":
        if sep:
            raise DataError(f"The digits data set takes no path ('{text}'); use {ACCEPTED_FORMS}.")
        return DataSpec("digits", None)
    if kind == "python":
        return _parse_python(text, rest)
    if not rest:
        raise DataError(f"The {kind} data set needs a folder ('{kind}:ROOT'); use {ACCEPTED_FORMS}.")
    root = Path(rest).expanduser()
    if not root.exists() and not (download and kind != "imagefolder"):
        hint = "; pass --download to fetch it there" if kind != "imagefolder" else ""
        raise DataError(f"Data folder '{root}' of '{text}' does not exist{hint}.")
    if root.exists() and not root.is_dir():
        raise DataError(f"Data root '{root}' of '{text}' is a file, not a folder.")
    return DataSpec(kind, root)


def _parse_python(text: str, rest: str) -> DataSpec:
    """`python:FILE.py:FN`: the file must exist, FN must be a Python identifier."""
    file_part, sep, function = rest.rpartition(":")
    if not sep or not file_part or not function.isidentifier():
        raise DataError(f"Malformed python data spec '{text}'; use python:FILE.py:FN (FN a function in FILE.py).")
    file = Path(file_part).expanduser()
    if not file.is_file():
        raise DataError(f"Data loader file '{file}' of '{text}' does not exist.")
    return DataSpec("python", None, file=file, function=function)
