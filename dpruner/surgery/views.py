"""Weights of a channel group, laid out per channel, for criteria: the one place besides layers.py that knows
weight layouts, so criteria never branch on layer types."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """

    group: Group
    filters: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator | None = None


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
    dense = torch.as_tensor(index.roots.searchsorted(group.channels))
    for key in group.slots:
        slot = graph.slots[key]
        if slot.role == "param":
            continue
        module = graph.modules.get(slot.module)
        rows = _rows(module, slot.role) if module is not None else None
        if rows is None:
            continue
        classes = torch.as_tensor(index.slot_classes[key])
        per_channel = []
        for c in dense.tolist():
            positions = torch.nonzero(classes == c).flatten()
            per_channel.append(rows[positions].reshape(-1))
        width = max(t.numel() for t in per_channel)
        matrix = torch.stack([torch.nn.functional.pad(t, (0, width - t.numel())) for t in per_channel])
        if slot.role == "out":
            out.filters.append(matrix)
        elif slot.role == "norm":
            out.norms.append(matrix.abs().mean(dim=1))
        else:
            out.inputs.append(matrix)
    return out
