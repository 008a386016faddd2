"""Pruning plans as plain data, and applying them.

A plan lists, for every module that changes, the indices it keeps per role; for every coupled parameter the dim
and kept indices; and for every F.pad on the channel dim its new widths. It is JSON-able and `weights_only`-safe,
so a checkpoint can store it and dpruner can replay it on a freshly built model (the weights then load on top).

    {"version": 1,
     "modules": {"layer1.0.conv1": {"out": [0, 2, ...], "in": [...]}, "layer1.0.bn1": {"norm": [...]}},
     "params": {"encoder.pos_embedding": {"dim": 2, "keep": [...]}},
     "pads": [{"owner": "layer2.0.shortcut", "order": 0, "pair": 2, "before": 6, "after": 5}]}
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from dpruner.errors import CheckpointError, UnsupportedError
from dpruner.graph.build import DependencyGraph
from dpruner.graph.groups import ChannelIndex
from dpruner.surgery.layers import resize, select_param

PLAN_VERSION = 1


def make_plan(graph: DependencyGraph, index: ChannelIndex, removed_roots) -> dict:
    """The plan that removes the given channels (class roots)."""
    removed_set = {int(r) for r in removed_roots}
    removed = np.zeros(len(index.roots), dtype=bool)
    if removed_set:
        removed[np.searchsorted(index.roots, np.asarray(sorted(removed_set)))] = True
    modules: dict[str, dict[str, list[int]]] = {}
    params: dict[str, dict] = {}
    for key, slot in graph.slots.items():
        keep_mask = ~removed[index.slot_classes[key]]
        if keep_mask.all():
            continue
        kept = np.nonzero(keep_mask)[0].tolist()
        if slot.role == "param":
            params[f"{slot.module}.{slot.param}" if slot.module else slot.param] = {"dim": slot.dim, "keep": kept}
        else:
            modules.setdefault(slot.module, {})[slot.role] = kept
    pads = []
    for site in graph.pads.values():
        before, after = (sum(r not in removed_set for r in graph.atoms.roots(zeros).tolist())
                         for zeros in (site.before, site.after))
        if before != len(site.before) or after != len(site.after):
            pads.append({"owner": site.owner, "order": site.order, "pair": site.pair, "before": before, "after": after})
    return {"version": PLAN_VERSION, "modules": dict(sorted(modules.items())), "params": dict(sorted(params.items())),
            "pads": sorted(pads, key=lambda p: (p["owner"], p["order"]))}


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Resize the model in place as the plan says; returns the same model object."""
    if plan.get("version") != PLAN_VERSION:
        raise CheckpointError(f"pruning plan version {plan.get('version')} is not supported (expected {PLAN_VERSION}).")
    named = dict(model.named_modules())
    for name, keep in plan.get("modules", {}).items():
        if name not in named:
            raise CheckpointError(f"the pruning plan names module '{name}', which the model does not have.")
        resize(named[name], {role: torch.as_tensor(idx, dtype=torch.long) for role, idx in keep.items()})
    for target, spec in plan.get("params", {}).items():
        owner, _, attr = target.rpartition(".")
        select_param(model.get_submodule(owner) if owner else model, attr, spec["dim"],
                     torch.as_tensor(spec["keep"], dtype=torch.long))
    by_owner: dict[str, list[dict]] = {}
    for site in plan.get("pads", []):
        by_owner.setdefault(site["owner"], []).append(site)
    for owner, sites in by_owner.items():
        _rewrite_pads(model, owner, sites)
    return model


def _rewrite_pads(model: nn.Module, owner: str, sites: list[dict]) -> None:
    """Replace module `owner` by a traced copy of itself whose F.pad calls use the new channel widths.

    The copy is a GraphModule holding the same submodules and parameters under the same names, so state_dict keys
    do not change; tracing is deterministic, so the k-th F.pad call here is the k-th one the graph saw.
    """
    from dpruner.graph.tracer import PruningTracer

    if not owner:
        raise UnsupportedError("an F.pad on the channel dim in the root module cannot be rewritten in place")
    parent_name, _, child = owner.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    tracer = PruningTracer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(module)
    pads = [n for n in graph.nodes if n.op == "call_function" and n.target is F.pad and _owner_is_self(n)]
    for site in sites:
        node = pads[site["order"]]
        widths = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        widths[2 * site["pair"]], widths[2 * site["pair"] + 1] = site["before"], site["after"]
        if len(node.args) > 1:
            node.args = (node.args[0], tuple(widths), *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "pad": tuple(widths)}
    rewritten = fx.GraphModule(module, graph, f"{type(module).__name__}Pruned")
    rewritten.train(module.training)
    setattr(parent, child, rewritten)


def _owner_is_self(node: fx.Node) -> bool:
    """True for nodes traced from the module's own forward, not from a child module's."""
    stack = node.meta.get("nn_module_stack")
    return not stack
