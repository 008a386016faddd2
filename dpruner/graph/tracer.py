"""Tracing with torch.fx plus shape propagation, in eval and train mode (some models, e.g. Inception's auxiliary
head, only call some layers in one mode; the dependency graph must see both)."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from dpruner.errors import ShapeError, UnsupportedError


class _CountedProxy(fx.Proxy):
    """A proxy with a length when the code fixes it: `list(x.chunk(2, 1))` asks for len() before iterating
    (Ultralytics' C2f, many CSP blocks). Iteration itself goes through PruningTracer.iter."""

    def __len__(self) -> int:
        n = _known_length(self.node)
        if n is None:
            return super().__len__()
        return n


def _known_length(node: fx.Node) -> int | None:
    """How many tensors a chunk/split/tensor_split call returns, when its arguments say so literally."""
    target = node.target
    is_method = node.op == "call_method"
    if not (is_method and target in ("chunk", "split", "tensor_split")
            or node.op == "call_function" and target in (torch.chunk, torch.split, torch.tensor_split)):
        return None
    name = target if is_method else target.__name__
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(
        {"chunk": "chunks", "split": "split_size_or_sections", "tensor_split": "indices_or_sections"}[name])
    if name == "chunk" and isinstance(arg, int):
        return arg
    if name == "split" and isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
        return len(arg)
    if name == "tensor_split":
        if isinstance(arg, int):
            return arg
        if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
            return len(arg) + 1
    return None


class PruningTracer(fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn's own modules (as fx does by default), `leaf_modules`, and
    subclasses of a module with a rule that run that module's own forward.

    Users with a custom block fx cannot trace (data-dependent control flow) pass its class as a leaf; the graph then
    treats it as an op it does not know (its channels are left alone) unless a rule for it is also given.

    A subclass is judged by what its forward does, not by its base class (see rules.runs_rule_forward): torchvision's
    Conv3DSimple only changes __init__, so it is a leaf and gets the Conv3d rule; timm's BatchNormAct2d overrides
    forward (F.batch_norm, then an activation), so it is traced and its functional calls get their own rules.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), leaf_names: Iterable[str] = ()):
        from dpruner.graph.rules import MODULE_RULES, library_module_rules

        super().__init__()
        self.user_leaf_types = tuple(leaf_modules)
        self.leaf_names = frozenset(leaf_names)  # blocks found untraceable: opaque, by qualified name
        self.rule_types = (*MODULE_RULES, *library_module_rules())
        self.failed_in: str | None = None  # the innermost module whose forward was being traced when fx failed

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _CountedProxy(node, self)

    def trace_quietly(self, root: nn.Module) -> fx.Graph:
        """trace(root) without fx's warnings (they describe fx's internals, not the user's model)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.trace(root)

    def iter(self, obj):
        """Iterating a proxy (fx's hook when the code does more than unpack into names): allowed when the call
        that made it fixes how many tensors it returns (chunk(2), split([2, 6]))."""
        n = _known_length(obj.node) if isinstance(obj, fx.Proxy) else None
        if n is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(n)])

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """A root forward(x, *args, **kwargs) (Ultralytics' models, many wrappers) is traced as forward(x): fx would
        make proxies of *args and fail unpacking them, while dpruner calls models with one example input."""
        import inspect

        code = getattr(inspect.unwrap(root_fn), "__code__", None)
        varstuff = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS
        if is_module and concrete_args is None and code is not None and code.co_flags & varstuff \
                and code.co_argcount >= 2:
            def forward_one_input(self, x):
                return root_fn(self, x)

            return super().create_args_for_root(forward_one_input, is_module, None)
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost frame sees the exception first
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:
                    self.failed_in = ""
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from dpruner.graph.rules import runs_rule_forward

        if module_qualified_name in self.leaf_names:
            return True
        if self.user_leaf_types and isinstance(m, self.user_leaf_types):
            return True
        if isinstance(m, self.rule_types):
            if runs_rule_forward(type(m), self.rule_types):
                return True
            if not type(m).__module__.startswith(("torch.nn.", "torch.ao.nn.")):
                return False  # a forward of its own: trace it (torch.nn's own subclasses stay leaves, as in fx)
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class Trace:
    """One traced graph with shapes in node.meta['tensor_meta'], the module it was traced from (call_module and
    get_attr targets resolve against it), and the mode it was traced in."""

    graph: fx.Graph
    root: nn.Module
    training: bool
    opaque: dict = field(default_factory=dict)  # qualified name -> where and why torch.fx could not trace it
    scope: str = ""  # the traced submodule when the model's own forward is untraceable ('' = the whole model)
    split: frozenset = frozenset()  # modules fx could not follow whose blocks were traced one by one


@dataclass(frozen=True)
class TensorShape:
    """What the rules read from node.meta['tensor_meta']: the output shape (a tuple of these for multi-output ops)."""

    shape: tuple[int, ...]


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores every node's output shape (like torch.fx's ShapeProp, without its printing)."""

    shortcuts = True

    def _shortcut(self, n: fx.Node):
        """The input itself for ops that keep its shape (activations, norms, dropout): only shapes are needed."""
        from dpruner.graph import rules

        if not self.shortcuts:
            return None
        if n.op == "call_module":
            keep = isinstance(self.module.get_submodule(n.target),
                              (*rules.SHAPE_PRESERVING_MODULES,
                               *(cls for cls, rule in rules.library_module_rules().items() if rule is rules.passthrough)))
        elif n.op == "call_function":
            keep = n.target in rules.SHAPE_PRESERVING_FUNCTIONS and not n.kwargs.get("out")
        elif n.op == "call_method":
            keep = n.target in rules.SHAPE_PRESERVING_METHODS
        else:
            keep = False
        if not keep or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        value = self.env.get(n.args[0])
        return value if isinstance(value, torch.Tensor) else None

    def run_node(self, n: fx.Node):
        result = self._shortcut(n)
        if result is None:
            result = super().run_node(n)
        meta = map_aggregate(result, lambda o: TensorShape(tuple(o.shape)) if isinstance(o, torch.Tensor) else None)
        if meta is not None and (isinstance(meta, TensorShape) or any(m is not None for m in _leaves(meta))):
            n.meta["tensor_meta"] = meta
        return result




def _buffers_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def _leaves(value) -> list:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


class _Runner(nn.Module):
    """Runs the shape recorder over `model` so torch.func.functional_call can swap in meta parameters."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        super().__init__()
        self.model = model
        self.graph_ = graph

    def forward(self, *inputs, shortcuts: bool = True):
        recorder = _ShapeRecorder(self.model, graph=self.graph_)
        recorder.shortcuts = shortcuts
        return recorder.run(*inputs)


def _drop_meta_caches(before: dict) -> None:
    """Undo what a meta-device pass cached on modules (a forward storing a computed tensor as a plain attribute,
    as CoaT's does): such attributes get back their old value, or go if they are new."""
    for module, old in before.items():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device.type == "meta" and value is not old.get(key):
                if key in old:
                    setattr(module, key, old[key])
                else:
                    delattr(module, key)


def _propagate(model: nn.Module, graph: fx.Graph, x: torch.Tensor, training: bool, inputs: tuple = ()) -> None:
    """Shapes on the meta device when every op supports it (no compute, no copy: the parameters are swapped for
    meta tensors during the call), else with a real forward pass. `inputs` replace `x` for a submodule's graph."""
    runner = _Runner(model, graph)
    args = tuple(inputs) if inputs else (x,)
    state = {f"model.{name}": torch.empty_like(t, device="meta")
             for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    before = {m: dict(vars(m)) for m in model.modules()}
    tensors = {m: (dict(m._parameters), dict(m._buffers)) for m in model.modules(remove_duplicate=False)}
    try:
        with torch.no_grad():
            torch.func.functional_call(runner, state, tuple(a.to("meta") for a in args), strict=False)
        return
    except Exception:  # an op without a meta kernel, or a tensor attribute that is not a registered buffer
        pass
    finally:
        _drop_meta_caches(before)
        for m, (params, buffers) in tensors.items():  # functional_call can leave a tied module's tensors swapped
            m._parameters.update(params)               # when the call fails (CoaT shares MLPs between blocks)
            m._buffers.update(buffers)
    try:
        with torch.no_grad():
            runner(*args, shortcuts=False)  # the plain forward pass, nothing skipped
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapeError(
            f"The model cannot run in {'train' if training else 'eval'} mode on input shape "
            f"{','.join(map(str, x.shape[1:]))} ({type(exc).__name__}: {first}); check --input-shape."
        ) from exc


def _signature(graph: fx.Graph) -> list:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def trace_model(model: nn.Module, example: torch.Tensor, *, leaf_modules: Iterable[type] = (),
                modes: tuple[bool, ...] = (False, True)) -> list[Trace]:
    """Trace `model` in each mode (False = eval, True = train) and propagate shapes; model state is restored.

    A mode whose graph is identical to one already traced is skipped (most models: dropout and BatchNorm are
    leaves, so train and eval graphs match). The train-mode pass uses a batch of >= 2 (BatchNorm needs it); shapes
    come from the meta device where possible, and any real forward pass restores every buffer after itself.
    """
    was_training = model.training
    saved = _buffers_snapshot(model)
    traces: list[Trace] = []
    seen: list[list] = []
    opaque: dict[str, str] = {}
    split: set[str] = set()
    try:
        for training in modes:
            model.train(training)
            x = example if not training or example.shape[0] >= 2 else example.repeat(2, *[1] * (example.dim() - 1))
            try:
                graphs = [("", _trace_with_fallback(model, leaf_modules, opaque, training), ())]
                start = [name for name, m in model.named_modules() if name in opaque and _worth_splitting(m)]
                for name in start:
                    opaque[name] = _split_reason(opaque[name])
            except RootUntraceable as exc:
                if not _worth_splitting(model):
                    raise
                opaque[""] = (_traced_inside(type(model).__name__, exc.where, exc.first)
                              + " and their inputs and outputs keep their channels")
                graphs, start = [], [""]
                root_error = exc
            else:
                root_error = None
            if start:  # blocks fx cannot follow: trace what lies inside them, block by block
                blocks = _trace_blocks(model, x, leaf_modules, opaque, training, start, split)
                if blocks is None:  # the model does not run in this mode (a detector wants targets in training)
                    if root_error is not None:
                        continue
                    blocks = []
                graphs += blocks
            if not graphs:
                raise root_error
            signature = [(scope, _signature(graph)) for scope, graph, _ in graphs]
            if signature in seen:
                continue
            seen.append(signature)
            for scope, graph, inputs in graphs:
                _propagate(model, graph, x, training, inputs)
                traces.append(Trace(graph, model, training, dict(opaque), scope, frozenset(split)))
        if not traces:
            raise UnsupportedError(f"{type(model).__name__} cannot run on the example input in any mode.")
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    return traces


MAX_OPAQUE = 256  # blocks made opaque before giving up (each costs one more trace)


class RootUntraceable(UnsupportedError):
    """torch.fx failed in the traced module's own forward (not in a block it calls); `where` is the source line."""

    def __init__(self, message: str, where: str, first: str):
        super().__init__(message)
        self.where, self.first = where, first


def _trace_with_fallback(model: nn.Module, leaf_modules, opaque: dict[str, str], training: bool,
                         own: tuple[str, ...] = ("",), name: str | None = None) -> fx.Graph:
    """Trace `model`; when torch.fx fails inside a submodule (data-dependent control flow, say), make that block
    opaque (a leaf whose channels are left alone), record where fx stopped, and trace again. A failure in the
    root's own forward (or in a module named in `own`) raises RootUntraceable: then the caller traces the model's
    blocks one by one (see _trace_blocks)."""
    name = name or type(model).__name__
    for _ in range(MAX_OPAQUE + 1):
        tracer = PruningTracer(leaf_modules, opaque)
        try:
            return tracer.trace_quietly(model)
        except Exception as exc:
            culprit = tracer.failed_in
            where = _user_line(exc)
            if not culprit or culprit in own or culprit in opaque:
                mode = "train" if training else "eval"
                raise RootUntraceable(
                    f"torch.fx cannot trace {name}'s own forward in {mode} mode"
                    f"{f' at {where}' if where else ''} ({_first_line(exc)}), and none of its blocks could be "
                    "traced separately; pass --leaf for the blocks that stop it, or prune a traceable submodule.",
                    where, _first_line(exc),
                ) from exc
            opaque[culprit] = _kept_whole(type(model.get_submodule(culprit)).__name__, where, _first_line(exc))
    raise UnsupportedError(f"torch.fx cannot trace {name}: more than {MAX_OPAQUE} blocks fail.")


# ---- models whose own forward torch.fx cannot follow ------------------------------------------------------------
# A detector's forward (image lists, anchor matching, NMS) or a wrapper that checks the input size in Python stops
# fx in the root itself, so nothing around it can be traced. Then each largest traceable block is traced on its
# own, fed with the inputs it received in one real forward pass: the backbone, the FPN, the heads' conv towers.
# Every block's inputs and outputs keep their channels (they cross code the engine cannot see); what lies inside
# is pruned with the usual rules. Blocks without parameters are skipped (nothing to prune there).


def _capture_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple] | None:
    """The (args, kwargs) of the first call of each named module in one forward pass; None when the model does
    not run in its current mode (detectors want targets in training)."""
    found: dict[str, tuple] = {}
    handles = []
    for name in names:
        def hook(module, args, kwargs, name=name):
            found.setdefault(name, (args, kwargs))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(x)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
    return found


class _Call(nn.Module):
    """Calls `m` with the captured arguments, their tensors replaced by this module's positional inputs: the
    graph of `m` traced through it has one placeholder per tensor, and lists/dicts/*args/**kwargs stay real
    Python containers during tracing (so `for feature in features:` works)."""

    def __init__(self, m: nn.Module, spec, leaves: list):
        super().__init__()
        self.m = m
        self._spec = spec
        self._leaves = leaves  # non-tensor leaves are baked in as constants; tensor positions are None

    def call(self, tensors):
        from torch.utils._pytree import tree_unflatten

        it = iter(tensors)
        leaves = [next(it) if leaf is None else leaf for leaf in self._leaves]
        args, kwargs = tree_unflatten(leaves, self._spec)
        return self.m(*args, **kwargs)


def _call_wrapper(module: nn.Module, args: tuple, kwargs: dict) -> tuple[_Call, tuple]:
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
    tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
    names = [f"input_{i}" for i in range(len(tensors))]
    namespace: dict = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return self.call([{', '.join(names)}])\n", namespace)
    cls = type("_Call", (_Call,), {"forward": namespace["forward"]})
    return cls(module, spec, [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]), tensors


def _rescope(graph: fx.Graph, scope: str) -> None:
    """Rename the wrapper's 'm' to the block's qualified name in targets and module stacks, so the graph reads
    like part of the whole model's graph."""
    def fix(path: str) -> str:
        return scope if path == "m" else scope + path[1:] if path.startswith("m.") else path

    prefix = scope.replace(".", "_")
    for node in graph.nodes:
        if node.name == "m" or node.name.startswith("m_"):
            node.name = prefix + node.name[1:]  # names appear in the reasons a user reads
        if node.op in ("call_module", "get_attr"):
            node.target = fix(node.target)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: ((fix(v[0]), *v[1:]) if isinstance(v, tuple) else fix(str(v))) for key, v in stack.items()}


SPLIT_NOTE = "; its blocks are traced one by one"


def _kept_whole(kind: str, where: str, first: str) -> str:
    """The reason recorded for a block fx stopped in and that is kept whole."""
    return f"{kind} is opaque: torch.fx stopped{f' at {where}' if where else ''} ({first})"


def _traced_inside(kind: str, where: str, first: str) -> str:
    """The reason recorded for a module whose own forward stops fx while its blocks are traced one by one."""
    return f"{kind}'s own forward is untraceable{f' at {where}' if where else ''} ({first}){SPLIT_NOTE}"


def _worth_splitting(module: nn.Module) -> bool:
    """Whether tracing a module's children one by one can prune anything: some child must hold layers of its
    own (a lone layer traced alone keeps its inputs and outputs, so nothing in it could change)."""
    return any(any(True for _ in child.children()) for child in module.children())


def _split_reason(reason: str) -> str:
    """A _kept_whole reason reworded as _traced_inside, once the block's own blocks are traced one by one."""
    if reason.endswith(SPLIT_NOTE):
        return reason
    return reason.replace(" is opaque: torch.fx stopped", "'s own forward is untraceable", 1) + SPLIT_NOTE


def _trace_blocks(model: nn.Module, x: torch.Tensor, leaf_modules, opaque: dict[str, str], training: bool,
                  start: list[str], split: set[str]) -> list[tuple[str, fx.Graph, tuple]] | None:
    """Trace the largest traceable blocks inside the modules `start` (whose own forward fx cannot follow; '' is
    the model): (scope, graph, inputs) for each, breadth first. A block that fails in its own forward is split
    into its children in turn; blocks made opaque inside a traced block are split too. None when the model does
    not run in this mode. Every module split this way is added to `split`."""
    found: list[tuple[str, fx.Graph, tuple]] = []
    frontier = list(start)
    split.update(start)
    while frontier:
        children = [f"{p}.{c}" if p else c for p in frontier
                    for c, m in model.get_submodule(p).named_children()
                    if any(True for _ in m.parameters())]
        if not children:
            break
        calls = _capture_inputs(model, x, children)
        if calls is None:
            return None
        frontier = []
        for name in children:
            if name not in calls:
                continue  # never called in this mode
            module = model.get_submodule(name)
            wrapper, tensors = _call_wrapper(module, *calls[name])
            local = {"m" + k[len(name):]: v for k, v in opaque.items() if k.startswith(name + ".")}
            try:
                graph = _trace_with_fallback(wrapper, leaf_modules, local, training, own=("", "m"),
                                             name=f"{type(module).__name__} ({name})")
            except RootUntraceable as exc:
                if _worth_splitting(module):
                    frontier.append(name)
                    split.add(name)
                    opaque[name] = _traced_inside(type(module).__name__, exc.where, exc.first)
                else:
                    opaque[name] = _kept_whole(type(module).__name__, exc.where, exc.first)
                continue
            except Exception:  # fx's own limits (e.g. an argument pytree cannot flatten): leave the block whole
                continue
            for k, v in local.items():
                full = name + k[1:]
                opaque[full] = v
                if full not in split and _worth_splitting(model.get_submodule(full)):
                    frontier.append(full)  # opaque inside this block: its own blocks may still trace
                    split.add(full)
                    opaque[full] = _split_reason(v)
            _rescope(graph, name)
            found.append((name, graph, tensors))
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _user_line(exc: BaseException) -> str:
    """'file.py:123 `source`' of the innermost frame outside torch itself: the model code fx could not follow."""
    import linecache
    import os

    import dpruner

    skip = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(dpruner.__file__) + os.sep)
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.startswith(skip) and not code.co_filename.startswith("<"):
            source = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            found = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}" + (f" `{source[:80]}`" if source else "")
        tb = tb.tb_next
    return found


def owner_of(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward produced this node ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)
