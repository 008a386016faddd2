"""Cached layer inputs for evaluating many variants of one model that differ only from some module on (coarse
pruning's candidate masks): the part of the forward pass that finishes before the first changed module starts is
computed once per batch and replayed for every variant, so a candidate costs only the rest of the network.

Works on any model without tracing: the modules' call order is recorded once with forward hooks; a module is
replayed when it ran exactly once and finished before the first changed module started (nothing it computed can
depend on the change), and only the outermost such modules are replayed. Outputs are cloned when recorded and when
replayed, since later in-place ops (`out += identity`, ReLU(inplace=True)) would otherwise edit the cache.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
from torch import nn


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class Prefix:
    """The call spans of `model`'s submodules on `x` (one forward), from which `clean` picks what to replay."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model = model
        self.modules = {name: m for name, m in model.named_modules() if name}
        clock = itertools.count()
        self.spans: dict[str, list[list[int]]] = {}
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self.spans.setdefault(name, []).append([next(clock), -1])))
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: self.spans[name][-1].__setitem__(1, next(clock))))
        try:
            with torch.no_grad():
                model(x)
        finally:
            for handle in handles:
                handle.remove()

    def clean(self, changed: set[str]) -> list[str]:
        """The outermost modules that ran once and finished before any module in `changed` started (none when a
        changed module never ran as a module call: its parameters may be used anywhere)."""
        starts = [self.spans[name][0][0] for name in changed if name in self.spans]
        if not changed or len(starts) < len(changed):
            return []
        first = min(starts)
        ok = {name for name, spans in self.spans.items() if len(spans) == 1 and 0 <= spans[0][1] < first}
        return sorted(name for name in ok if not any(name.startswith(p + ".") for p in ok))

    @torch.no_grad()
    def record(self, names: list[str], x: torch.Tensor) -> tuple[object, dict[str, object]]:
        """One forward on `x`: (its output, the outputs of `names`) for `replay`."""
        cache: dict[str, object] = {}
        handles = [self.modules[name].register_forward_hook(
            lambda m, args, out, name=name: cache.__setitem__(name, _clone(out))) for name in names]
        try:
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return out, cache

    @contextmanager
    def replay(self, cache: dict[str, object]):
        """Within the block, the cached modules return (copies of) their recorded outputs without computing."""
        stubbed = []
        try:
            for name, value in cache.items():
                module = self.modules[name]
                module.forward = lambda *args, value=value, **kwargs: _clone(value)
                stubbed.append(module)
            yield
        finally:
            for module in stubbed:
                del module.forward
