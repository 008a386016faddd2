"""Architecture specs: how a user names the model class that a state_dict belongs to.

Four forms, all ending in a callable that returns an ``nn.Module``:
``torchvision:NAME`` (a torchvision builder, never with downloaded weights), ``timm:NAME`` (``timm.create_model``
with ``pretrained=False``; timm is the user's package, not a dpruner dependency), ``path/to/file.py:factory`` and
``package.module:factory``. ``--num-classes N`` is passed to the builder as ``num_classes=N``. Every build runs
under no_network: nothing dpruner builds may download weights or reach the network.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dpruner.errors import ArchError
from dpruner.io.network import no_network
from dpruner.usercode import describe, user_code

EXAMPLES = "torchvision:resnet18, timm:efficientnet_b0, path/to/model.py:build, or my_package.models:build"
BUILDER_KINDS = ("torchvision", "timm")  # model zoos named as KIND:NAME, built without any pretrained weights


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture spec; `kind` is 'torchvision', 'file' or 'module'."""

    kind: str
    target: str
    factory: str
    text: str

    @property
    def trusted(self) -> bool:
        """True for the documented builders only (torchvision:NAME, built without weights, and dpruner.zoo:NAME for
        a public zoo builder): safe to take from a file. Anything else a file names needs the user's word."""
        if self.kind in BUILDER_KINDS:
            return True
        return self.kind == "module" and self.target == "dpruner.zoo" and self.factory in zoo_builders()


def zoo_builders() -> frozenset[str]:
    """Names of dpruner.zoo's public builders (its __all__)."""
    import dpruner.zoo

    return frozenset(getattr(dpruner.zoo, "__all__", ()))


def parse_arch(text: str) -> ArchSpec:
    """Parse 'torchvision:NAME', 'file.py:factory' or 'package.module:factory' into an ArchSpec."""
    text = text.strip()
    if ":" not in text:
        raise ArchError(f"Architecture spec '{text}' has no ':'; use one of {EXAMPLES}.")
    target, factory = text.rsplit(":", 1)
    if not target or not factory:
        raise ArchError(f"Architecture spec '{text}' is incomplete; use one of {EXAMPLES}.")
    if target in BUILDER_KINDS:
        return ArchSpec(target, target, factory, text)
    if target.endswith(".py") or "/" in target or "\\" in target:
        return ArchSpec("file", target, factory, text)
    if not all(part.isidentifier() for part in target.split(".")):
        raise ArchError(f"Architecture spec '{text}' names neither a .py file nor a Python module; use one of {EXAMPLES}.")
    return ArchSpec("module", target, factory, text)


def build_model(spec: str | ArchSpec, *, num_classes: int | None = None) -> "torch.nn.Module":  # noqa: F821
    """Instantiate the architecture a spec names (random weights; nothing is downloaded)."""
    import torch

    spec = parse_arch(spec) if isinstance(spec, str) else spec
    if spec.kind == "module" and spec.target.split(".")[0] == "dpruner" and not spec.trusted:
        # dpruner's own modules hold no architectures but the zoo's (calling e.g. its CLI would re-enter dpruner)
        raise ArchError(f"'{spec.text}' is not one of dpruner's architectures; those are "
                        f"{', '.join(f'dpruner.zoo:{name}' for name in sorted(zoo_builders()))}.")
    with no_network(f"Building '{spec.text}'", hint=_offline_hint(spec)):
        if spec.kind == "torchvision":
            model = _build_torchvision(spec.factory, num_classes)
        elif spec.kind == "timm":
            model = _build_timm(spec.factory, num_classes)
        else:
            factory = _load_factory(spec)
            model = _call_factory(factory, spec, num_classes)
    if not isinstance(model, torch.nn.Module):
        raise ArchError(f"'{spec.text}' returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _build_torchvision(name: str, num_classes: int | None):
    try:
        import torchvision.models as tvm
    except Exception as exc:  # an ImportError, or torchvision's C++ ops failing to load against this torch
        raise ArchError(
            f"torchvision:{name} needs a working torchvision, and importing it failed ({type(exc).__name__}: "
            f"{exc}); install the pinned pair from constraints.txt."
        ) from exc
    names = tvm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " `python -c 'import torchvision; print(torchvision.models.list_models())'` lists them."
        raise ArchError(f"torchvision has no model named '{name}'.{hint}")
    builder = tvm.get_model_builder(name)
    kwargs: dict = {"weights": None, **_no_weights_kwargs(builder)}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with warnings.catch_warnings():
        # e.g. GoogLeNet/Inception warn that init_weights will change default; irrelevant for loading weights.
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        try:
            return builder(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ArchError(f"torchvision:{name} could not be built with {kwargs}: {exc}") from exc
        except Exception as exc:  # e.g. out of memory for a huge num_classes
            raise ArchError(f"Building torchvision:{name} failed: {describe(exc)}") from exc


def _build_timm(name: str, num_classes: int | None):
    """timm.create_model(NAME, pretrained=False[, num_classes=N]): random weights, nothing downloaded."""
    try:
        import timm
    except Exception as exc:  # not installed, or broken against this torch
        raise ArchError(f"timm:{name} needs the timm package, which is not installed or does not import "
                        f"({describe(exc)}); `pip install timm` (dpruner does not require it).") from exc
    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " `python -c 'import timm; print(timm.list_models())'` lists them."
        raise ArchError(f"timm has no model named '{name}'.{hint}")
    kwargs: dict = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with warnings.catch_warnings(), user_code(f"Building timm:{name}", error=ArchError):
        warnings.simplefilter("ignore")
        return timm.create_model(name, **kwargs)


def default_input_shape(arch: str | None) -> tuple[int, ...] | None:
    """N,C,H,W a model zoo documents for an architecture (torchvision: 3x224x224; timm: the model's pretrained
    config), or None when the spec does not say."""
    if not arch:
        return None
    spec = parse_arch(arch)
    if spec.kind == "torchvision":
        return (1, 3, 224, 224)
    if spec.kind == "timm":
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(spec.factory)
        except Exception:  # timm missing or the name unknown: the caller asks for --input-shape
            return None
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        return (1, *map(int, size)) if size else None
    return None


def _no_weights_kwargs(builder) -> dict:
    """None (or False for a flag) for every weights/pretrained parameter of a builder: detection and segmentation
    builders default to an ImageNet backbone (weights_backbone), which dpruner never downloads."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: (False if isinstance(p.default, bool) else None)
        for p in params
        if ("weights" in p.name or p.name.startswith("pretrained")) and p.name != "init_weights"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _offline_hint(spec: ArchSpec) -> str:
    """What to do instead when building `spec` tried to download weights."""
    if spec.target.split(".")[0] == "torchvision" and spec.kind == "module":
        try:
            import torchvision.models as tvm

            if spec.factory in tvm.list_models():
                return f"use --arch torchvision:{spec.factory}, which builds it without any weights"
        except Exception:  # a broken torchvision: fall back to the general advice
            pass
    return "make the factory build the model without pretrained weights (the checkpoint supplies them)"


def _load_factory(spec: ArchSpec) -> Callable:
    if spec.kind == "file":
        path = Path(spec.target)
        if not path.is_file():
            raise ArchError(f"Architecture file '{spec.target}' does not exist.")
        from dpruner.io.pyimport import import_by_path

        module = import_by_path(path, "dpruner_user_arch", ArchError, "Architecture file")
    else:
        with user_code(f"Importing '{spec.target}'", error=ArchError):
            try:
                module = importlib.import_module(spec.target)
            except ImportError as exc:
                raise ArchError(f"Python module '{spec.target}' cannot be imported: {describe(exc)}") from exc
    with user_code(f"Looking up '{spec.factory}' in '{spec.target}'", error=ArchError):
        factory = getattr(module, spec.factory, None)
    if factory is None or not callable(factory):
        raise ArchError(f"'{spec.target}' has no callable named '{spec.factory}'.")
    return factory


def _call_factory(factory: Callable, spec: ArchSpec, num_classes: int | None):
    kwargs = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters
            accepts = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            accepts = False
        if not accepts:
            raise ArchError(f"'{spec.text}' takes no num_classes argument, so --num-classes cannot be used with it.")
        kwargs["num_classes"] = num_classes
    with user_code(f"Calling '{spec.text}'", error=ArchError):
        return factory(**kwargs)


def resolve_class(text: str) -> type:
    """'package.module:Class' or 'file.py:Class' -> the class (for --leaf)."""
    spec = parse_arch(text)
    if spec.kind in BUILDER_KINDS:
        raise ArchError(f"--leaf takes package.module:Class or file.py:Class, got '{text}'.")
    cls = _load_factory(spec)
    if not isinstance(cls, type):
        raise ArchError(f"'{text}' is not a class.")
    return cls
