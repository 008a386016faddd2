"""Weights of a channel group, laid out per channel, for criteria: the one place besides layers.py that knows
weight layouts, so criteria never branch on layer types."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dpruner.graph.build import DependencyGraph
from dpruner.graph.groups import ChannelIndex, Group


@dataclass
class GroupTensors:
    """Per-channel weights of one group. Row i of every matrix belongs to channel i of the group.

    filters: one (n, d) matrix per producing layer: all weights computing the channel (a grouped conv's class spans
      several rows; they are concatenated).
    norms: one (n,) vector per norm layer: |gamma| of the channel (mean over its positions).
    inputs: one (n, d) matrix per consuming layer: the weights that read the channel.
    stats: per-channel statistics gathered on data, by name ('taylor', 'activation'), when a criterion needs them.
    """

    group: Group
    filters: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator | None = None
    stats: dict = field(default_factory=dict)  # per-channel statistics gathered on data (criteria.stats)


def _rows(module: nn.Module, role: str) -> torch.Tensor | None:
    """The module's weight with the `role` dim first, flattened to (positions, -1)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    w = weight.detach().float()
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if role == "out":
            if transposed:  # (in, out/g, *k): output channel j of group g lives in column j % (out/g) of rows of g
                g = module.groups
                cin, og = w.shape[0], w.shape[1]
                w = w.reshape(g, cin // g, og, -1).transpose(1, 2).reshape(g * og, -1)
                return w
            return w.reshape(w.shape[0], -1)
        if module.groups > 1:  # input channel c of a grouped conv feeds the rows of its group: summarise by group
            return None
        return (w if transposed else w.transpose(0, 1)).reshape(w.shape[1 if not transposed else 0], -1)
    if isinstance(module, nn.Linear):
        return w if role == "out" else w.t()
    return w.reshape(w.shape[0], -1)  # norms and PReLU: one value per channel


def group_tensors(model: nn.Module, graph: DependencyGraph, index: ChannelIndex, group: Group,
                  generator: torch.Generator | None = None) -> GroupTensors:
    """Gather the group's per-channel weights from the live model."""
    out = GroupTensors(group, generator=generator)
    n = len(group.channels)
    rank = np.full(len(index.roots), -1, dtype=np.int64)
    rank[index.roots.searchsorted(group.channels)] = np.arange(n)
    for key in group.slots:
        slot = graph.slots[key]
        if slot.role == "param":
            continue
        module = graph.modules.get(slot.module)
        rows = _rows(module, slot.role) if module is not None else None
        if rows is None:
            continue
        matrix = _per_channel(rows, rank[index.slot_classes[key]], n)
        if slot.role == "out":
            out.filters.append(matrix)
        elif slot.role == "norm":
            out.norms.append(matrix.abs().mean(dim=1))
        else:
            out.inputs.append(matrix)
    return out


def _per_channel(rows: torch.Tensor, channel_of_position: np.ndarray, n: int) -> torch.Tensor:
    """(n, k*d): the rows of each channel concatenated, channels in group order; channels with fewer positions
    than others (rare) are zero-padded."""
    positions = np.nonzero(channel_of_position >= 0)[0]
    channel = channel_of_position[positions]
    ordered = positions[np.argsort(channel, kind="stable")]
    counts = np.bincount(channel, minlength=n)
    if counts.min() == counts.max():
        return rows[torch.as_tensor(ordered)].reshape(n, -1)
    width = int(counts.max()) * rows.shape[1]
    matrix = rows.new_zeros(n, width)
    start = 0
    for c, k in enumerate(counts.tolist()):
        block = rows[torch.as_tensor(ordered[start : start + k])].reshape(-1)
        matrix[c, : block.numel()] = block
        start += k
    return matrix


def channel_parameters(model: nn.Module, graph: DependencyGraph, index: ChannelIndex,
                       removed: np.ndarray) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """The live parameters that compute the channels flagged in `removed` (per dense class): (tensor, dim, indices)
    for every producing layer's weight rows and bias entries, and every norm's affine entries. Gradients flow
    through them, so a penalty on them (Play-and-Prune's sparsity term) pushes exactly those channels to zero."""
    out = []
    gone = np.nonzero(removed)[0]
    for key, slot in graph.slots.items():
        if slot.role not in ("out", "norm"):
            continue
        positions = np.nonzero(np.isin(index.slot_classes[key], gone))[0]
        module = graph.modules.get(slot.module)
        if not len(positions) or module is None:
            continue
        idx = torch.as_tensor(positions)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        weight_dim = 0
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            if module.groups > 1:
                continue  # output channels are spread over (group, column) pairs: no penalty, surgery still works
            weight_dim = 1
        if isinstance(weight, nn.Parameter):
            out.append((weight, weight_dim, idx))
        if isinstance(bias, nn.Parameter):
            out.append((bias, 0, idx))
    return out
