"""Pruning plans as plain data, and applying them.

A plan lists, for every module that changes, the indices it keeps per role; for every coupled parameter the dim
and kept indices; and for every F.pad on the channel dim its new widths. It is JSON-able and `weights_only`-safe,
so a checkpoint can store it and dpruner can replay it on a freshly built model (the weights then load on top).

    {"version": 1,
     "modules": {"layer1.0.conv1": {"out": [0, 2, ...], "in": [...]}, "layer1.0.bn1": {"norm": [...]}},
     "params": {"encoder.pos_embedding": {"dim": 2, "keep": [...]}},
     "pads": [{"owner": "layer2.0.shortcut", "order": 0, "pair": 2, "before": 6, "after": 5}],
     "attrs": [{"owner": "blocks.0.attn", "attr": "num_heads", "old": 3, "new": 2}]}

"attrs" (sizes the forward code reads from module attributes, see graph.build.AttrSite) may be absent: plans
written before it existed have none.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from dpruner.errors import CheckpointError, UnsupportedError
from dpruner.graph.build import DependencyGraph
from dpruner.graph.groups import ChannelIndex
from dpruner.surgery.layers import RESIZERS, resize, select_param

PLAN_VERSION = 1


class PlanError(ValueError):
    """A pruning plan that is malformed or does not fit the model; the text names the entry at fault."""


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
    attrs = []
    for site in graph.attrs.values():
        kept = int((~removed[np.searchsorted(index.roots, graph.atoms.roots(site.atoms))]).sum())
        if kept != len(site.atoms):
            entry = {"owner": site.owner, "attr": site.attr, "old": len(site.atoms), "new": kept}
            attrs.append(entry if site.index is None else {**entry, "index": site.index})
    plan = {"version": PLAN_VERSION, "modules": dict(sorted(modules.items())), "params": dict(sorted(params.items())),
            "pads": sorted(pads, key=lambda p: (p["owner"], p["order"]))}
    if attrs:
        plan["attrs"] = sorted(attrs, key=lambda a: (a["owner"], a["attr"], a.get("index", -1)))
    return plan


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Resize the model in place as the plan says; returns the same model object. A plan that does not fit the
    model raises PlanError (checked before any surgery)."""
    validate_plan(plan, model)
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
    for site in plan.get("attrs", []):
        holder = model.get_submodule(site["owner"])
        if site.get("index") is None:
            setattr(holder, site["attr"], int(site["new"]))
        else:  # an entry of a list/tuple of sizes (split sizes): a new sequence of the same type
            current = getattr(holder, site["attr"])
            setattr(holder, site["attr"], type(current)(int(site["new"]) if i == site["index"] else v
                                                         for i, v in enumerate(current)))
    return model


def validate_plan(plan, model: nn.Module) -> None:
    """Check a plan (e.g. one read from a file) against the model it is about to resize: every module, role,
    parameter and index exists and is in range, sorted and unique. Raises PlanError naming the entry."""
    if not isinstance(plan, Mapping):
        raise PlanError(f"the plan is a {type(plan).__name__}, not a dict")
    version = plan.get("version")
    if type(version) is not int or version != PLAN_VERSION:
        raise PlanError(f"plan version {_clip(repr(version))} is not supported (expected {PLAN_VERSION})")
    modules, params, pads = plan.get("modules", {}), plan.get("params", {}), plan.get("pads", [])
    for key, value, kind in (("modules", modules, Mapping), ("params", params, Mapping), ("pads", pads, list)):
        if not isinstance(value, kind):
            raise PlanError(f"'{key}' is a {type(value).__name__}, not a {'dict' if kind is Mapping else 'list'}")
    named = dict(model.named_modules())
    for name, keep in modules.items():
        where = f"modules[{_clip(repr(name))}]"
        if not isinstance(name, str) or name not in named:
            raise PlanError(f"{where} names a module the model does not have")
        module = named[name]
        sizes = _role_sizes(module)
        if sizes is None:
            raise PlanError(f"{where} names a {type(module).__name__}, which dpruner does not resize")
        if not isinstance(keep, Mapping):
            raise PlanError(f"{where} is a {type(keep).__name__}, not a dict of kept indices per role")
        for role, idx in keep.items():
            if role not in sizes:
                raise PlanError(f"{where} has role {_clip(repr(role))}; a {type(module).__name__} has "
                                f"{', '.join(map(repr, sizes))}")
            _check_indices(idx, sizes[role], f"{where}[{role!r}]")
        _check_groups(module, keep, where)
    for target, spec in params.items():
        where = f"params[{_clip(repr(target))}]"
        owner, _, attr = target.rpartition(".") if isinstance(target, str) else ("", "", "")
        holder = named.get(owner)
        tensor = getattr(holder, attr, None) if holder is not None and attr else None
        if not isinstance(tensor, torch.Tensor) or (attr not in holder._parameters and attr not in holder._buffers):
            raise PlanError(f"{where} names a parameter the model does not have")
        if not isinstance(spec, Mapping) or not _is_int(spec.get("dim")) or not -tensor.dim() <= spec["dim"] < tensor.dim():
            raise PlanError(f"{where} needs a 'dim' within the parameter's {tensor.dim()} dims and a 'keep' list")
        _check_indices(spec.get("keep"), tensor.shape[spec["dim"]], f"{where}['keep']")
    attrs = plan.get("attrs", [])
    if not isinstance(attrs, list):
        raise PlanError(f"'attrs' is a {type(attrs).__name__}, not a list")
    for i, site in enumerate(attrs):
        where = f"attrs[{i}]"
        if not isinstance(site, Mapping):
            raise PlanError(f"{where} is a {type(site).__name__}, not a dict")
        owner, attr = site.get("owner"), site.get("attr")
        holder = named.get(owner) if isinstance(owner, str) else None
        if holder is None or not isinstance(attr, str) or attr.startswith("_") or attr not in vars(holder):
            raise PlanError(f"{where} names a module attribute the model does not have")
        current, old, new, entry = vars(holder)[attr], site.get("old"), site.get("new"), site.get("index")
        if entry is not None:
            if not isinstance(current, (list, tuple)) or not _is_int(entry) or not 0 <= entry < len(current):
                raise PlanError(f"{where}['index'] is not an entry of {owner}.{attr}")
            current = current[entry]
        if type(current) is not int or not _is_int(old) or current != old:
            raise PlanError(f"{where}: {owner}.{attr} is {_clip(repr(current))}, not the plan's {_clip(repr(old))}")
        if not _is_int(new) or not 1 <= new <= old:
            raise PlanError(f"{where}['new'] must be an integer from 1 to {old}, not {_clip(repr(new))}")
    for i, site in enumerate(pads):
        where = f"pads[{i}]"
        if not isinstance(site, Mapping):
            raise PlanError(f"{where} is a {type(site).__name__}, not a dict")
        owner = site.get("owner")
        if not isinstance(owner, str) or not owner or owner not in named:
            raise PlanError(f"{where} names an owner module the model does not have")
        for key in ("order", "pair", "before", "after"):
            if not _is_int(site.get(key)) or site[key] < 0:
                raise PlanError(f"{where}[{key!r}] must be a non-negative integer, not {_clip(repr(site.get(key)))}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _role_sizes(module: nn.Module) -> dict[str, int] | None:
    """How many indices each role of a resizable module has (None: dpruner has no resizer for it)."""
    if not any(cls in RESIZERS for cls in type(module).__mro__):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"in": module.in_channels, "out": module.out_channels}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if isinstance(module, nn.GroupNorm):
        return {"norm": module.num_channels}
    if isinstance(module, nn.LayerNorm):
        return {"norm": module.normalized_shape[0]}
    if isinstance(module, nn.PReLU):
        return {"norm": module.num_parameters}
    return {"norm": module.num_features}  # batch and instance norms


def _check_indices(idx, size: int, where: str) -> None:
    if not isinstance(idx, (list, tuple)):
        raise PlanError(f"{where} is a {type(idx).__name__}, not a list of indices")
    if not idx:
        raise PlanError(f"{where} keeps nothing")
    previous = -1
    for i in idx:
        if not _is_int(i):
            raise PlanError(f"{where} holds {_clip(repr(i))}, not an integer index")
        if not 0 <= i < size:
            raise PlanError(f"{where} holds index {_clip(repr(i))}, outside 0..{size - 1}")
        if i <= previous:
            raise PlanError(f"{where} repeats an index or is out of order at {i}")
        previous = i


def _check_groups(module: nn.Module, keep: Mapping, where: str) -> None:
    """Grouped convs and GroupNorm lose whole groups only (the resizers assume it)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        per_out, per_in = module.out_channels // module.groups, module.in_channels // module.groups
        new_out = len(keep.get("out", range(module.out_channels)))
        new_in = len(keep.get("in", range(module.in_channels)))
        if new_out % per_out or new_in != new_out // per_out * per_in:
            raise PlanError(f"{where} would split a group of the grouped {type(module).__name__}")
    if isinstance(module, nn.GroupNorm) and "norm" in keep:
        if len(keep["norm"]) % (module.num_channels // module.num_groups):
            raise PlanError(f"{where} would split a group of the GroupNorm")


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
    graph = tracer.trace_quietly(module)
    pads = [n for n in graph.nodes if n.op == "call_function" and n.target is F.pad and _owner_is_self(n)]
    for site in sites:
        if site["order"] >= len(pads):
            raise PlanError(f"the plan rewrites F.pad call {site['order']} of '{owner}', which makes {len(pads)}")
        node = pads[site["order"]]
        widths = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        if 2 * site["pair"] + 1 >= len(widths) or any(
            isinstance(old, int) and new > old  # pruning only narrows a pad: a wider one (maybe huge) is damage
            for new, old in ((site["before"], widths[2 * site["pair"]]), (site["after"], widths[2 * site["pair"] + 1]))
        ):
            raise PlanError(f"the plan's pad widths for '{owner}' do not fit its F.pad call {site['order']}")
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
