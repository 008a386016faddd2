"""Per-layer-type resizing, in place: the only code that knows weight layouts.

Each resizer takes the module and the kept indices per role ('in', 'out', 'norm'), rebuilds its parameters and
buffers as smaller dense tensors and updates its size attributes, keeping the module object itself (code holding
the model keeps working). A grouped conv only ever loses whole groups (the graph couples each group into one
channel), so its `groups` shrinks with it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dpruner.errors import UnsupportedError


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _select(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace parameter or buffer `name` of `module` by its slice along `dim`."""
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(dim, keep.to(old.device))
    if isinstance(old, nn.Parameter):
        setattr(module, name, _param(old, new))
    else:
        module._buffers[name] = new.clone()  # register_buffer would refuse an existing name


def resize_conv(m: nn.Module, keep: dict) -> None:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    keep_in, keep_out = keep.get("in"), keep.get("out")
    new_in = len(keep_in) if keep_in is not None else m.in_channels
    new_out = len(keep_out) if keep_out is not None else m.out_channels
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if m.groups == 1:
        if keep_out is not None:
            _select(m, "weight", out_dim, keep_out)
        if keep_in is not None:
            _select(m, "weight", in_dim, keep_in)
    else:
        per_group_out = m.out_channels // m.groups
        per_group_in = m.in_channels // m.groups
        new_groups = new_out // per_group_out
        if new_out % per_group_out or new_in != new_groups * per_group_in:
            raise UnsupportedError(f"pruning would split a group of {type(m).__name__} (a bug in the graph rules)")
        rows = keep_in if transposed else keep_out  # dim 0 holds whole groups: in (transposed) or out channels
        if rows is not None:
            _select(m, "weight", 0, rows)
        m.groups = new_groups
    if keep_out is not None and m.bias is not None:
        _select(m, "bias", 0, keep_out)
    gain = getattr(m, "gain", None)  # timm's ScaledStdConv2d: one gain per output filter, shape (out, 1, 1, 1)
    if keep_out is not None and isinstance(gain, torch.Tensor) and gain.dim() and gain.shape[0] == m.out_channels:
        _select(m, "gain", 0, keep_out)
    m.in_channels, m.out_channels = new_in, new_out


def resize_linear(m: nn.Linear, keep: dict) -> None:
    if keep.get("out") is not None:
        _select(m, "weight", 0, keep["out"])
        if m.bias is not None:
            _select(m, "bias", 0, keep["out"])
        m.out_features = len(keep["out"])
    if keep.get("in") is not None:
        _select(m, "weight", 1, keep["in"])
        m.in_features = len(keep["in"])


def resize_batchnorm(m: nn.Module, keep: dict) -> None:
    idx = keep.get("norm")
    if idx is None:
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            _select(m, name, 0, idx)
    m.num_features = len(idx)


def resize_groupnorm(m: nn.GroupNorm, keep: dict) -> None:
    idx = keep.get("norm")
    if idx is None:
        return
    per_group = m.num_channels // m.num_groups
    if len(idx) % per_group:
        raise UnsupportedError("pruning would split a GroupNorm group (a bug in the graph rules)")
    for name in ("weight", "bias"):
        _select(m, name, 0, idx)
    m.num_groups = len(idx) // per_group
    m.num_channels = len(idx)


def resize_layernorm(m: nn.LayerNorm, keep: dict) -> None:
    idx = keep.get("norm")
    if idx is None:
        return
    for name in ("weight", "bias"):
        _select(m, name, 0, idx)
    m.normalized_shape = (len(idx),)


def resize_prelu(m: nn.PReLU, keep: dict) -> None:
    idx = keep.get("norm")
    if idx is None:
        return
    _select(m, "weight", 0, idx)
    m.num_parameters = len(idx)


RESIZERS: dict[type, Callable] = {
    nn.modules.conv._ConvNd: resize_conv,
    nn.Linear: resize_linear,
    nn.modules.batchnorm._BatchNorm: resize_batchnorm,
    nn.modules.instancenorm._InstanceNorm: resize_batchnorm,
    nn.GroupNorm: resize_groupnorm,
    nn.LayerNorm: resize_layernorm,
    nn.PReLU: resize_prelu,
}


def resize(module: nn.Module, keep: dict) -> None:
    """Resize one module in place (`keep`: role -> LongTensor of kept indices)."""
    for cls in type(module).__mro__:
        if cls in RESIZERS:
            RESIZERS[cls](module, keep)
            return
    raise UnsupportedError(f"dpruner has no surgery for {type(module).__name__}")


def select_param(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Slice a parameter or buffer that a graph rule coupled to channels (e.g. a position embedding)."""
    _select(module, name, dim, keep)
