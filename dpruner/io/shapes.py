"""Parsing of `--input-shape`: the shape of one example input, batch dimension optional, bounded in size.

Images are C,H,W or N,C,H,W; video (a model whose first layer is 3-D, e.g. torchvision's r3d_18) is C,T,H,W or
N,C,T,H,W. Four numbers are read by the model: N,C,H,W for a 2-D model, C,T,H,W for a 3-D one."""

from __future__ import annotations

import math
import re

from dpruner.errors import ShapeError
from dpruner.io.limits import ENV_MAX_INPUT_ELEMENTS, Limits, limits_from_env

OPTION = "--input-shape"


def parse_input_shape(
    text: str | tuple | list, *, what: str = OPTION, limits: Limits | None = None, spatial_dims: int = 2
) -> tuple[int, ...]:
    """Parse 'C,H,W' (or 'N,C,H,W', also with 'x' as separator) into a shape with batch size 1 by default; with
    spatial_dims=3 (video) 'C,T,H,W' or 'N,C,T,H,W'. `what` names where the shape came from in errors (e.g. "the
    input shape stored in 'ckpt.pt'")."""
    if isinstance(text, (tuple, list)):
        parts = [str(p) for p in text]
    else:
        parts = [p for p in re.split(r"[,x\s]+", str(text).strip().strip("()[]")) if p]
    try:
        dims = [int(p) for p in parts]
    except ValueError:  # not an integer, or more digits than Python will convert
        dims = []
    rank = 2 + spatial_dims  # batch, channels, then the spatial (and time) dims
    if len(dims) not in (rank - 1, rank) or any(d <= 0 for d in dims):
        forms = "C,H,W (or N,C,H,W)" if spatial_dims == 2 else "C,T,H,W (or N,C,T,H,W) for this 3-D model"
        example = "3,224,224" if spatial_dims == 2 else "3,16,112,112"
        raise ShapeError(f"{what} must be {forms} with positive integers, e.g. {example}; got '{_clip(text)}'.")
    if len(dims) == rank - 1:
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


def spatial_dims_of(model) -> int:
    """3 when the model's first convolution or pooling layer is 3-D (video), else 2."""
    if model is None:
        return 2
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d)):
            return 3
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d)):
            return 2
    return 2


def resolve_input_shape(
    given, *, stored=None, arch: str | None = None, source: str | None = None, limits: Limits | None = None,
    model=None,
) -> tuple[tuple[int, ...], str]:
    """The input shape to use and where it came from: the option, the checkpoint, or the model zoo's documented
    default (torchvision 3x224x224, timm's pretrained config). `source` is the checkpoint's path, named when its
    stored shape is at fault; `model` says whether four numbers mean N,C,H,W or C,T,H,W."""
    spatial = spatial_dims_of(model)
    if given:
        return parse_input_shape(given, limits=limits, spatial_dims=spatial), OPTION
    if stored:
        where = f"the input shape stored in '{source}'" if source else "the input shape stored in the checkpoint"
        return parse_input_shape(tuple(stored), what=where, limits=limits,
                                 spatial_dims=3 if len(stored) == 5 else spatial), "checkpoint"
    from dpruner.io.arch import default_input_shape

    documented = default_input_shape(arch) if arch else None
    if documented is not None and spatial == 2:
        return documented, f"{arch.split(':')[0]} default"
    raise ShapeError("The checkpoint does not record an input shape; pass --input-shape C,H,W (e.g. 3,224,224).")
