"""Tracing with torch.fx plus shape propagation, in eval and train mode (some models, e.g. Inception's auxiliary
head, only call some layers in one mode; the dependency graph must see both)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from dpruner.errors import ShapeError, UnsupportedError


class PruningTracer(fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn's own modules (as fx does by default) plus `leaf_modules`.

    Users with a custom block fx cannot trace (data-dependent control flow) pass its class as a leaf; the graph then
    treats it as an op it does not know (its channels are left alone) unless a rule for it is also given.
    """

    def __init__(self, leaf_modules: Iterable[type] = ()):
        super().__init__()
        self.leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class Trace:
    """One traced graph with shapes in node.meta['tensor_meta'] and the mode it was traced in."""

    graph_module: fx.GraphModule
    training: bool


def _buffers_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def trace_model(model: nn.Module, example: torch.Tensor, *, leaf_modules: Iterable[type] = (),
                modes: tuple[bool, ...] = (False, True)) -> list[Trace]:
    """Trace `model` in each mode (False = eval, True = train) and propagate shapes; model state is restored.

    The train-mode pass runs a forward with batch size >= 2 (BatchNorm needs it) and restores every buffer after, so
    BatchNorm running statistics are untouched.
    """
    was_training = model.training
    saved = _buffers_snapshot(model)
    traces = []
    try:
        for training in modes:
            model.train(training)
            tracer = PruningTracer(leaf_modules)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = tracer.trace(model)
            except Exception as exc:
                raise UnsupportedError(
                    f"torch.fx cannot trace {type(model).__name__} in {'train' if training else 'eval'} mode "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); register the "
                    "offending block as a leaf module."
                ) from exc
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
            x = example if not training or example.shape[0] >= 2 else example.repeat(2, *[1] * (example.dim() - 1))
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(x)
            except Exception as exc:
                cause = exc.__cause__ or exc
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                raise ShapeError(
                    f"The model cannot run in {'train' if training else 'eval'} mode on input shape "
                    f"{','.join(map(str, x.shape[1:]))} ({type(cause).__name__}: {first}); check --input-shape."
                ) from exc
            traces.append(Trace(gm, training))
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    return traces


def owner_of(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward produced this node ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def clone_for_trace(model: nn.Module) -> nn.Module:
    """A deep copy for callers that must not touch the user's model."""
    return copy.deepcopy(model)
