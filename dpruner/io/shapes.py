"""Parsing of `--input-shape`: the shape of one example input, batch dimension optional, bounded in size."""

from __future__ import annotations

import math
import re

from dpruner.errors import ShapeError
from dpruner.io.limits import ENV_MAX_INPUT_ELEMENTS, Limits, limits_from_env

OPTION = "--input-shape"


def parse_input_shape(
    text: str | tuple | list, *, what: str = OPTION, limits: Limits | None = None
) -> tuple[int, int, int, int]:
    """Parse 'C,H,W' (or 'N,C,H,W', also with 'x' as separator) into a 4-D shape with batch size 1 by default.
    `what` names where the shape came from in errors (e.g. "the input shape stored in 'ckpt.pt'")."""
    if isinstance(text, (tuple, list)):
        parts = [str(p) for p in text]
    else:
        parts = [p for p in re.split(r"[,x\s]+", str(text).strip().strip("()[]")) if p]
    try:
        dims = [int(p) for p in parts]
    except ValueError:  # not an integer, or more digits than Python will convert
        dims = []
    if len(dims) not in (3, 4) or any(d <= 0 for d in dims):
        raise ShapeError(
            f"{what} must be C,H,W (or N,C,H,W) with positive integers, e.g. 3,224,224; got '{_clip(text)}'."
        )
    if len(dims) == 3:
        dims = [1, *dims]
    check_input_elements(dims, what, limits)
    return tuple(dims)  # type: ignore[return-value]


def check_input_elements(shape, what: str, limits: Limits | None = None) -> None:
    """Refuse a shape whose N*C*H*W exceeds Limits.max_input_elements (before anything allocates it)."""
    limit = (limits or limits_from_env()).max_input_elements
    count = math.prod(int(d) for d in shape)
    if count > limit:
        raise ShapeError(
            f"{what} {_clip(format_shape(shape))} has {_clip(f'{count:,}')} elements (N*C*H*W), more than the limit "
            f"of {limit:,}; use a smaller shape or raise the limit with {ENV_MAX_INPUT_ELEMENTS}."
        )


def format_shape(shape) -> str:
    """'3,224,224'-style text for a shape (the form --input-shape accepts)."""
    return ",".join(str(int(d)) for d in shape)


def _clip(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


TORCHVISION_DEFAULT_SHAPE = (1, 3, 224, 224)


def resolve_input_shape(
    given, *, stored=None, arch: str | None = None, source: str | None = None, limits: Limits | None = None
) -> tuple[tuple[int, ...], str]:
    """The input shape to use and where it came from: the option, the checkpoint, or torchvision's 224x224 default.
    `source` is the checkpoint's path, named when its stored shape is at fault."""
    if given:
        return parse_input_shape(given, limits=limits), OPTION
    if stored:
        where = f"the input shape stored in '{source}'" if source else "the input shape stored in the checkpoint"
        return parse_input_shape(tuple(stored), what=where, limits=limits), "checkpoint"
    if arch and arch.startswith("torchvision:"):
        return TORCHVISION_DEFAULT_SHAPE, "torchvision default"
    raise ShapeError("The checkpoint does not record an input shape; pass --input-shape C,H,W (e.g. 3,224,224).")
