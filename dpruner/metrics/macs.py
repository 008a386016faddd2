"""MACs via fvcore, per module and in total.

fvcore counts one fused multiply-add as one "flop"; dpruner calls these numbers MACs. Ops fvcore has no handler for
(element-wise adds, activations, ...) are not guessed at: they are reported by name in `uncounted_ops`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from dpruner.errors import ShapeError


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass at batch size 1 x the example input's batch."""

    total: int
    by_module: dict[str, int] = field(default_factory=dict)  # qualified module name -> MACs (children included)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # aten op -> occurrences fvcore did not count


def count_params(model) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def run_forward(model, example_input):
    """Run the model once under no_grad, turning a failure into a ShapeError that names the input shape."""
    import torch

    try:
        with torch.no_grad():
            return model(example_input)
    except (Exception, SystemExit) as exc:
        raise _shape_error(exc, example_input) from exc


def _shape_error(exc: BaseException, example_input) -> ShapeError:
    """The model's forward failed on the example input: the input shape, or the model's own code, is at fault."""
    from dpruner.usercode import describe

    shape = ",".join(str(d) for d in example_input.shape[1:])
    if isinstance(exc, SystemExit):
        return ShapeError(f"The model's forward called sys.exit({exc.code!r}) on input shape {shape}.")
    if isinstance(exc, ShapeError):
        return exc
    return ShapeError(f"The model cannot run on input shape {shape} ({describe(exc)}); check --input-shape and "
                      "the model's code.")


def count_macs(model, example_input) -> MacCount:
    """Count MACs with fvcore's FlopCountAnalysis (a jit trace); the model's train/eval mode is left as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's import touches the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, example_input)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings: noise for the user here
        try:
            total = int(analysis.total())  # the jit trace runs the model once here
        except (Exception, SystemExit) as exc:
            raise _shape_error(exc, example_input) from exc
        by_module = {name: int(v) for name, v in analysis.by_module().items()}
        uncounted = dict(Counter(analysis.unsupported_ops()))
    return MacCount(total=total, by_module=by_module, uncounted_ops=uncounted)


def count_sizes(model, example_input) -> dict:
    """{'params': ..., 'macs': ...}: the two quantities every before/after comparison reports."""
    return {"params": count_params(model), "macs": count_macs(model, example_input).total}
