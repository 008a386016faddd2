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

from dpruner.errors import CheckpointError, ShapeError
from dpruner.io.arch import parse_arch
from dpruner.io.limits import Limits
from dpruner.usercode import describe

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
    container: Any = None  # for a trusted pickle: the object the model came in (a dict such as Ultralytics')


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


def save_pruned(path, model, loaded: "LoadedModel", *, inputs=(), input_shape=None, plan: list,
                meta: dict) -> Path:
    """Write a pruned model: dpruner's checkpoint when the architecture is known, else (a trusted pickle of a
    whole model) the same kind of pickle it came in, so the program that wrote it loads it back. In a dict
    (Ultralytics' {'model'|'ema': DetectionModel, 'optimizer': ..., ...}) every model of the same class is
    replaced by the pruned one, optimizer state (now of the wrong shapes) is dropped, and a 'dpruner' entry records
    the plans and input shape. Weights go back in the half precision they came in (Ultralytics stores float16)."""
    import copy

    import torch

    if loaded.arch is not None:
        return save_checkpoint(path, model, inputs=inputs, arch=loaded.arch, num_classes=loaded.num_classes,
                               input_shape=input_shape, plan=plan, meta=meta)
    from dpruner.io.atomic import atomic_torch_save

    saved = copy.deepcopy(model)
    if loaded.meta.get("dtype") in ("float16", "bfloat16"):
        saved = saved.to(getattr(torch, loaded.meta["dtype"]))
    obj: Any = saved
    if isinstance(loaded.container, Mapping):
        obj = {}
        for key, value in loaded.container.items():
            if isinstance(value, type(model)) or value is loaded.model:
                obj[key] = saved
            elif key == "optimizer":
                obj[key] = None
            else:
                obj[key] = value
        obj["dpruner"] = {"plan": plan, "input_shape": list(input_shape) if input_shape else None, "meta": meta}
    return atomic_torch_save(obj, path, inputs=inputs)


def save_checkpoint(path, model, *, inputs=(), **kwargs) -> Path:
    """Write a dpruner checkpoint atomically (never over one of `inputs`)."""
    from dpruner.io.atomic import atomic_torch_save

    return atomic_torch_save(make_checkpoint(model, **kwargs), path, inputs=inputs)


def load_dpruner_checkpoint(
    obj: Mapping,
    path: str,
    *,
    arch: str | None,
    num_classes: int | None,
    trust_checkpoint: bool,
    limits: Limits | None = None,
) -> LoadedModel:
    """Rebuild the model a dpruner checkpoint describes, after checking every field (a tampered or damaged file
    fails with one CheckpointError sentence, never an exception from deep inside surgery)."""
    from dpruner.io.checkpoint import fit_state_dict

    fields = _validated(obj, path, limits)
    spec_text = arch or fields["arch"]
    if spec_text is None:
        raise CheckpointError(f"'{path}' is a dpruner checkpoint without an architecture; pass --arch.")
    spec = parse_arch(spec_text)
    # The arch named inside a file is data from that file: resolving a .py path or a foreign module from it
    # would run code the user never named, which is exactly what weights_only loading is there to prevent.
    if arch is None and not spec.trusted and not trust_checkpoint:
        raise CheckpointError(
            f"'{path}' names its architecture as '{spec_text}', which would import and run that code; "
            f"confirm with --arch {spec_text} or pass --trust-checkpoint."
        )
    n_classes = num_classes if num_classes is not None else fields["num_classes"]
    from dpruner.io.arch import build_model

    model = build_model(spec, num_classes=n_classes)
    plans = fields["plan"]
    if plans:
        from dpruner.surgery.plan import PlanError, apply_plan

        for i, plan in enumerate(plans):  # a model pruned several times replays its plans in order
            try:
                apply_plan(model, plan)
            except Exception as exc:
                which = f"plan {i + 1} of {len(plans)}: " if len(plans) > 1 else ""
                detail = str(exc) if isinstance(exc, PlanError) else describe(exc)
                if arch is not None and arch != fields["arch"]:  # the user's --arch overrides the stored one
                    raise CheckpointError(
                        f"'{path}' holds a pruning plan for {fields['arch']}, which does not fit --arch {arch} "
                        f"({which}{detail}); drop --arch to use the stored architecture.") from None
                raise CheckpointError(
                    f"'{path}' holds a pruning plan that does not fit its architecture ({which}{detail}); the file "
                    "was changed or damaged."
                ) from exc
    fit_state_dict(model, fields["state_dict"], path=path, arch=spec_text, num_classes=n_classes)
    return LoadedModel(
        model=model.eval(),
        source_format="dpruner",
        arch=spec_text,
        num_classes=n_classes,
        input_shape=fields["input_shape"],
        plan=plans,
        meta=fields["meta"],
    )


MAX_ARCH_CHARS = 1000


def _validated(obj: Mapping, path: str, limits: Limits | None) -> dict:
    """Every field of a dpruner checkpoint, type-checked and normalised (plan -> list, meta -> dict)."""
    import torch

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"'{path}' {what}; the file was changed or damaged.")

    version = obj.get(FORMAT_KEY)
    if type(version) is not int:
        raise damaged(f"is marked as a dpruner checkpoint, but its format version is {_shown(version)}, not a number")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' is a dpruner checkpoint of format version {version}; this dpruner reads version "
            f"{FORMAT_VERSION} (upgrade dpruner to read it)."
        )
    stored_arch = obj.get("arch")
    if stored_arch is not None and (not isinstance(stored_arch, str) or len(stored_arch) > MAX_ARCH_CHARS):
        raise damaged(f"stores its architecture as {_shown(stored_arch)}, which is not an architecture spec")

    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise damaged("is a dpruner checkpoint without a state_dict")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise damaged(f"has a state_dict entry {_shown(key)} holding a {type(value).__name__}, not a tensor")

    num_classes = obj.get("num_classes")
    if num_classes is not None:
        if type(num_classes) is not int or num_classes <= 0:
            raise damaged(f"stores num_classes as {_shown(num_classes)}, not a positive integer")
        weights = sum(v.numel() for v in state_dict.values())
        if num_classes > weights:  # a classifier holds at least one weight per class; this stops a huge allocation
            raise damaged(f"stores num_classes {num_classes}, more than the {weights} weights it holds")

    shape = obj.get("input_shape")
    if isinstance(shape, (list, tuple)) and not shape:
        shape = None
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or len(shape) not in (3, 4, 5) or not all(
            type(d) is int and d > 0 for d in shape
        ):
            raise damaged(f"stores the input shape {_shown(shape)}, not 3 to 5 positive integers")
        from dpruner.io.shapes import check_input_elements

        try:
            check_input_elements(shape, f"the input shape stored in '{path}'", limits)
        except ShapeError as exc:
            raise CheckpointError(str(exc)) from None
        shape = tuple(shape)

    plans = obj.get("plan")
    if plans is None:
        plans = []
    elif isinstance(plans, Mapping):  # written by early versions: a single plan
        plans = [plans]
    if not isinstance(plans, list) or not all(isinstance(p, Mapping) for p in plans):
        raise damaged(f"holds a pruning plan of type {type(plans).__name__}, not a list of plans (dicts)")

    meta = obj.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise damaged(f"holds meta of type {type(meta).__name__}, not a dict")
    return {"arch": stored_arch, "num_classes": num_classes, "input_shape": shape, "plan": plans,
            "meta": dict(meta), "state_dict": state_dict}


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
