"""A fast estimate of MACs and parameters after removing a set of channels, for searching a plan.

Per resized module: fvcore's MACs scale with the kept share of its input and output channels (a grouped conv only
with its input share, since it loses whole groups); parameter counts are recomputed from the new shapes. Everything
else (pooling, element-wise ops counted by fvcore, untouched layers) stays as measured. The planner checks the
final plan with fvcore itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from dpruner.graph.build import DependencyGraph
from dpruner.graph.groups import ChannelIndex

TARGET_INDEX = {"macs": 0, "params": 1, "latency": 2}  # position of each target in CostModel.estimate's tuple


@dataclass
class _Term:
    name: str
    base_macs: float
    base_params: int
    size_in: int
    size_out: int
    cls_in: np.ndarray | None
    cls_out: np.ndarray | None
    kind: str  # 'conv', 'gconv', 'linear', 'norm'
    kernel: int = 1
    bias: bool = False
    norm_params: int = 0  # parameters per channel of a norm layer


@dataclass
class CostModel:
    terms: list[_Term]
    params_terms: list[tuple[np.ndarray, int]]  # (class per position, numel per position) of coupled parameters
    fixed_macs: float
    fixed_params: int
    total_macs: float
    total_params: int
    latency: "LatencyTable | None" = None  # --target latency: per-layer measured latency over widths

    def estimate(self, removed: np.ndarray) -> tuple[float, float, float]:
        """(MACs, params, latency in ms) with the classes flagged in `removed` (bool per dense class index) gone;
        latency is NaN without a latency table."""
        macs, params = self.fixed_macs, float(self.fixed_params)
        widths = {}
        for t in self.terms:
            kin = t.size_in - int(removed[t.cls_in].sum()) if t.cls_in is not None else t.size_in
            kout = t.size_out - int(removed[t.cls_out].sum()) if t.cls_out is not None else t.size_out
            widths[t.name] = (kin, kout)
            if t.kind == "norm":
                macs += t.base_macs * kout / max(t.size_out, 1)
                params += t.norm_params * kout
            elif t.kind == "gconv":
                share = kin / max(t.size_in, 1)
                macs += t.base_macs * share
                params += (t.base_params - (t.size_out if t.bias else 0)) * share + (kout if t.bias else 0)
            else:
                macs += t.base_macs * (kin / max(t.size_in, 1)) * (kout / max(t.size_out, 1))
                params += kin * kout * t.kernel + (kout if t.bias else 0)
        for cls, per_position in self.params_terms:
            params += float((~removed[cls]).sum()) * per_position
        latency = self.latency.predict(widths) if self.latency is not None else float("nan")
        return macs, params, latency


def build_cost_model(model: nn.Module, graph: DependencyGraph, index: ChannelIndex, macs_by_module: dict,
                     total_macs: float) -> CostModel:
    """Collect, per resizable module, its measured MACs, parameter layout and the classes of its positions."""
    slots_by_module: dict[str, dict[str, np.ndarray]] = {}
    params_terms = []
    covered_params = 0
    for key, slot in graph.slots.items():
        classes = index.slot_classes[key]
        if slot.role == "param":
            owner = model.get_submodule(slot.module) if slot.module else model
            tensor = getattr(owner, slot.param)
            if isinstance(tensor, nn.Parameter):  # buffers are not parameters: they cost nothing here
                params_terms.append((classes, tensor.numel() // tensor.shape[slot.dim]))
                covered_params += tensor.numel()
            continue
        slots_by_module.setdefault(slot.module, {})[slot.role] = classes
    terms = []
    covered_macs = 0.0
    for name, roles in slots_by_module.items():
        m = graph.modules[name]
        own_params = sum(p.numel() for p in m.parameters(recurse=False))
        base = float(macs_by_module.get(name, 0))
        if isinstance(m, nn.modules.conv._ConvNd):
            kind = "gconv" if m.groups > 1 else "conv"
            term = _Term(name, base, own_params, m.in_channels, m.out_channels, roles.get("in"), roles.get("out"),
                         kind, kernel=math.prod(m.kernel_size), bias=m.bias is not None)
        elif isinstance(m, nn.Linear):
            term = _Term(name, base, own_params, m.in_features, m.out_features, roles.get("in"), roles.get("out"),
                         "linear", bias=m.bias is not None)
        else:
            classes = roles.get("norm")
            size = len(classes) if classes is not None else 0
            term = _Term(name, base, own_params, size, size, None, classes, "norm",
                         norm_params=own_params // max(size, 1))
        terms.append(term)
        covered_macs += base
        covered_params += own_params
    total_params = sum(p.numel() for p in model.parameters())
    return CostModel(terms, params_terms, total_macs - covered_macs, total_params - covered_params, total_macs,
                     total_params)
