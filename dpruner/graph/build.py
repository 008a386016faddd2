"""Build the channel dependency graph: propagate channel atoms through traced graphs with the op rules.

Output: a DependencyGraph holding *slots* (where a module or parameter is indexed by channels: a layer's output
rows, a consumer's input columns, a norm's per-channel parameters, a parameter sliced along one dim), *pad sites*
(F.pad calls whose zero channels must shrink with the pruning), and the atom table whose classes are the prunable
channels. The engine knows nothing about criteria or plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from dpruner.graph.atoms import AtomTable, Chan, ChanCount, Opaque, ParamRef, ShapeOf
from dpruner.graph.tracer import Trace, owner_of, trace_model


@dataclass
class Slot:
    """Positions along one dim of one module's tensors, each labelled with the atom it must be removed with.

    role: 'out' (a layer's output channels: the rows it computes), 'in' (a layer's input channels or features),
    'norm' (per-channel parameters/buffers of a norm or PReLU), 'param' (a parameter or buffer `param` of `module`
    sliced along `dim`).
    """

    module: str
    role: str
    atoms: np.ndarray
    param: str | None = None
    dim: int = 0


@dataclass
class PadSite:
    """The `order`-th F.pad call inside module `owner`'s forward pads the channel dim with these zero atoms."""

    owner: str
    order: int
    pair: int  # index of the (before, after) pair in F.pad's `pad` argument that pads the channel dim
    before: np.ndarray
    after: np.ndarray
    node: str


@dataclass
class AttrSite:
    """An integer attribute of a module that the forward code reads as a size (`self.num_heads` in a reshape,
    `self.attn_dim`): after pruning it becomes the number of kept positions among `atoms` (confirmed by tracing
    the module again with the attribute changed: the size in the graph must follow it)."""

    owner: str
    attr: str
    atoms: np.ndarray
    node: str
    index: int | None = None  # the entry of a list/tuple attribute (split sizes), None for an int attribute


@dataclass
class DependencyGraph:
    """Everything the planner and surgery need; see module docstring."""

    atoms: AtomTable
    slots: dict[tuple, Slot]
    pads: dict[tuple[str, int], PadSite]
    modules: dict[str, nn.Module]
    unsupported: list[str] = field(default_factory=list)  # one line per node the rules did not understand
    opaque: dict[str, str] = field(default_factory=dict)  # blocks torch.fx could not trace -> where it stopped
    attrs: dict[tuple, AttrSite] = field(default_factory=dict)  # (owner, attr, index) -> size attribute to rewrite
    scopes: list[str] = field(default_factory=lambda: [""])  # traced blocks ('' = the whole model was traced)
    split: set[str] = field(default_factory=set)  # opaque modules whose own blocks were traced one by one


class Builder:
    """State of one propagation pass; rules call its helpers."""

    def __init__(self, model: nn.Module, module_rules: Mapping[type, Callable], function_rules: Mapping[Any, Callable],
                 method_rules: Mapping[str, Callable]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.atoms = AtomTable()
        self.slots: dict[tuple, Slot] = {}
        self.pads: dict[tuple[str, int], PadSite] = {}
        self.producers: dict[str, np.ndarray] = {}
        self.frozen: dict[str, str] = {}  # module -> reason its parameters must keep their shape
        self.unsupported: list[str] = []
        self.module_rules = module_rules
        self.function_rules = function_rules
        self.method_rules = method_rules
        self.values: dict[fx.Node, Any] = {}
        self._pad_counter: dict[str, int] = {}
        self.scope = ""  # the traced block of the current pass ('' = the whole model)
        self.opaque_names: set[str] = set()  # blocks of the current trace torch.fx could not follow
        self.attrs: dict[tuple, AttrSite] = {}
        self._confirmed: dict[tuple, bool] = {}
        self.counted: set = set()  # (view node, shape position) whose ChanCount was coupled to the channel dim

    # ---- values ------------------------------------------------------------------------------------------------
    def val(self, arg):
        """The channel labelling of an fx argument (Chan, ParamRef, tuple of them, None) or the constant itself."""
        if isinstance(arg, fx.Node):
            return self.values.get(arg)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.val(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.val(v) for k, v in arg.items()}
        return arg

    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        shape = getattr(meta, "shape", None)
        return tuple(shape) if shape is not None else None

    # ---- slots -------------------------------------------------------------------------------------------------
    def producer(self, module: str, n: int) -> np.ndarray:
        """The output atoms of a layer: created on its first call, reused on later calls (same weights)."""
        if module not in self.producers:
            self.producers[module] = self.atoms.new(n, "layer")
            self.slot(module, "out", self.producers[module])
        return self.producers[module]

    def slot(self, module: str, role: str, atoms: np.ndarray, param: str | None = None, dim: int = 0) -> None:
        """Record a slot; a module called again must see channels coupled position by position."""
        key = (module, role, param)
        old = self.slots.get(key)
        if old is None:
            self.slots[key] = Slot(module, role, np.asarray(atoms).copy(), param, dim)
        elif len(old.atoms) == len(atoms):
            self.atoms.union_pairwise(old.atoms, atoms)
        else:
            self.atoms.block(atoms, f"{module}: called with different channel counts")
            self.atoms.block(old.atoms, f"{module}: called with different channel counts")

    def pad_site(self, node: fx.Node, pair: int, before: np.ndarray, after: np.ndarray) -> None:
        owner = owner_of(node)
        order = self._pad_counter.get(owner, 0)
        self._pad_counter[owner] = order + 1
        key = (owner, order)
        old = self.pads.get(key)
        if old is None:
            self.pads[key] = PadSite(owner, order, pair, before, after, node.name)
            if not owner:  # surgery rewrites the pad by replacing its owner module, and the root cannot be replaced
                reason = f"{node.name}: F.pad on the channel dim in the root module's forward cannot be rewritten"
                self.atoms.block(before, reason)
                self.atoms.block(after, reason)
        else:  # the same call site seen again (a second call of the module, or the other trace mode)
            self.atoms.union_pairwise(old.before, before)
            self.atoms.union_pairwise(old.after, after)

    def attr_site(self, node: fx.Node, owner: str, attr: str, atoms: np.ndarray, index: int | None = None) -> None:
        """Record that `owner.attr` (entry `index` of it, for a list) must become the number of kept positions
        among `atoms`; a second sighting (another call, the other trace mode) must agree position by position."""
        key = (owner, attr, index)
        old = self.attrs.get(key)
        if old is None:
            self.attrs[key] = AttrSite(owner, attr, np.asarray(atoms).copy(), node.name, index)
        elif len(old.atoms) == len(atoms):
            self.atoms.union_pairwise(old.atoms, atoms)
        else:
            reason = f"{node.name}: {owner}.{attr} sizes tensors of different widths"
            self.atoms.block(atoms, reason)
            self.atoms.block(old.atoms, reason)

    def confirmed(self, key: tuple, check) -> bool:
        """Memoised `check()` (re-tracing a module is not free; train and eval passes ask the same)."""
        if key not in self._confirmed:
            self._confirmed[key] = bool(check())
        return self._confirmed[key]

    def param_ref(self, ref: ParamRef) -> tuple[str, str]:
        module, _, name = ref.target.rpartition(".")
        return module, name

    # ---- fallbacks ---------------------------------------------------------------------------------------------
    def opaque_like(self, node: fx.Node, reason: str):
        """An Opaque value for each tensor the node outputs (None for non-tensors)."""
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return Opaque(reason) if len(meta.shape) else None
        return tuple(Opaque(reason) if hasattr(m, "shape") else None for m in meta)  # a multi-output op

    def as_chan(self, value, arg, axis: int, reason: str):
        """`value` if it is tracked; for an Opaque (or untracked) tensor, fresh unprunable atoms on `axis`, so the
        consuming layer keeps those channels. None when `arg` is not a tensor."""
        if isinstance(value, Chan):
            return value
        if isinstance(value, Opaque) and value.reason != "network input":
            reason = f"{reason}: {value.reason}"
        shape = self.shape(arg)
        if shape is None or not shape:
            return None
        axis %= len(shape)
        atoms = self.atoms.new(shape[axis], "opaque")
        self.atoms.block(atoms, reason)
        return Chan(axis, atoms)

    def unknown(self, node: fx.Node, what: str):
        """An op the rules do not cover: its inputs' channels and its outputs become unprunable."""
        reason = f"{node.name}: {what}"
        self.unsupported.append(reason)
        for value in _flatten([self.val(a) for a in node.args] + [self.val(v) for v in node.kwargs.values()]):
            if isinstance(value, Chan):
                self.atoms.block(value.atoms, reason)
            elif isinstance(value, ParamRef):
                module, _ = self.param_ref(value)
                self.frozen.setdefault(module, reason)
        return self.opaque_like(node, reason)

    # ---- the pass ----------------------------------------------------------------------------------------------
    def run(self, trace: Trace) -> None:
        self.values = {}
        self._pad_counter = {}
        self.scope = trace.scope
        self.opaque_names = set(trace.opaque)
        for node in trace.graph.nodes:
            self.values[node] = self._visit(trace.root, node)
            self._pin_unused_counts(node)

    def _pin_unused_counts(self, node: fx.Node) -> None:
        """A channel count (ChanCount) given to a view/reshape/expand that its rule did not couple to the channel
        dim (it sizes another dim, or the view was not understood) pins those channels."""
        from dpruner.graph.rules import _shape_args

        if not _sizes_a_view(node):
            return
        for pos, arg in enumerate(_shape_args(node) or []):
            value = self.val(arg) if isinstance(arg, fx.Node) else None
            if isinstance(value, ChanCount) and (node, pos) not in self.counted:
                self.atoms.block(value.atoms, f"{node.name}: uses a channel count read from a shape")

    def _visit(self, gm: nn.Module, node: fx.Node):
        if node.target is not operator.getitem:  # a whole shape used anywhere but for indexing pins the channels
            sizes_a_view = _sizes_a_view(node)
            for value in _flatten([self.val(a) for a in node.args] + [self.val(v) for v in node.kwargs.values()]):
                if isinstance(value, ShapeOf):
                    self.atoms.block(value.chan.atoms, f"{node.name}: uses the shape of a tensor, channel count included")
                elif isinstance(value, ChanCount) and not sizes_a_view:  # the view rules couple or pin it
                    self.atoms.block(value.atoms, f"{node.name}: uses a channel count read from a shape")
        if node.op == "placeholder":
            return (Opaque(f"input of {self.scope} (fed by code torch.fx cannot trace)" if self.scope
                           else "network input") if self.shape(node) else None)
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            return ParamRef(node.target, tuple(value.shape)) if isinstance(value, torch.Tensor) else None
        if node.op == "output":
            for value in _flatten([self.val(node.args[0])]):
                if isinstance(value, Chan):
                    self.atoms.block(value.atoms, f"output of {self.scope} (read by code torch.fx cannot trace)"
                                     if self.scope else "network output")
                elif isinstance(value, ParamRef):
                    self.frozen.setdefault(self.param_ref(value)[0], "returned as an output")
            return None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            rule = _lookup_type(type(module), self.module_rules)
            if rule is None and node.target in self.opaque_names:
                return self.unknown(node, f"{type(module).__name__} '{node.target}', whose forward torch.fx could "
                                          "not follow, reads or makes these channels")
            if rule is None:
                return self.unknown(node, f"module {type(module).__name__} has no pruning rule")
            return rule(self, node, node.target, module)
        if node.op == "call_function":
            if isinstance(node.target, type) and issubclass(node.target, tuple):  # a namedtuple of outputs
                return tuple(self.val(a) for a in node.args)
            rule = self.function_rules.get(node.target)
            if rule is None:
                name = getattr(node.target, "__name__", str(node.target))
                return self.unknown(node, f"function {name} has no pruning rule")
            return rule(self, node)
        if node.op == "call_method":
            rule = self.method_rules.get(node.target)
            if rule is None:
                return self.unknown(node, f"method .{node.target}() has no pruning rule")
            return rule(self, node)
        return self.unknown(node, f"fx op {node.op}")


def _sizes_a_view(node: fx.Node) -> bool:
    """A view/reshape/expand call: its shape arguments may be channel counts (ChanCount) its rule couples."""
    if node.op == "call_method":
        return node.target in ("view", "reshape", "expand")
    return node.op == "call_function" and node.target is torch.reshape


def _get_attr(gm: nn.Module, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _lookup_type(cls: type, table: Mapping[type, Callable]):
    for base in cls.__mro__:
        if base in table:
            return table[base]
    return None


def _flatten(values) -> list:
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        elif isinstance(v, dict):
            out.extend(_flatten(list(v.values())))
        else:
            out.append(v)
    return out


def build_graph(
    model: nn.Module,
    example: torch.Tensor,
    *,
    leaf_modules: Iterable[type] = (),
    module_rules: Mapping[type, Callable] | None = None,
    function_rules: Mapping[Any, Callable] | None = None,
    method_rules: Mapping[str, Callable] | None = None,
    traces: list[Trace] | None = None,
) -> DependencyGraph:
    """Trace `model` (eval and train mode) and build its channel dependency graph.

    Extra rules extend or override the defaults in dpruner.graph.rules (keys: module classes, functions, method
    names); a rule is `fn(builder, node[, name, module]) -> output labelling`.
    """
    from dpruner.graph import rules

    builder = Builder(
        model,
        {**rules.MODULE_RULES, **rules.library_module_rules(), **(module_rules or {})},
        {**rules.FUNCTION_RULES, **(function_rules or {})},
        {**rules.METHOD_RULES, **(method_rules or {})},
    )
    opaque: dict[str, str] = {}
    scopes: list[str] = []
    split: set[str] = set()
    for trace in traces if traces is not None else trace_model(model, example, leaf_modules=leaf_modules):
        builder.run(trace)
        opaque.update(trace.opaque)
        if trace.scope not in scopes:
            scopes.append(trace.scope)
        split |= trace.split
    # A parameter of a layer that surgery resizes as a whole (a BatchNorm's weight, a conv's bias) used directly in
    # the forward (`y * self.bn.weight.view(1, -1, 1, 1)`) would be sliced twice: once by its layer's resizer, once
    # as a coupled parameter. Both sets of channels keep their width instead.
    resized = {key[0] for key in builder.slots if key[1] != "param"}
    for (module, role, param) in list(builder.slots):
        if role == "param" and module in resized:
            for slot in builder.slots.values():
                if slot.module == module:
                    builder.atoms.block(slot.atoms, f"{module}.{param}: a parameter of a layer that is resized, read "
                                                    "directly in the forward")
    for module, reason in builder.frozen.items():  # a parameter read by an op we do not know keeps its shape
        for slot in builder.slots.values():
            if slot.module == module:
                builder.atoms.block(slot.atoms, f"{module}: parameter used by {reason}")
    return DependencyGraph(builder.atoms, builder.slots, builder.pads, builder.modules, builder.unsupported, opaque,
                           builder.attrs, scopes or [""], split)
