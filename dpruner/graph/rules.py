"""The op rules table: how each module type, function and tensor method maps channel labels from inputs to outputs.

A rule returns the output's labelling (a Chan, an Opaque, a tuple of them for multi-output ops, or None for
non-tensors) and records couplings (union of atoms), slots and pad sites on the builder. Anything not in these tables
is handled by Builder.unknown: its channels become unprunable, with the node's name as the reason. Rules check their
assumptions (e.g. the channel axis is dim 1 for a conv) and fall back to unknown when they do not hold.
"""

from __future__ import annotations

import builtins
import math
import operator
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpruner.graph.atoms import Chan, ChanCount, Opaque, ParamRef, ShapeOf
from dpruner.graph.tracer import owner_of


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ndim(b, arg) -> int | None:
    shape = b.shape(arg)
    return None if shape is None else len(shape)


def _input(b, node, index: int = 0, name: str = "input"):
    arg = _arg(node, index, name)
    return arg, b.val(arg)


def _layer_input(b, node, axis: int, what: str):
    """The input of a layer as a Chan on `axis`: unknown layouts become fresh unprunable channels."""
    arg, value = _input(b, node)
    if isinstance(value, Chan):
        return value
    return b.as_chan(value, arg, axis, f"{node.name}: {what} reads a tensor of unknown channel layout")


# ---- pass-through ------------------------------------------------------------------------------------------------


def passthrough(b, node, *_):
    """Element-wise on each position (activations, dropout, clone, dtype casts): labels unchanged. On a parameter
    the result is still indexed like the parameter (slicing commutes with element-wise ops), so it stays a ParamRef
    (`x * self.gamma.float()` slices gamma with x's channels)."""
    value = b.val(node.args[0]) if node.args else b.val(next(iter(node.kwargs.values()), None))
    return value


def _spatial(k: int | None):
    """The rule of a pooling/padding/upsampling op over the trailing `k` dims (None: every dim after the batch and
    channel dims, as F.interpolate): channels must lie before them. Ops that also return indices (max pooling with
    return_indices=True) label both outputs alike."""

    def spatial(b, node, *_):
        arg, x = _input(b, node)
        pair = hasattr(node.meta.get("tensor_meta"), "__len__")  # (values, indices)
        if isinstance(x, ParamRef):
            return b.unknown(node, "spatial op on a parameter")
        if isinstance(x, Chan):
            ndim = _ndim(b, arg)
            dims = None if ndim is None else (ndim - 2 if k is None else k)
            if ndim is None or x.axis >= ndim - dims:
                return b.unknown(node, "spatial op over the channel dim")
        return (x, x) if pair else x

    spatial.__name__ = f"spatial{k if k is not None else 'N'}d"
    return spatial


spatial = _spatial(2)  # (kept for rules written against the old name: 2-D ops)


def no_tensor(b, node, *_):
    """Ops that return shapes, sizes or nothing (size(), dim(), torch._assert)."""
    return None


def size(b, node):
    """x.size() / x.size(d) / x.shape: see ShapeOf."""
    arg, x = _input(b, node)
    if not isinstance(x, Chan):
        return None
    ndim = _ndim(b, arg)
    if node.op == "call_function":  # getattr(x, "shape" | "dtype" | ...)
        return ShapeOf(x, ndim) if node.args[1] == "shape" else None
    dim = _arg(node, 1, "dim")
    if dim is None:
        return ShapeOf(x, ndim)
    if isinstance(dim, int) and dim % ndim == x.axis:
        return ChanCount(x.atoms)
    return None


def compare(b, node):
    """==, <, ... : on Python numbers (shape checks) nothing; on tensors an op we do not prune through."""
    if b.shape(node) is None:
        return None
    return b.unknown(node, "comparison of tensors")


# ---- layers ------------------------------------------------------------------------------------------------------


def conv(b, node, name: str, m: nn.Module):
    """Conv/ConvTranspose: input channels are consumed, output channels produced. With groups > 1, every channel of
    a group, input and output side, forms one class: grouped convs lose whole groups (depthwise: one channel each),
    which keeps `groups` consistent."""
    x = _layer_input(b, node, 1, type(m).__name__)
    if x is None or x.axis != 1 or len(x) != m.in_channels:
        return b.unknown(node, f"{type(m).__name__} input channels are not on dim 1")
    b.slot(name, "in", x.atoms)
    out = b.producer(name, m.out_channels)
    if m.groups > 1:
        # One row per conv group: its input channels, then its output channels; all of a row form one class.
        rows = np.concatenate([x.atoms.reshape(m.groups, -1), out.reshape(m.groups, -1)], axis=1)
        _union_rows(b, rows)
    return Chan(1, out)


def _union_rows(b, rows: np.ndarray) -> None:
    """Merge the atoms of each row of a 2-D array into one class (vectorised: thousands of depthwise channels)."""
    if rows.shape[1] > 1:
        b.atoms.union_pairwise(np.repeat(rows[:, 0], rows.shape[1] - 1), rows[:, 1:].ravel())


def linear(b, node, name: str, m: nn.Linear):
    """Linear acts on the last dim: consumes it when channels are there; otherwise channels pass through."""
    arg, value = _input(b, node)
    ndim = _ndim(b, arg)
    if ndim is None:
        return b.unknown(node, "Linear on a non-tensor")
    if isinstance(value, Chan) and value.axis != ndim - 1:
        return value
    x = _layer_input(b, node, -1, "Linear")
    if len(x) != m.in_features:
        return b.unknown(node, "Linear input size does not match its in_features")
    b.slot(name, "in", x.atoms)
    return Chan(ndim - 1, b.producer(name, m.out_features))


def batchnorm(b, node, name: str, m: nn.Module):
    """BatchNorm/InstanceNorm: per-channel parameters and running statistics on dim 1."""
    x = _layer_input(b, node, 1, type(m).__name__)
    if x is None or x.axis != 1 or len(x) != m.num_features:
        return b.unknown(node, f"{type(m).__name__} on a tensor whose channels are not on dim 1")
    if m.affine or m.track_running_stats:
        b.slot(name, "norm", x.atoms)
    return x


def groupnorm(b, node, name: str, m: nn.GroupNorm):
    """GroupNorm normalises within groups of channels: each group is one class (whole groups are removed)."""
    x = _layer_input(b, node, 1, "GroupNorm")
    if x is None or x.axis != 1 or len(x) != m.num_channels:
        return b.unknown(node, "GroupNorm on a tensor whose channels are not on dim 1")
    _union_rows(b, x.atoms.reshape(m.num_groups, -1))
    b.slot(name, "norm", x.atoms)
    return x


def layernorm(b, node, name: str, m: nn.LayerNorm):
    """LayerNorm over the channel dim only (ConvNeXt, transformers): per-channel weight and bias are sliced."""
    arg, value = _input(b, node)
    ndim = _ndim(b, arg)
    if ndim is None:
        return b.unknown(node, "LayerNorm on a non-tensor")
    first_normalized = ndim - len(m.normalized_shape)
    if isinstance(value, Chan) and value.axis < first_normalized:
        return value
    if len(m.normalized_shape) != 1:
        return b.unknown(node, "LayerNorm over several dims")
    x = _layer_input(b, node, -1, "LayerNorm")
    if x.axis != ndim - 1:
        return b.unknown(node, "LayerNorm over the channel dim and others together")
    if m.elementwise_affine:
        b.slot(name, "norm", x.atoms)
    return x


def prelu(b, node, name: str, m: nn.PReLU):
    arg, value = _input(b, node)
    if m.num_parameters == 1:
        return value
    x = _layer_input(b, node, 1, "PReLU")
    if x is None or x.axis != 1:
        return b.unknown(node, "PReLU on a tensor whose channels are not on dim 1")
    b.slot(name, "norm", x.atoms)
    return x


def flatten_module(b, node, name: str, m: nn.Flatten):
    return _flatten(b, node, node.args[0], m.start_dim, m.end_dim)


def softmax_module(b, node, name: str, m: nn.Module):
    return _softmax(b, node, m.dim)


# ---- element-wise binary ops with broadcasting -------------------------------------------------------------------


def binary(b, node):
    """x (+ - * /) y with broadcasting. Operands whose channels line up on the output's channel axis are coupled
    position by position (a residual add merges its producers; SE's x * scale couples the scale's producer). A
    parameter of full channel size (x * self.scale, x + self.pos_embedding) is sliced with the channels; a constant
    or opaque operand of full channel size pins the channels (they cannot be removed)."""
    out_shape = b.shape(node)
    if out_shape is None:
        return None  # arithmetic on Python numbers or sizes
    ndim = len(out_shape)
    operands = []
    for arg in (_arg(node, 0, "input"), _arg(node, 1, "other")):
        value = b.val(arg)
        shape = b.shape(arg) if hasattr(arg, "meta") else None
        if isinstance(value, ParamRef):
            shape = value.shape
        operands.append((value, shape))
    axis, atoms = None, None
    for value, shape in operands:
        if isinstance(value, Chan) and shape is not None:
            mapped = value.axis + ndim - len(shape)
            if shape[value.axis] == out_shape[mapped]:
                axis, atoms = mapped, value.atoms
                break
    if axis is None:
        for value, _ in operands:
            if isinstance(value, Chan):
                b.atoms.block(value.atoms, f"{node.name}: broadcast against a tensor of unknown layout")
        if any(isinstance(v, (Chan, Opaque, ParamRef)) for v, _ in operands):
            return Opaque(f"{node.name}: element-wise op without tracked channels")
        return None
    size = out_shape[axis]
    for value, shape in operands:
        if shape is None:
            continue  # a Python scalar
        offset = ndim - len(shape)
        own = axis - offset  # this operand's dim that lands on the output channel axis
        width = shape[own] if 0 <= own < len(shape) else 1
        if isinstance(value, Chan):
            if value.axis + offset != axis:
                if shape[value.axis] != 1:
                    return b.unknown(node, "operands carry channels on different dims")
                continue
            if width == size:
                b.atoms.union_pairwise(atoms, value.atoms)
        elif isinstance(value, ParamRef):
            if width == size and size > 1:  # (a dim a view inserted has size 1, so param_dim is not None here)
                module, param = b.param_ref(value)
                b.slot(module, "param", atoms, param=param, dim=value.param_dim(own))
        elif width == size and size > 1:
            b.atoms.block(atoms, f"{node.name}: combined with a tensor of full channel size that cannot be sliced")
    return Chan(axis, atoms)


# ---- joining and splitting ---------------------------------------------------------------------------------------


def cat(b, node):
    """torch.cat: on the channel dim the labels are concatenated (DenseNet, Inception); on any other dim the
    inputs' channels are coupled position by position."""
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    values = [b.val(t) for t in tensors]
    ndim = _ndim(b, node)
    chans = [v for v in values if isinstance(v, Chan)]
    if ndim is not None and chans and all(isinstance(v, (Chan, ParamRef)) for v in values) and \
            len({v.axis for v in chans}) == 1 and dim % ndim != chans[0].axis:
        # a parameter joined along another dim (ViT's class token before the patch tokens): sliced with them
        axis = chans[0].axis
        for v in values:
            if isinstance(v, ParamRef):
                if len(v.shape) != ndim or v.shape[axis] != len(chans[0]) or v.param_dim(axis) is None:
                    return b.unknown(node, "cat with a parameter of another width")
                module, param = b.param_ref(v)
                b.slot(module, "param", chans[0].atoms, param=param, dim=v.param_dim(axis))
        values = chans
    if ndim is None or not all(isinstance(v, Chan) for v in values):
        return b.unknown(node, "cat with tensors of unknown channel layout")
    dim %= ndim
    axes = {v.axis for v in values}
    if len(axes) != 1:
        return b.unknown(node, "cat of tensors with channels on different dims")
    axis = axes.pop()
    if dim == axis:
        return Chan(axis, np.concatenate([v.atoms for v in values]))
    for v in values[1:]:
        if len(v) != len(values[0]):
            return b.unknown(node, "cat of tensors with different channel counts")
        b.atoms.union_pairwise(values[0].atoms, v.atoms)
    return values[0]


def stack(b, node):
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    values = [b.val(t) for t in tensors]
    ndim = _ndim(b, node)
    if ndim is None or not all(isinstance(v, Chan) for v in values) or len({v.axis for v in values}) != 1:
        return b.unknown(node, "stack of tensors of unknown channel layout")
    dim %= ndim
    for v in values[1:]:
        b.atoms.union_pairwise(values[0].atoms, v.atoms)
    axis = values[0].axis
    return Chan(axis + 1 if dim <= axis else axis, values[0].atoms)


def _op_name(node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def split(b, node):
    """chunk/split/tensor_split: on the channel dim each piece gets its share of the labels.

    The pieces' sizes are constants of the forward code (`chunk(2)`, `split([2, 6])`), so pruning must keep them
    valid. Equal pieces (chunk, tensor_split into n sections, when the dim divides evenly) stay equal when the same
    positions go from every piece: position j of each piece is coupled with position j of the others (a GLU's
    value and gate lose the same channels). Fixed piece sizes (`split` with a size or a list of sizes,
    `tensor_split` at indices) cannot follow a pruned input: the input's channels are pinned, naming the node.
    """
    arg, x = _input(b, node)
    metas = node.meta.get("tensor_meta")
    if metas is None or hasattr(metas, "shape"):
        return b.unknown(node, "split without shape information")
    if isinstance(x, ParamRef):
        return b.unknown(node, "split of a parameter")
    if not isinstance(x, Chan):
        return tuple(x for _ in metas)
    dim = _arg(node, 2, "dim", 0) % _ndim(b, arg)
    if dim != x.axis:
        return tuple(x for _ in metas)
    pieces, start = [], 0
    for meta in metas:
        n = tuple(meta.shape)[dim]
        pieces.append(Chan(x.axis, x.atoms[start : start + n]))
        start += n
    sizes = [len(p) for p in pieces]
    op = _op_name(node)
    how = node.args[1] if len(node.args) > 1 else next(
        (node.kwargs[k] for k in ("chunks", "split_size_or_sections", "split_size", "indices_or_sections",
                                  "sections", "indices") if k in node.kwargs), None)
    if len(pieces) == 1 and (op == "chunk" or isinstance(how, int)):
        return tuple(pieces)  # one piece, whatever the width (chunk(1), split(n) with n >= the width)
    equal_sections = (op == "chunk" or (op == "tensor_split" and "indices" not in node.kwargs)) and \
        isinstance(how, int) and len(pieces) == how and len(set(sizes)) == 1
    if equal_sections:
        for piece in pieces[1:]:
            b.atoms.union_pairwise(pieces[0].atoms, piece.atoms)
        return tuple(pieces)
    if op == "split" and isinstance(how, (list, tuple)) and all(type(v) is int for v in how):
        site = _split_attr(b, node, list(how))
        if site is not None:  # the sizes are the module's: rewrite them after pruning, piece by piece
            for i, piece in enumerate(pieces):
                b.attr_site(node, *site, piece.atoms, index=i)
                b.atoms.block(piece.atoms[:1], f"{node.name}: keeps one channel per piece of the split")
            return tuple(pieces)
    shown = how if isinstance(how, int) else list(how) if isinstance(how, (list, tuple)) else "computed"
    if isinstance(how, (list, tuple)) and any(isinstance(v, torch.fx.Node) for v in how):
        shown = "computed"
    what = {"chunk": f"x.chunk({how}) into unequal pieces {sizes}",
            "tensor_split": f"tensor_split at fixed positions {shown}"}.get(op, f"torch.split with fixed sizes {shown}")
    b.atoms.block(x.atoms, f"{node.name}: {what}")
    return tuple(pieces)


def getitem(b, node):
    """Picking an output of a multi-output op, or indexing a tensor (basic slicing only)."""
    base = b.val(node.args[0])
    index = node.args[1]
    if base is None or isinstance(base, Opaque):
        return base
    if isinstance(base, ShapeOf):
        picked = range(base.ndim)[index] if isinstance(index, (int, slice)) else None
        picked = [picked] if isinstance(picked, int) else picked
        if isinstance(index, int) and picked == [base.chan.axis]:
            return ChanCount(base.chan.atoms)  # `C` of `B, C, H, W = x.shape`: see ChanCount
        if (picked is None or base.chan.axis in picked) and node.users:  # `B, N, C = x.shape` with C unused: fine
            b.atoms.block(base.chan.atoms, f"{node.name}: reads the channel count from a shape")
        return None
    if isinstance(base, (tuple, list)):
        if isinstance(index, (int, slice)):
            return base[index]
        return b.unknown(node, "indexing a tuple with a computed index")
    items = index if isinstance(index, tuple) else (index,)
    in_ndim = len(base.shape) if isinstance(base, ParamRef) else _ndim(b, node.args[0])
    if in_ndim is None:
        return b.unknown(node, "indexing without shape information")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (in_ndim - consumed))
        else:
            expanded.append(item)
    if isinstance(base, ParamRef):  # only views: self.gamma[:, None, None], self.scale[None, ...]
        shape = b.shape(node)
        if expanded and isinstance(expanded[0], torch.fx.Node) and all(i == slice(None) for i in expanded[1:]) \
                and shape is not None and len(shape) >= len(base.shape) - 1:
            # rows gathered by an index tensor (Swin's relative position bias table[index]): the other dims stay
            # the parameter's, so slicing one of them commutes with the gather
            lead = len(shape) - (len(base.shape) - 1)
            return ParamRef(base.target, tuple(shape),
                            (*[None] * lead, *[base.param_dim(d) for d in range(1, len(base.shape))]))
        if any(i is not None and i != slice(None) for i in expanded):
            return b.unknown(node, "indexing a parameter")
        dims, d = [], 0
        for item in expanded:
            dims.append(None if item is None else d)
            d += item is not None
        dims.extend(range(d, in_ndim))
        shape = b.shape(node)
        return base.view(shape, dims) if shape is not None and len(shape) == len(dims) else \
            b.unknown(node, "indexing a parameter")
    in_dim, out_dim = 0, 0
    for item in expanded:
        if item is None:
            out_dim += 1
            continue
        if isinstance(item, slice):
            if in_dim == base.axis:
                if any(isinstance(v, torch.fx.Node) for v in (item.start, item.stop, item.step)):
                    return b.unknown(node, "slicing the channel dim with computed bounds")
                _pin_fixed_slice(b, node, base.atoms, item)
                return Chan(out_dim, base.atoms[item])
            in_dim += 1
            out_dim += 1
            continue
        if isinstance(item, int) and in_dim != base.axis:
            in_dim += 1
            continue
        return b.unknown(node, "indexing the channel dim with an integer or a tensor")
    # the channel axis lies after every indexed dim
    return Chan(base.axis - in_dim + out_dim, base.atoms)


def _pin_fixed_slice(b, node, atoms: np.ndarray, item: slice) -> None:
    """A slice of the channel dim with literal bounds (`x[:, :16]`, `x[:, 4:]`, `x[:, -8:]`) selects positions
    counted from the start or the end of the dim, and those counts do not change when channels are removed. Removing
    a channel shifts every position after it (and, counted from the end, every position before it), so the channels
    between the dim's start and a bound counted from the start, and between a bound counted from the end and the
    dim's end, are pinned; the others may go (inside the selection the output shrinks with them; outside it they are
    computed and dropped). A bound beyond the dim (`x[:, :64]` of 64 channels) is no constraint: the slice covers
    the whole dim at any width. A step other than 1 pins every channel."""
    n = len(atoms)
    start, stop, step = item.start, item.stop, item.step
    pinned = np.zeros(n, dtype=bool)
    if step not in (None, 1):
        pinned[:] = True
    for bound in (start, stop):
        if bound is None or bound >= n or bound <= -n:
            continue  # the dim's own start or end: moves with the width
        if bound >= 0:
            pinned[:bound] = True
        else:
            pinned[n + bound:] = True
    if pinned.any():
        text = f"{start if start is not None else ''}:{stop if stop is not None else ''}" + (
            f":{step}" if step not in (None, 1) else "")
        b.atoms.block(atoms[pinned], f"{node.name}: slice [{text}] of the channel dim with fixed bounds")


def pad(b, node):
    """F.pad: zero channels added on the channel dim (CIFAR ResNet option-A shortcut) get 'zero' atoms; pruning
    shrinks the padding with the channels they are added to."""
    arg, x = _input(b, node)
    if isinstance(x, ParamRef):
        return b.unknown(node, "pad of a parameter")
    if not isinstance(x, Chan):
        return x
    widths = _arg(node, 1, "pad")
    mode = _arg(node, 2, "mode", "constant")
    ndim = _ndim(b, arg)
    k = ndim - 1 - x.axis  # pad pairs run from the last dim backwards
    if 2 * k + 1 >= len(widths):
        return x
    before, after = widths[2 * k], widths[2 * k + 1]
    if not (isinstance(before, int) and isinstance(after, int)) or mode != "constant" or before < 0 or after < 0:
        return b.unknown(node, "pad of the channel dim that is not constant, or crops it")
    zb, za = b.atoms.new(before, "zero"), b.atoms.new(after, "zero")
    b.pad_site(node, k, zb, za)
    return Chan(x.axis, np.concatenate([zb, x.atoms, za]))


# ---- shape ops ---------------------------------------------------------------------------------------------------


def _flatten(b, node, arg, start: int, end: int):
    x = b.val(arg)
    if isinstance(x, ParamRef):
        return _reshape_param(b, node, x, None)
    shape = b.shape(arg)
    if not isinstance(x, Chan) or shape is None:
        return x
    ndim = len(shape)
    if ndim == 0:
        return x
    start, end = start % ndim, end % ndim
    if x.axis < start:
        return x
    if x.axis > end:
        return Chan(x.axis - (end - start), x.atoms)
    # Each channel becomes a block of features: the position of every flattened element names its channel.
    coords = np.arange(shape[x.axis]).reshape([-1 if d == x.axis else 1 for d in range(start, end + 1)])
    block = np.broadcast_to(coords, shape[start : end + 1]).reshape(-1)
    return Chan(start, x.atoms[block])


def flatten_fn(b, node):
    return _flatten(b, node, node.args[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def _shape_args(node) -> list | None:
    """The shape requested by view/reshape/expand, as written in the code (ints, -1, fx Nodes), or None."""
    if node.op == "call_method":
        rest = node.args[1:]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = rest[0]
        rest = rest or node.kwargs.get("shape", node.kwargs.get("size"))
    else:
        rest = _arg(node, 1, "shape")
    return list(rest) if isinstance(rest, (list, tuple)) else None


def _fixed_size(node, dim: int, out_ndim: int) -> str | None:
    """Why output dim `dim` of a view/reshape/expand has a size the code fixes (a literal such as 16, or a value
    computed in the forward), or None when the code leaves it free (-1), so it follows a pruned width."""
    args = _shape_args(node)
    if args is None or len(args) != out_ndim:
        return "a shape dpruner cannot read"
    value = args[dim]
    if isinstance(value, int) and value == -1:
        return None
    return f"a fixed size {value}" if isinstance(value, int) else "a size computed in the forward"


def _reshape_gathered(b, node, ref: ParamRef, out_shape):
    """Reshape of a parameter whose only wide parameter dim survives whole (written -1) while the dims gathered
    from it (dims None, see getitem) merge or split: `table[index].view(49, 49, -1)`."""
    mapped = [d for d in range(len(ref.shape)) if ref.param_dim(d) is not None and ref.shape[d] > 1]
    if len(mapped) != 1:
        return b.unknown(node, "reshape of a parameter that merges or splits its dims")
    m = mapped[0]
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) == math.prod(ref.shape[:m]) and out_shape[k] == ref.shape[m] and \
                math.prod(out_shape[k + 1:]) == math.prod(ref.shape[m + 1:]):
            if _fixed_size(node, k, len(out_shape)):
                return b.unknown(node, "reshape of a parameter to a fixed size")
            dims = [None] * len(out_shape)
            dims[k] = ref.param_dim(m)
            return ParamRef(ref.target, tuple(out_shape), tuple(dims))
    return b.unknown(node, "reshape of a parameter that merges or splits its dims")


def _follows_count(b, node, dim: int, atoms: np.ndarray) -> bool:
    """True when the size written for output dim `dim` is a channel count read in the forward (ChanCount) of as
    many channels as `atoms`: both widths then shrink together, so they are coupled instead of pinned."""
    args = _shape_args(node)
    value = b.val(args[dim]) if args is not None and dim < len(args) and isinstance(args[dim], torch.fx.Node) else None
    if not isinstance(value, ChanCount) or len(value.atoms) != len(atoms):
        return False
    b.atoms.union_pairwise(value.atoms, atoms)
    b.counted.add((node, dim))
    return True


def _reshape_param(b, node, ref: ParamRef, out_shape):
    """view/reshape/flatten of a parameter that only adds or drops size-1 dims (`self.gamma.view(1, -1, 1, 1)`):
    a view of it. A dim longer than 1 must be written -1 in the code (its length follows the pruned parameter);
    anything else (merging dims, a literal length) is an op dpruner does not follow on a parameter."""
    out_shape = b.shape(node) if out_shape is None else out_shape
    if out_shape is None:
        return b.unknown(node, "reshape of a parameter without shape information")
    src = [d for d, n in enumerate(ref.shape) if n != 1]
    dst = [d for d, n in enumerate(out_shape) if n != 1]
    if [ref.shape[d] for d in src] != [out_shape[d] for d in dst]:
        return _reshape_gathered(b, node, ref, out_shape)
    written = (node.op == "call_method" and node.target in ("view", "reshape")) or \
        (node.op == "call_function" and node.target is torch.reshape)
    if written and any(_fixed_size(node, d, len(out_shape)) for d in dst):
        return b.unknown(node, "reshape of a parameter to a fixed size")
    dims: list = [None] * len(out_shape)
    for s_dim, d_dim in zip(src, dst):
        dims[d_dim] = s_dim
    return ref.view(out_shape, dims)


def reshape(b, node):
    """view/reshape: fine when the channel dim survives whole, or merges with the dims after it (flatten);
    anything that splits or mixes it (channel shuffle) is unknown. The output dim holding the channels must be
    written -1 in the code (`x.view(n, -1)`): a literal (`x.view(n, 16, h * w)`) or a computed size cannot follow
    a pruned width, so it pins the channels, naming the node."""
    arg, x = _input(b, node)
    if isinstance(x, ParamRef):
        return _reshape_param(b, node, x, None)
    if not isinstance(x, Chan):
        return x
    in_shape, out_shape = b.shape(arg), b.shape(node)
    if in_shape is None or out_shape is None:
        return b.unknown(node, "reshape without shape information")
    pre = math.prod(in_shape[: x.axis])
    size = in_shape[x.axis]
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) != pre:
            continue
        result = None
        if out_shape[k] == size:
            result = Chan(k, x.atoms)
        else:
            trailing = 1
            for d in range(x.axis + 1, len(in_shape) + 1):
                if out_shape[k] == size * trailing:
                    result = Chan(k, np.repeat(x.atoms, trailing))
                    break
                if d < len(in_shape):
                    trailing *= in_shape[d]
        if result is not None:
            fixed = _fixed_size(node, k, len(out_shape)) if size > 1 else None
            if fixed and _follows_count(b, node, k, result.atoms):
                fixed = None
            if fixed:
                literal = (_shape_args(node) or [None] * len(out_shape))[k]
                site = _size_attr(b, node, k, literal) if isinstance(literal, int) else None
                if site is not None:  # `reshape(B, N, self.attn_dim)`: the attribute follows the pruned width
                    b.attr_site(node, *site, result.atoms)
                else:
                    b.atoms.block(x.atoms, f"{node.name}: {_op_name(node)} gives the channel dim {fixed}")
            return result
    heads = _split_heads(b, node, x, in_shape, out_shape)
    if heads is not None:
        return heads
    return b.unknown(node, f"reshape {list(in_shape)} -> {list(out_shape)} splits or mixes the channel dim")


# ---- sizes the code reads from module attributes: attention heads ----------------------------------------------
#
# A literal size in a view/reshape is usually a constant of the code, and a pruned width cannot follow it. But
# attention blocks read it from the module: `qkv.reshape(B, N, 3, self.num_heads, self.head_dim)` and, after the
# attention, `x.reshape(B, N, self.attn_dim)`. fx records those as plain numbers, so dpruner confirms where one
# comes from: it traces the owner module again with the attribute changed by one and checks that the same call
# now has the changed size at the same place. A confirmed attribute is rewritten after pruning (AttrSite), so the
# forward code follows the new width. Heads are removed whole: the q, k and v rows of one head (and the matching
# input columns of the output projection) form one prunable channel; the head size stays.

HEAD_ATTRS = frozenset({"num_heads", "heads", "n_heads", "n_head", "nhead", "num_attention_heads", "num_head"})


def _size_attr(b, node, pos: int, value: int, names=None) -> tuple[str, str] | None:
    """(owner, attribute) when the literal `value` at position `pos` of this view/reshape's shape is an integer
    attribute of the module whose forward made the call (restricted to `names` if given), confirmed by re-tracing."""
    owner = owner_of(node)
    module = b.modules.get(owner)
    if module is None or value < 1:
        return None
    for attr, current in list(vars(module).items()):
        if type(current) is not int or current != value or attr.startswith("_") or (names and attr not in names):
            continue

        def probe(theirs, pos=pos):
            args = _shape_args(theirs)
            return args is not None and pos < len(args) and args[pos] == value + 1

        if _confirm(b, node, owner, module, attr, value + 1, ("shape", pos), probe):
            return owner, attr
    return None


def _split_attr(b, node, sizes: list[int]) -> tuple[str, str] | None:
    """(owner, attribute) when the literal split sizes are a list/tuple attribute of the calling module (timm's
    MixedConv2d: `torch.split(x, self.splits, 1)`), confirmed by re-tracing with its first entry changed."""
    owner = owner_of(node)
    module = b.modules.get(owner)
    if module is None:
        return None
    for attr, current in list(vars(module).items()):
        if not isinstance(current, (list, tuple)) or attr.startswith("_") or \
                [int(v) if type(v) is int else None for v in current] != list(sizes):
            continue
        changed = type(current)([current[0] + 1, *current[1:]])

        def probe(theirs):
            how = theirs.args[1] if len(theirs.args) > 1 else None
            return isinstance(how, (list, tuple)) and list(how) == list(changed)

        if _confirm(b, node, owner, module, attr, changed, ("split",), probe):
            return owner, attr
    return None


def _confirm(b, node, owner: str, module: nn.Module, attr: str, changed, what: tuple, probe) -> bool:
    """Trace `module` alone with `attr` set to `changed`: does `probe` hold for the call matching `node` (the
    same op, the same order among its own calls)? Memoised on the builder."""
    from dpruner.graph.tracer import PruningTracer

    mine = [n for n in node.graph.nodes if n.op == node.op and n.target == node.target and owner_of(n) == owner]
    order = mine.index(node)

    def check() -> bool:
        old = getattr(module, attr)
        setattr(module, attr, changed)
        try:
            graph = PruningTracer().trace_quietly(module)
        except Exception:  # noqa: BLE001 - a module that does not trace alone is simply not confirmed
            return False
        finally:
            setattr(module, attr, old)
        theirs = [n for n in graph.nodes if n.op == node.op and n.target == node.target and not owner_of(n)]
        return order < len(theirs) and bool(probe(theirs[order]))

    return b.confirmed((owner, attr, node.op, str(node.target), order, *what), check)


def _split_heads(b, node, x: Chan, in_shape, out_shape) -> Chan | None:
    """A reshape that splits the channel dim into (..., heads, ...) with the heads count read from the module
    (`self.num_heads`, confirmed): every position of one head is coupled into one channel, and the output carries
    one atom per head on the heads dim. None when the reshape is not of this kind."""
    args = _shape_args(node)
    if args is None or len(args) != len(out_shape):
        return None
    pre, size, post = math.prod(in_shape[: x.axis]), in_shape[x.axis], math.prod(in_shape[x.axis + 1:])
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) != pre:
            continue
        for m in range(2, len(out_shape) - k + 1):
            if math.prod(out_shape[k:k + m]) != size or math.prod(out_shape[k + m:]) != post:
                continue
            literals = args[k:k + m]
            if not all(isinstance(v, int) for v in literals):
                return None
            found = [(j, site) for j, v in enumerate(literals)
                     if v > 1 and (site := _size_attr(b, node, k + j, v, HEAD_ATTRS)) is not None]
            if len(found) != 1:
                return None
            j, site = found[0]
            heads = out_shape[k + j]
            grid = x.atoms.reshape(math.prod(out_shape[k:k + j]), heads, math.prod(out_shape[k + j + 1:k + m]))
            rep = grid[0, :, 0].copy()
            b.atoms.union_pairwise(np.tile(rep, grid.shape[0] * grid.shape[2]), grid.transpose(0, 2, 1).reshape(-1))
            b.attr_site(node, *site, rep)
            return Chan(k + j, rep)
    return None


def fresh(b, node):
    """x.new_empty/new_zeros/new_ones/new_full(size): a new tensor that only borrows x's dtype and device (DropPath's
    random mask in training). It carries no channels; combined with a tensor of full channel width it pins them."""
    return Opaque(f"{node.name}: a new tensor") if b.shape(node) else None


def roll(b, node):
    """torch.roll(x, shifts, dims): shifting tokens or pixels (Swin's shifted windows) keeps the channels; rolling
    the channel dim (or every dim, flattened) moves them: unknown."""
    arg, x = _input(b, node)
    if not isinstance(x, Chan):
        return x if not isinstance(x, ParamRef) else b.unknown(node, "roll of a parameter")
    dims = _arg(node, 2, "dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return b.unknown(node, "roll over every dim, channels included")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims) or x.axis in {d % _ndim(b, arg) for d in dims}:
        return b.unknown(node, "roll of the channel dim")
    return x


def unbind(b, node):
    """x.unbind(dim) (q, k, v = qkv.unbind(0)): each slice keeps the labels unless the channel dim is unbound."""
    arg, x = _input(b, node)
    metas = node.meta.get("tensor_meta")
    if metas is None or hasattr(metas, "shape"):
        return b.unknown(node, "unbind without shape information")
    if isinstance(x, ParamRef):
        return b.unknown(node, "unbind of a parameter")
    if not isinstance(x, Chan):
        return tuple(x for _ in metas)
    dim = _arg(node, 1, "dim", 0) % _ndim(b, arg)
    if dim == x.axis:
        return b.unknown(node, "unbind of the channel dim")
    return tuple(Chan(x.axis - (dim < x.axis), x.atoms) for _ in metas)


def attention(b, node):
    """F.scaled_dot_product_attention(q, k, v): channels on a batch-like dim (the heads) go together in q, k and v
    and come out on the same dim; channels on the token or feature dims are contracted or mixed: unknown."""
    values = [b.val(node.args[i]) if i < len(node.args) else b.val(node.kwargs.get(name))
              for i, name in enumerate(("query", "key", "value"))]
    if not any(isinstance(v, (Chan, ParamRef)) for v in values):
        return values[2]
    if not all(isinstance(v, Chan) for v in values):
        return b.unknown(node, "attention over tensors of different channel layouts")
    q, k, v = values
    ndim = _ndim(b, node.args[0])
    if ndim is None or not q.axis == k.axis == v.axis < ndim - 2:
        return b.unknown(node, "attention across the channel dim")
    b.atoms.union_pairwise(q.atoms, k.atoms)
    b.atoms.union_pairwise(q.atoms, v.atoms)
    return Chan(v.axis, v.atoms)


def matmul(b, node):
    """a @ b: channels on a shared batch dim (attention heads: q @ k^T, attn @ v) are coupled and kept; channels
    on a's rows or b's columns pass to the output's; a contracted channel dim is unknown."""
    left, right = b.val(node.args[0]), b.val(node.args[1])
    if not any(isinstance(v, (Chan, ParamRef)) for v in (left, right)):
        return left if left is not None else right
    if isinstance(left, ParamRef) or isinstance(right, ParamRef):
        return b.unknown(node, "matmul with a parameter")
    nl, nr, nout = _ndim(b, node.args[0]), _ndim(b, node.args[1]), _ndim(b, node)
    if None in (nl, nr, nout) or min(nl, nr) < 2:
        return b.unknown(node, "matmul of vectors or without shape information")
    if isinstance(left, Chan) and isinstance(right, Chan):
        if left.axis < nl - 2 and left.axis - nl == right.axis - nr:
            b.atoms.union_pairwise(left.atoms, right.atoms)
            return Chan(nout + left.axis - nl, left.atoms)
        return b.unknown(node, "matmul contracting or mixing channel dims")
    if isinstance(left, Chan) and left.axis < nl - 1:
        return Chan(nout + left.axis - nl, left.atoms) if left.axis == nl - 2 or nl == nout else \
            b.unknown(node, "matmul broadcasting a channel dim")
    if isinstance(right, Chan) and (right.axis == nr - 1 or (right.axis < nr - 2 and nr == nout)):
        return Chan(nout + right.axis - nr, right.atoms)
    return b.unknown(node, "matmul contracting the channel dim")


def reshape_as(b, node):
    """x.reshape_as(y) / x.view_as(y) (LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`): as reshape, with the channel
    width taken from y: coupled with y's channels when y carries them on the same dim, pinned otherwise."""
    arg, x = _input(b, node)
    if isinstance(x, ParamRef):
        return b.unknown(node, f"{_op_name(node)} of a parameter")
    if not isinstance(x, Chan):
        return x
    in_shape, out_shape = b.shape(arg), b.shape(node)
    if in_shape is None or out_shape is None:
        return b.unknown(node, f"{_op_name(node)} without shape information")
    pre, size = math.prod(in_shape[: x.axis]), in_shape[x.axis]
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) == pre and out_shape[k] == size:
            other = b.val(node.args[1])
            if isinstance(other, Chan) and other.axis == k and len(other) == len(x):
                b.atoms.union_pairwise(other.atoms, x.atoms)
            elif size > 1:
                b.atoms.block(x.atoms, f"{node.name}: {_op_name(node)} a tensor of fixed channel width")
            return Chan(k, x.atoms)
    return b.unknown(node, f"{_op_name(node)} {list(in_shape)} -> {list(out_shape)} splits or mixes the channel dim")


def expand(b, node):
    """x.expand(*sizes): the channel dim keeps its width only when the code writes -1 for it; a literal or computed
    width pins the channels. A size-1 dim expanded to the channel width is not a channel dim of x."""
    arg, x = _input(b, node)
    if isinstance(x, ParamRef):  # `self.cls_token.expand(B, -1, -1)`: a view when every wide dim is written -1
        out_shape, args = b.shape(node), _shape_args(node)
        if out_shape is None or args is None or len(out_shape) != len(x.shape) or len(args) != len(out_shape) or \
                any(n > 1 and not (isinstance(a, int) and a == -1) for n, a in zip(x.shape, args)):
            return b.unknown(node, "expand of a parameter")
        return x.view(out_shape, list(range(len(out_shape))))
    if not isinstance(x, Chan):
        return x
    in_shape, out_shape = b.shape(arg), b.shape(node)
    if in_shape is None or out_shape is None:
        return b.unknown(node, "expand without shape information")
    axis = x.axis + len(out_shape) - len(in_shape)
    if out_shape[axis] != len(x):
        return b.unknown(node, "expand of the channel dim")
    fixed = _fixed_size(node, axis, len(out_shape)) if len(x) > 1 else None
    if fixed and not _follows_count(b, node, axis, x.atoms):
        b.atoms.block(x.atoms, f"{node.name}: expand gives the channel dim {fixed}")
    return Chan(axis, x.atoms)


# permute/transpose/unsqueeze/squeeze move the channel axis; on a parameter they make a view of it (ParamRef.view).


def _param_moved(b, node, ref: ParamRef, order: list):
    """A parameter seen through a permutation/insertion/removal of dims: `order[i]` is the source dim of output
    dim i (None for an inserted size-1 dim)."""
    shape = b.shape(node)
    if shape is None or len(shape) != len(order):
        return b.unknown(node, f"{_op_name(node)} of a parameter without shape information")
    return ref.view(shape, order)


def permute(b, node):
    arg, x = _input(b, node)
    if not isinstance(x, (Chan, ParamRef)):
        return x
    dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    ndim = len(dims)
    dims = [d % ndim for d in dims]
    if isinstance(x, ParamRef):
        return _param_moved(b, node, x, dims)
    return Chan(dims.index(x.axis), x.atoms)


def transpose(b, node):
    arg, x = _input(b, node)
    if not isinstance(x, (Chan, ParamRef)):
        return x
    ndim = len(x.shape) if isinstance(x, ParamRef) else _ndim(b, arg)
    d0, d1 = _arg(node, 1, "dim0") % ndim, _arg(node, 2, "dim1") % ndim
    if isinstance(x, ParamRef):
        order = list(range(ndim))
        order[d0], order[d1] = d1, d0
        return _param_moved(b, node, x, order)
    axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
    return Chan(axis, x.atoms)


def unsqueeze(b, node):
    arg, x = _input(b, node)
    if not isinstance(x, (Chan, ParamRef)):
        return x
    dim = _arg(node, 1, "dim") % _ndim(b, node)
    if isinstance(x, ParamRef):
        order: list = list(range(len(x.shape)))
        order.insert(dim, None)
        return _param_moved(b, node, x, order)
    return Chan(x.axis + 1 if dim <= x.axis else x.axis, x.atoms)


def squeeze(b, node):
    arg, x = _input(b, node)
    if not isinstance(x, (Chan, ParamRef)):
        return x
    in_shape = x.shape if isinstance(x, ParamRef) else b.shape(arg)
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = [d for d, s in enumerate(in_shape) if s == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = {d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1}
    if isinstance(x, ParamRef):
        return _param_moved(b, node, x, [d for d in range(len(in_shape)) if d not in dims])
    if x.axis in dims:
        return b.unknown(node, "squeeze of a one-channel dim")
    return Chan(x.axis - sum(1 for d in dims if d < x.axis), x.atoms)


def reduce(b, node):
    """mean/sum/amax/... over dims that do not include the channel dim (global pooling written as x.mean((2, 3)))."""
    arg, x = _input(b, node)
    meta = node.meta.get("tensor_meta")
    pair = meta is not None and not hasattr(meta, "shape")  # max/min with a dim return (values, indices)
    if isinstance(x, ParamRef):
        return b.unknown(node, "reduction of a parameter")
    if not isinstance(x, Chan):
        return (x, x) if pair else x
    in_shape = b.shape(arg)
    dims = _arg(node, 1, "dim")
    keepdim = _arg(node, 2, "keepdim", False)
    if dims is None:
        return b.unknown(node, "reduction over all dims, channels included")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {d % len(in_shape) for d in dims}
    if x.axis in dims:
        return b.unknown(node, "reduction over the channel dim")
    out = Chan(x.axis if keepdim else x.axis - sum(1 for d in dims if d < x.axis), x.atoms)
    return (out, out) if pair else out


def _softmax(b, node, dim):
    arg, x = _input(b, node)
    if isinstance(x, ParamRef):
        return b.unknown(node, "softmax of a parameter")
    if not isinstance(x, Chan):
        return x
    if dim is None or dim % _ndim(b, arg) == x.axis:
        return b.unknown(node, "softmax over the channel dim")
    return x


def softmax(b, node):
    return _softmax(b, node, _arg(node, 1, "dim"))


# ---- norms written as function calls (inside module subclasses that override forward) ----------------------------
#
# F.batch_norm, F.instance_norm, F.group_norm and F.layer_norm take their per-channel tensors as arguments. When
# those are parameters or buffers (get_attr: ParamRef), they are sliced with the channel. When they all belong to one
# norm module of the matching kind (timm's BatchNormAct2d, a GroupNorm or LayerNorm subclass), the module gets a
# 'norm' slot, so surgery also updates its size attributes (num_features, num_groups, normalized_shape) and
# criteria see it as a norm; the forward is trusted to pass those attributes, as the base class's forward does.
# Sizes that are constants of the code (a literal num_groups or normalized_shape with parameters that belong to no
# such module) cannot follow a pruned width: the channels are pinned, naming the node.


def _norm_tensors(b, node, x: Chan, names: dict):
    """The per-channel tensor arguments of a functional norm (`names`: argument name -> position) as
    {name: ParamRef}; a reason string when one is not a 1-D parameter of the channel width (a computed tensor)."""
    refs = {}
    for name, index in names.items():
        arg = _arg(node, index, name)
        if arg is None:
            continue
        value = b.val(arg)
        if not isinstance(value, ParamRef):
            return f"{name} is computed in the forward, not a parameter"
        if len(value.shape) != 1 or value.shape[0] != len(x) or value.param_dim(0) is None:
            return f"{name} is not a per-channel vector"
        refs[name] = value
    return refs


def _norm_slots(b, node, x: Chan, refs: dict, module_type: type, attrs: tuple) -> nn.Module | None:
    """Slot the norm's tensors: one 'norm' slot when they are `attrs` of a single `module_type` module (returned),
    else one 'param' slot per tensor (None returned). Without tensors (affine=False), the module whose forward
    makes the call counts, if it is a `module_type`."""
    owners = {b.param_ref(ref) for ref in refs.values()}
    modules = {owner for owner, _ in owners} if refs else {owner_of(node)}
    if len(modules) == 1 and all(attr in attrs for _, attr in owners):
        (name,) = modules
        module = b.modules.get(name)
        if isinstance(module, module_type):
            b.slot(name, "norm", x.atoms)
            return module
    for ref in refs.values():
        owner, attr = b.param_ref(ref)
        b.slot(owner, "param", x.atoms, param=attr, dim=ref.param_dim(0))
    return None


_NORM_ARGS = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}  # same positions in both functions


def batch_norm_fn(b, node):
    """F.batch_norm / F.instance_norm(input, running_mean, running_var, weight, bias, ...): per-channel tensors on
    dim 1, no sizes in the call."""
    instance = node.target is F.instance_norm
    what = "instance_norm" if instance else "batch_norm"
    x = _layer_input(b, node, 1, what)
    if x is None or x.axis != 1:
        return b.unknown(node, f"{what} on a tensor whose channels are not on dim 1")
    refs = _norm_tensors(b, node, x, _NORM_ARGS)
    if isinstance(refs, str):
        return b.unknown(node, f"{what}: {refs}")
    kind = nn.modules.instancenorm._InstanceNorm if instance else nn.modules.batchnorm._BatchNorm
    module = _norm_slots(b, node, x, refs, kind, tuple(_NORM_ARGS))
    if module is not None and module.num_features != len(x):
        b.atoms.block(x.atoms, f"{node.name}: {what} with the tensors of a module of another width")
    return x


def group_norm_fn(b, node):
    """F.group_norm(input, num_groups, weight, bias, eps): as the GroupNorm module (whole groups go) when weight and
    bias are a GroupNorm's own and num_groups is its num_groups (surgery updates it). Otherwise num_groups is a
    constant of the code: it cannot shrink with the groups, so the channels are pinned."""
    x = _layer_input(b, node, 1, "group_norm")
    groups = _arg(node, 1, "num_groups")
    if x is None or x.axis != 1 or not isinstance(groups, int) or groups < 1 or len(x) % groups:
        return b.unknown(node, "group_norm on a tensor whose channels are not on dim 1, or with computed groups")
    refs = _norm_tensors(b, node, x, {"weight": 2, "bias": 3})
    if isinstance(refs, str):
        return b.unknown(node, f"group_norm: {refs}")
    _union_rows(b, x.atoms.reshape(groups, -1))  # each group is one class, as for the module
    module = _norm_slots(b, node, x, refs, nn.GroupNorm, ("weight", "bias"))
    if module is None or module.num_groups != groups or module.num_channels != len(x):
        b.atoms.block(x.atoms, f"{node.name}: group_norm with a fixed number of groups ({groups})")
    return x


def layer_norm_fn(b, node):
    """F.layer_norm(x, normalized_shape, weight, bias): as the LayerNorm module, with the parameters read by
    get_attr (torchvision's and timm's LayerNorm2d permute channels last and call it). Over the channel dim, the
    normalized_shape is a size in the call: it follows the pruning only when weight and bias are a LayerNorm's own
    and the call passes its normalized_shape (surgery updates it); otherwise the channels are pinned."""
    arg, value = _input(b, node)
    ndim = _ndim(b, arg)
    normalized = _arg(node, 1, "normalized_shape")
    if ndim is None or not isinstance(normalized, (list, tuple)) or not all(isinstance(n, int) for n in normalized):
        return b.unknown(node, "layer_norm with a computed normalized_shape")
    if isinstance(value, Chan) and value.axis < ndim - len(normalized):
        return value  # channels are not normalized over: per-channel nothing changes
    x = _layer_input(b, node, -1, "layer_norm")
    if x is None or len(normalized) != 1 or x.axis != ndim - 1:
        return b.unknown(node, "layer_norm over the channel dim and others together")
    refs = _norm_tensors(b, node, x, {"weight": 2, "bias": 3})
    if isinstance(refs, str):
        return b.unknown(node, f"layer_norm: {refs}")
    module = _norm_slots(b, node, x, refs, nn.LayerNorm, ("weight", "bias"))
    if module is None or tuple(module.normalized_shape) != tuple(normalized):
        b.atoms.block(x.atoms, f"{node.name}: layer_norm with a fixed normalized_shape {list(normalized)}")
    return x


# ---- tables ------------------------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Threshold, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)
# Spatial ops by how many trailing dims they work over (None: all dims after batch and channel, as Upsample).
_SPATIAL_MODULES: dict = {
    **{getattr(nn, f"{kind}{k}d"): k for k in (1, 2, 3) for kind in (
        "MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool", "ZeroPad", "ReflectionPad",
        "ReplicationPad", "ConstantPad", "CircularPad") if hasattr(nn, f"{kind}{k}d")},
    nn.Upsample: None, nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}

MODULE_RULES: dict = {
    nn.Conv1d: conv, nn.Conv2d: conv, nn.Conv3d: conv,
    nn.ConvTranspose1d: conv, nn.ConvTranspose2d: conv, nn.ConvTranspose3d: conv,
    nn.Linear: linear,
    nn.modules.batchnorm._BatchNorm: batchnorm,
    nn.modules.instancenorm._InstanceNorm: batchnorm,
    nn.GroupNorm: groupnorm,
    nn.LayerNorm: layernorm,
    nn.PReLU: prelu,
    nn.Flatten: flatten_module,
    nn.Softmax: softmax_module,
    nn.LogSoftmax: softmax_module,
    **{cls: passthrough for cls in _ELEMENTWISE_MODULES},
    **{cls: _spatial(k) for cls, k in _SPATIAL_MODULES.items()},
}

_ELEMENTWISE_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.exp, torch.abs, torch.neg, operator.neg,
    torch.clamp, torch.clip, torch.erf, torch.sqrt, torch.rsqrt, torch.square, F.logsigmoid, torch.nn.functional.threshold,
)
_SPATIAL_FUNCTIONS: dict = {
    **{getattr(F, f"{kind}{k}d"): k for k in (1, 2, 3) for kind in (
        "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool") if hasattr(F, f"{kind}{k}d")},
    **{getattr(torch, f"{kind}{k}d"): k for k in (1, 2, 3) for kind in (
        "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool") if hasattr(torch, f"{kind}{k}d")},
    F.interpolate: None, F.upsample: None, F.upsample_nearest: None, F.upsample_bilinear: None,
}

FUNCTION_RULES: dict = {
    **{fn: passthrough for fn in _ELEMENTWISE_FUNCTIONS},
    **{fn: _spatial(k) for fn, k in _SPATIAL_FUNCTIONS.items()},
    operator.add: binary, operator.sub: binary, operator.mul: binary, operator.truediv: binary,
    operator.iadd: binary, operator.isub: binary, operator.imul: binary, operator.itruediv: binary,
    torch.add: binary, torch.sub: binary, torch.mul: binary, torch.div: binary, torch.maximum: binary,
    torch.minimum: binary,
    operator.floordiv: binary, operator.mod: binary,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.chunk: split, torch.split: split, torch.tensor_split: split,
    operator.getitem: getitem,
    F.pad: pad,
    torch.flatten: flatten_fn,
    torch.reshape: reshape,
    torch.permute: permute, torch.transpose: transpose, torch.swapaxes: transpose,
    torch.unsqueeze: unsqueeze, torch.squeeze: squeeze,
    torch.mean: reduce, torch.sum: reduce, torch.amax: reduce, torch.amin: reduce,
    F.softmax: softmax, torch.softmax: softmax, F.log_softmax: softmax,
    F.layer_norm: layer_norm_fn, F.batch_norm: batch_norm_fn, F.instance_norm: batch_norm_fn,
    F.group_norm: group_norm_fn,
    torch.unbind: unbind, F.scaled_dot_product_attention: attention, torch.roll: roll,
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul,
    builtins.getattr: size, torch._assert: no_tensor,
    **{op: compare for op in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)},
}

try:  # torchvision's fx-wrapped helpers appear as call_function nodes
    import torchvision.ops

    FUNCTION_RULES[torchvision.ops.stochastic_depth] = passthrough
except Exception:  # torchvision missing or broken: its models cannot be built either
    pass

METHOD_RULES: dict = {
    **{m: passthrough for m in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "half",
        "double", "to", "type", "type_as", "clamp", "clamp_", "clamp_min", "clamp_max", "exp", "abs", "neg", "sqrt",
        "square", "hardtanh_")},
    **{m: binary for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__mul__")},
    "chunk": split, "split": split, "tensor_split": split,
    "expand": expand, "expand_as": binary,
    "flatten": flatten_fn,
    "view": reshape, "reshape": reshape,
    "permute": permute, "transpose": transpose, "swapaxes": transpose,
    "unsqueeze": unsqueeze, "squeeze": squeeze,
    "mean": reduce, "sum": reduce, "amax": reduce, "amin": reduce,
    "softmax": softmax,
    "size": size, "dim": no_tensor, "numel": no_tensor,
    "unbind": unbind, "matmul": matmul, "bmm": matmul, "roll": roll,
    "reshape_as": reshape_as, "view_as": reshape_as,
    **{m: fresh for m in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")},
    "bernoulli_": passthrough, "bernoulli": passthrough,
}


# Ops whose output has the input's shape: shape propagation skips computing them (on the meta device several of
# them run through slow Python decompositions).
SHAPE_PRESERVING_MODULES = (*_ELEMENTWISE_MODULES, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
SHAPE_PRESERVING_FUNCTIONS = frozenset(_ELEMENTWISE_FUNCTIONS)
# (not .contiguous(): a later .view() needs the layout it produces)
SHAPE_PRESERVING_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "detach", "hardtanh_",
                                      "clamp", "clamp_"})


# Methods a module's forward delegates to: a subclass overriding any of them computes something else than its base.
_FORWARD_PATH = ("forward", "_conv_forward", "_output_padding")


def runs_rule_forward(cls: type, rule_types) -> bool:
    """True when `cls` (a subclass of a class with a module rule) runs that class's own forward, so the rule
    describes it: no class between `cls` and the nearest rule class overrides a method on the forward path.
    A subclass that does (timm's BatchNormAct2d, a LayerNorm2d permuting around F.layer_norm) is traced instead
    and its functional calls are handled by the function rules."""
    rule_types = tuple(rule_types)
    for klass in cls.__mro__:
        if klass in rule_types:
            return True
        if any(name in vars(klass) for name in _FORWARD_PATH):
            return False
    return False


def library_module_rules() -> dict:
    """Rules for well-known blocks outside torch.nn, for libraries this process has already imported (dpruner never
    imports them itself). They are traced as leaves: torchvision's StochasticDepth scales whole samples (never mixes
    channels), and as a leaf it keeps EfficientNet's train-mode graph identical to eval mode (one trace, not two)."""
    rules: dict = {}
    ops = sys.modules.get("torchvision.ops")
    if ops is not None and hasattr(ops, "StochasticDepth"):
        rules[ops.StochasticDepth] = passthrough
    # timm's weight-standardised convs (NFNet, BiT): a Conv2d whose forward standardises each filter (over its own
    # inputs) before F.conv2d. As a conv: output filters are independent; removing inputs re-standardises each
    # filter over the inputs it keeps (weight standardisation makes that inherent), and the per-filter `gain` is
    # sliced with the outputs (surgery.layers.resize_conv).
    std = sys.modules.get("timm.layers.std_conv")
    for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
        if std is not None and hasattr(std, name):
            rules[getattr(std, name)] = conv
    return rules
