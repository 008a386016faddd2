"""The engine's check of its own work: a pruned model must run on the example input and return outputs of the
original's structure and shapes (outputs are never pruned). A failure here is a bug in dpruner, not the user's
input, so it is an EngineError (exit 70) naming the graph node that failed and the layers that feed it, with
`--exclude` as the workaround."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from dpruner.errors import EngineError


def output_signature(value) -> object:
    """The structure of a model's output with tensors replaced by their shapes (what pruning must preserve)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {k: output_signature(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(output_signature(v) for v in value) if not hasattr(value, "_fields") else \
            tuple(output_signature(v) for v in value)
    return type(value).__name__


@dataclass(frozen=True)
class Expected:
    """What a pruned model must reproduce: the output signature and, when the model was traced block by block
    (its own forward is untraceable), each traced block's output signature. Then the first dim of every tensor
    may change: untraced code between the blocks may depend on the weights (a detector's number of boxes and
    of region proposals); every other dim must match."""

    root: object
    blocks: dict = field(default_factory=dict)


def expected_outputs(model: nn.Module, example: torch.Tensor, scopes: Iterable[str] = ()) -> Expected:
    """Expected of `model` on `example` (eval mode, no grad); `scopes` are the separately traced blocks."""
    root, blocks = _run_recording(model, example, [s for s in scopes if s])
    return Expected(output_signature(root), {k: output_signature(v) for k, v in blocks.items()})


def _run_recording(model: nn.Module, example: torch.Tensor, scopes: list[str]):
    """The model's output and the first output of each named block, from one forward pass."""
    blocks: dict = {}
    handles = []
    for scope in scopes:
        def hook(module, args, out, scope=scope):
            blocks.setdefault(scope, out)
        handles.append(model.get_submodule(scope).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example), blocks
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def _loose(signature) -> object:
    """A signature with the first dim of every tensor shape dropped."""
    if isinstance(signature, tuple) and all(isinstance(d, int) for d in signature):
        return ("*", *signature[1:]) if signature else signature
    if isinstance(signature, dict):
        return {k: _loose(v) for k, v in signature.items()}
    if isinstance(signature, (list, tuple)):
        return type(signature)(_loose(v) for v in signature)
    return signature


def check_pruned(model: nn.Module, example: torch.Tensor, expected: object, *,
                 leaf_modules: Iterable[type] = ()) -> None:
    """Run the pruned `model` once (eval mode, no grad); raise EngineError when it fails or when its output
    signature differs from `expected` (an Expected, or output_signature of the original on the same input)."""
    if not isinstance(expected, Expected):
        expected = Expected(expected)
    try:
        out, blocks = _run_recording(model, example, list(expected.blocks))
    except Exception as exc:
        node, detail, layers = locate_failure(model, example, leaf_modules)
        raise EngineError(_message(f"fails at {node}" if node else "fails", detail or _text(exc), layers)) from exc
    for scope, want in expected.blocks.items():
        got = output_signature(blocks.get(scope))
        if _loose(got) != _loose(want):
            raise EngineError(_message(f"block '{scope}' returns outputs of shape {got} instead of {want}", "",
                                       [scope]))
    got = output_signature(out)
    if expected.blocks and _loose(got) == _loose(expected.root):
        return
    if got != expected.root:
        raise EngineError(_message(f"returns outputs of shape {got} instead of {expected.root}", "", []))


def locate_failure(model: nn.Module, example: torch.Tensor,
                   leaf_modules: Iterable[type] = ()) -> tuple[str, str, list[str]]:
    """Replay the model node by node with torch.fx: the first node that raises, described with its module and
    the layers feeding it, the error text, and those layers. ('', '', []) when the model cannot be traced."""
    from dpruner.graph.tracer import PruningTracer, owner_of

    try:
        graph = PruningTracer(tuple(leaf_modules)).trace_quietly(model)
        runner = _Locator(fx.GraphModule(model, graph))
        with torch.no_grad():
            runner.run(example)
    except _Failed as failed:
        node = failed.node
        feeders = sorted(_feeding_modules(node))
        where = f"node '{node.name}' ({_op_text(node)}"
        owner = owner_of(node) or (node.target if node.op == "call_module" else "")
        where += f" in '{owner}'" if owner else ""
        where += f", fed by {', '.join(repr(f) for f in feeders)})" if feeders else ")"
        return where, _text(failed.error), feeders
    except Exception:
        return "", "", []
    return "", "", []


class _Failed(Exception):
    def __init__(self, node: fx.Node, error: BaseException):
        super().__init__(node.name)
        self.node, self.error = node, error


class _Locator(fx.Interpreter):
    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except Exception as exc:
            raise _Failed(n, exc) from exc


def _feeding_modules(node: fx.Node, limit: int = 4) -> set[str]:
    """Names of the nearest modules upstream of `node` (the layers whose widths met there)."""
    found: set[str] = set()
    stack, seen = list(node.all_input_nodes), set()
    while stack and len(found) < limit:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_module":
            found.add(str(current.target))
        else:
            stack.extend(current.all_input_nodes)
    return found


def _op_text(node: fx.Node) -> str:
    if node.op == "call_function":
        return f"{getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}".lstrip(".")
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return str(node.target)


def _text(exc: BaseException) -> str:
    from dpruner.usercode import describe

    return describe(exc)


def _message(what: str, detail: str, layers: list[str]) -> str:
    hint = (f"protect those layers from pruning with {' '.join(f'--exclude {name!r}' for name in layers)}" if layers
            else "protect the layers involved with --exclude")
    return (f"The pruned model {what}" + (f": {detail}" if detail else "") + "; this is a bug in dpruner's engine, "
            f"not in your input, and nothing was written. Until it is fixed, {hint}; please report it (rerun with "
            "DPRUNER_DEBUG=1 for the traceback).")
