"""What the dependency graph says about a model as a whole: its channel groups (`analyze_groups`, which `analyze`
and every pruning method start from), the share of MACs pruning can reach, the modules torch.fx could not follow,
and the error for a model with nothing prunable. Knows nothing about criteria or plans."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dpruner.errors import UnsupportedError
from dpruner.graph.build import DependencyGraph, build_graph
from dpruner.graph.groups import ChannelIndex, channel_groups


def prunable_macs_share(index: ChannelIndex, macs_by_module: dict[str, int], total: int) -> float:
    """Share of the MACs spent in layers whose channels a prunable group can change: what pruning can reach at all
    (e.g. a detector whose head is kept shows the backbone's and neck's share)."""
    touched = {name for g in index.groups if g.prunable for name in g.layers}
    return sum(own_macs(macs_by_module, name) for name in touched) / max(total, 1)


def own_macs(macs_by_module: dict[str, int], name: str) -> int:
    """MACs of a module less those of its children (a module touched only through its own parameter, such as
    the root holding ViT's position embedding, must not count the layers below it)."""
    prefix = f"{name}." if name else ""
    children = [k for k in macs_by_module if k and k != name and k.startswith(prefix) and "." not in k[len(prefix):]]
    return macs_by_module.get(name, 0) - sum(macs_by_module[k] for k in children)


def opaque_summary(graph: DependencyGraph) -> list[dict]:
    """The modules torch.fx could not follow: where and why, and whether they were kept whole (`whole`) or their
    own blocks were traced one by one (then only their inputs and outputs keep their channels). '' is the model."""
    return [{"module": name, "reason": why, "whole": name not in graph.split} for name, why in graph.opaque.items()]


def analyze_groups(model: nn.Module, example: torch.Tensor, *, exclude: Iterable[str] = (),
                   leaf_modules: Iterable[type] = ()) -> tuple[DependencyGraph, ChannelIndex]:
    """Build the dependency graph and its channel groups (what `analyze` reports as coupling)."""
    graph = build_graph(model, example, leaf_modules=tuple(leaf_modules))
    return graph, channel_groups(graph, exclude=tuple(exclude))


def nothing_prunable(index: ChannelIndex) -> UnsupportedError:
    """The error for a model none of whose channel groups may be pruned (all excluded, or unsupported)."""
    reasons = sorted({r for g in index.groups if not g.prunable for r in g.reasons[:1]})
    shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    return UnsupportedError(f"Nothing in the model can be pruned: every channel group is protected or unprunable "
                            f"({shown or 'no channel groups'}); loosen --exclude, or see `dpruner analyze` for why.")


