"""dpruner's own checkpoint format: architecture spec + pruning plan (plain data) + state_dict.

Everything in it is a str/int/float/list/dict or a tensor, so it loads with ``torch.load(weights_only=True)``, and
dpruner rebuilds the model without the original file: build the architecture, replay the plan (surgery on the
freshly built model so the shapes match), then load the weights. Schema (version 1)::

    {"dpruner_checkpoint": 1, "arch": "torchvision:resnet18", "num_classes": 10 | None,
     "input_shape": [1, 3, 224, 224] | None, "plan": [] | [<pruning plan as data>, ...] (replayed in order),
     "state_dict": {...}, "meta": {...free-form JSON-able data...}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dpruner.errors import CheckpointError
from dpruner.io.arch import parse_arch

FORMAT_KEY = "dpruner_checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready to use plus what the checkpoint said about it."""

    model: Any  # torch.nn.Module, in eval mode
    source_format: str  # 'dpruner', 'state_dict' or 'pickled-module'
    arch: str | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    plan: list = field(default_factory=list)  # pruning plans replayed on the architecture, in order
    meta: dict = field(default_factory=dict)


def is_dpruner_checkpoint(obj: Any) -> bool:
    """True for a dict written by make_checkpoint."""
    return isinstance(obj, Mapping) and FORMAT_KEY in obj


def make_checkpoint(
    model,
    *,
    arch: str,
    num_classes: int | None = None,
    input_shape=None,
    plan: list | None = None,
    meta: dict | None = None,
) -> dict:
    """The dict that save_checkpoint writes; `plan` is the list of pruning plans applied since `arch` was built
    (empty for an unpruned model)."""
    parse_arch(arch)  # refuse to write a checkpoint that could never be loaded
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "arch": arch,
        "num_classes": num_classes,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "plan": list(plan or []),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def save_checkpoint(path, model, *, inputs=(), **kwargs) -> Path:
    """Write a dpruner checkpoint atomically (never over one of `inputs`)."""
    from dpruner.io.atomic import atomic_torch_save

    return atomic_torch_save(make_checkpoint(model, **kwargs), path, inputs=inputs)


def load_dpruner_checkpoint(
    obj: Mapping, path: str, *, arch: str | None, num_classes: int | None, trust_checkpoint: bool
) -> LoadedModel:
    """Rebuild the model a dpruner checkpoint describes."""
    from dpruner.io.checkpoint import fit_state_dict

    version = obj.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' is a dpruner checkpoint of format version {version}; this dpruner reads version "
            f"{FORMAT_VERSION} (upgrade dpruner to read it)."
        )
    stored_arch = obj.get("arch")
    spec_text = arch or stored_arch
    if not isinstance(spec_text, str):
        raise CheckpointError(f"'{path}' is a dpruner checkpoint without an architecture; pass --arch.")
    spec = parse_arch(spec_text)
    # The arch named inside a file is data from that file: resolving a .py path or a foreign module from it
    # would run code the user never named, which is exactly what weights_only loading is there to prevent.
    if arch is None and not spec.trusted and not trust_checkpoint:
        raise CheckpointError(
            f"'{path}' names its architecture as '{spec_text}', which would import and run that code; "
            f"confirm with --arch {spec_text} or pass --trust-checkpoint."
        )
    n_classes = num_classes if num_classes is not None else obj.get("num_classes")
    from dpruner.io.arch import build_model

    model = build_model(spec, num_classes=n_classes)
    plans = obj.get("plan") or []
    if isinstance(plans, dict):
        plans = [plans]
    if plans:
        from dpruner.surgery.plan import apply_plan

        for plan in plans:  # a model pruned several times replays its plans in order
            apply_plan(model, plan)
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"'{path}' is a dpruner checkpoint without a state_dict.")
    fit_state_dict(model, state_dict, path=path, arch=spec_text, num_classes=n_classes)
    shape = obj.get("input_shape")
    return LoadedModel(
        model=model.eval(),
        source_format="dpruner",
        arch=spec_text,
        num_classes=n_classes,
        input_shape=tuple(shape) if shape else None,
        plan=plans,
        meta=dict(obj.get("meta") or {}),
    )
