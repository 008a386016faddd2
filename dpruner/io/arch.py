"""Architecture specs: how a user names the model class that a state_dict belongs to.

Three forms, all ending in a callable that returns an ``nn.Module``:
``torchvision:NAME`` (a torchvision builder, never with downloaded weights), ``path/to/file.py:factory`` and
``package.module:factory``. ``--num-classes N`` is passed to the builder as ``num_classes=N``.
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

# Modules whose factories dpruner may resolve from a name stored inside a checkpoint without asking: importing
# them runs only code that is already installed and trusted. Anything else named by a file needs the user's word.
_TRUSTED_MODULE_PREFIXES = ("dpruner.", "torchvision.")

EXAMPLES = "torchvision:resnet18, path/to/model.py:build, or my_package.models:build"


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture spec; `kind` is 'torchvision', 'file' or 'module'."""

    kind: str
    target: str
    factory: str
    text: str

    @property
    def trusted(self) -> bool:
        """True when resolving this spec runs no code that was not already installed (safe to take from a file)."""
        if self.kind == "torchvision":
            return True
        return self.kind == "module" and (self.target + ".").startswith(_TRUSTED_MODULE_PREFIXES)


def parse_arch(text: str) -> ArchSpec:
    """Parse 'torchvision:NAME', 'file.py:factory' or 'package.module:factory' into an ArchSpec."""
    text = text.strip()
    if ":" not in text:
        raise ArchError(f"Architecture spec '{text}' has no ':'; use one of {EXAMPLES}.")
    target, factory = text.rsplit(":", 1)
    if not target or not factory:
        raise ArchError(f"Architecture spec '{text}' is incomplete; use one of {EXAMPLES}.")
    if target == "torchvision":
        return ArchSpec("torchvision", "torchvision", factory, text)
    if target.endswith(".py") or "/" in target or "\\" in target:
        return ArchSpec("file", target, factory, text)
    if not all(part.isidentifier() for part in target.split(".")):
        raise ArchError(f"Architecture spec '{text}' names neither a .py file nor a Python module; use one of {EXAMPLES}.")
    return ArchSpec("module", target, factory, text)


def build_model(spec: str | ArchSpec, *, num_classes: int | None = None) -> "torch.nn.Module":  # noqa: F821
    """Instantiate the architecture a spec names (random weights; nothing is downloaded)."""
    import torch

    spec = parse_arch(spec) if isinstance(spec, str) else spec
    if spec.kind == "torchvision":
        model = _build_torchvision(spec.factory, num_classes)
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
    params = inspect.signature(builder).parameters
    kwargs: dict = {"weights": None}
    # Detection/segmentation builders default to downloading an ImageNet backbone; dpruner never downloads.
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
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


def _load_factory(spec: ArchSpec) -> Callable:
    if spec.kind == "file":
        path = Path(spec.target)
        if not path.is_file():
            raise ArchError(f"Architecture file '{spec.target}' does not exist.")
        from dpruner.io.pyimport import import_by_path

        module = import_by_path(path, "dpruner_user_arch", ArchError, "Architecture file")
    else:
        try:
            module = importlib.import_module(spec.target)
        except ImportError as exc:
            raise ArchError(f"Python module '{spec.target}' cannot be imported: {exc}") from exc
    factory = getattr(module, spec.factory, None)
    if factory is None or not callable(factory):
        raise ArchError(f"'{spec.target}' has no callable named '{spec.factory}'.")
    return factory


def _call_factory(factory: Callable, spec: ArchSpec, num_classes: int | None):
    kwargs = {}
    if num_classes is not None:
        try:
            accepts = "num_classes" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepts = False
        if not accepts:
            raise ArchError(f"'{spec.text}' takes no num_classes argument, so --num-classes cannot be used with it.")
        kwargs["num_classes"] = num_classes
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise ArchError(f"Calling '{spec.text}' failed: {type(exc).__name__}: {exc}") from exc


def resolve_class(text: str) -> type:
    """'package.module:Class' or 'file.py:Class' -> the class (for --leaf)."""
    spec = parse_arch(text)
    if spec.kind == "torchvision":
        raise ArchError(f"--leaf takes package.module:Class or file.py:Class, got '{text}'.")
    cls = _load_factory(spec)
    if not isinstance(cls, type):
        raise ArchError(f"'{text}' is not a class.")
    return cls
