"""Parsing of `--input-shape`: the shape of one example input, batch dimension optional."""

from __future__ import annotations

import re

from dpruner.errors import ShapeError


def parse_input_shape(text: str | tuple | list) -> tuple[int, int, int, int]:
    """Parse 'C,H,W' (or 'N,C,H,W', also with 'x' as separator) into a 4-D shape with batch size 1 by default."""
    if isinstance(text, (tuple, list)):
        parts = [str(p) for p in text]
    else:
        parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("()[]")) if p]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (3, 4) or any(d <= 0 for d in dims):
        raise ShapeError(
            f"--input-shape must be C,H,W (or N,C,H,W) with positive integers, e.g. 3,224,224; got '{text}'."
        )
    if len(dims) == 3:
        dims = [1, *dims]
    return tuple(dims)  # type: ignore[return-value]


def format_shape(shape) -> str:
    """'3,224,224'-style text for a shape (the form --input-shape accepts)."""
    return ",".join(str(int(d)) for d in shape)


TORCHVISION_DEFAULT_SHAPE = (1, 3, 224, 224)


def resolve_input_shape(given, *, stored=None, arch: str | None = None) -> tuple[tuple[int, ...], str]:
    """The input shape to use and where it came from: the option, the checkpoint, or torchvision's 224x224 default."""
    if given:
        return parse_input_shape(given), "--input-shape"
    if stored:
        return parse_input_shape(tuple(stored)), "checkpoint"
    if arch and arch.startswith("torchvision:"):
        return TORCHVISION_DEFAULT_SHAPE, "torchvision default"
    raise ShapeError("The checkpoint does not record an input shape; pass --input-shape C,H,W (e.g. 3,224,224).")
