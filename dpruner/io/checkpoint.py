"""Safe model loading: the one entry point every command uses.

Order of business: check the file exists, sniff what kind of file it is (so a TorchScript archive, an ONNX model or
random bytes get a precise message), ``torch.load(weights_only=True)``, and only with ``trust_checkpoint=True`` fall
back to full unpickling. The loaded object is then one of: a dpruner checkpoint, a state_dict (plain, or under a
``state_dict``/``model`` key, possibly with DataParallel's ``module.`` prefix) that needs an architecture, or a whole
pickled ``nn.Module``.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

from dpruner.errors import ArchError, CheckpointError, InputError
from dpruner.io.arch import EXAMPLES, build_model
from dpruner.io.dpruner_format import LoadedModel, is_dpruner_checkpoint, load_dpruner_checkpoint

SUPPORTED = "a state_dict (with --arch), a dpruner checkpoint, or a pickled nn.Module (with --trust-checkpoint)"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
# Prefixes that wrappers add to every key: DataParallel/DistributedDataParallel, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 3  # how many offending keys an error message names


def load_model(path, *, arch: str | None = None, num_classes: int | None = None, trust_checkpoint: bool = False):
    """Load a model from a checkpoint file, in eval mode. See load_checkpoint for what is accepted."""
    return load_checkpoint(path, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint).model


def load_checkpoint(
    path, *, arch: str | None = None, num_classes: int | None = None, trust_checkpoint: bool = False
) -> LoadedModel:
    """Load a checkpoint and return the model with what the file says about it (arch, input shape, plan)."""
    path = str(path)
    obj = _read(path, trust_checkpoint=trust_checkpoint)
    import torch

    if isinstance(obj, torch.nn.Module):
        if arch is not None:
            raise InputError(f"'{path}' holds a whole model, so --arch is not needed; drop it.")
        return LoadedModel(model=obj.eval(), source_format="pickled-module")
    if is_dpruner_checkpoint(obj):
        return load_dpruner_checkpoint(
            obj, path, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint
        )
    found = find_state_dict(obj, path)
    if isinstance(found, torch.nn.Module):  # e.g. {"model": <nn.Module>, "epoch": 3}, readable only when trusted
        return LoadedModel(model=found.eval(), source_format="pickled-module")
    if arch is None:
        raise ArchError(
            f"'{path}' holds only weights (a state_dict); say which architecture they belong to with --arch, "
            f"e.g. {EXAMPLES}."
        )
    model = build_model(arch, num_classes=num_classes)
    fit_state_dict(model, found, path=path, arch=arch, num_classes=num_classes)
    return LoadedModel(model=model.eval(), source_format="state_dict", arch=arch, num_classes=num_classes)


def sniff(path: str) -> str:
    """Name the kind of file by its first bytes: 'torch-zip', 'torchscript', 'pickle', 'safetensors', 'onnx',
    'empty', 'corrupt-zip' or 'unknown'."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "corrupt-zip"
        # TorchScript archives carry the model's code and constants; torch.save archives only data.pkl + data/.
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch-zip"
    if head[:1] == b"\x80":  # pickle protocol opcode: torch.save's legacy (non-zip) format
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    if path.lower().endswith(".onnx") or head[:1] == b"\x08":  # ModelProto field 1 (ir_version), a varint
        return "onnx"
    return "unknown"


_FOUND = {
    "torchscript": "a TorchScript archive (torch.jit.save)",
    "safetensors": "a safetensors file",
    "onnx": "an ONNX model",
    "empty": "an empty file",
    "corrupt-zip": "a truncated or corrupt zip archive",
}


def _read(path: str, *, trust_checkpoint: bool) -> Any:
    if not os.path.exists(path):
        raise InputError(f"No such file: '{path}'.")
    if os.path.isdir(path):
        raise InputError(f"'{path}' is a directory, not a checkpoint file.")
    kind = sniff(path)
    if kind in _FOUND:
        raise CheckpointError(f"'{path}' is {_FOUND[kind]}; dpruner reads {SUPPORTED}.")
    if kind == "unknown":
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (unrecognised content); dpruner reads {SUPPORTED}.")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if not trust_checkpoint:
            if found is None:  # the weights-only unpickler met bytes it cannot parse: damaged data
                raise CheckpointError(f"'{path}' is truncated or corrupt ({_weights_only_reason(exc)}).") from exc
            raise CheckpointError(
                f"'{path}' contains pickled Python objects (here {found.group(1)}, as in a whole model saved with "
                "torch.save(model)), and unpickling them can run arbitrary code, so dpruner refuses it; pass "
                "--trust-checkpoint if you trust where the file came from, or save model.state_dict() instead."
            ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/... for damaged files
        raise CheckpointError(f"'{path}' is truncated or corrupt ({_first_line(exc)}).") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"'{path}' could not be unpickled even as trusted ({_first_line(exc)}).") from exc


def _weights_only_reason(exc: BaseException) -> str:
    """The specific part of torch's long weights-only message (e.g. 'Unsupported operand 103')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("Unsupported")]
    return specific[0] if specific else "unreadable pickle data"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def find_state_dict(obj: Any, path: str):
    """The state_dict inside a loaded object (prefixes stripped), or an nn.Module found under a known key."""
    import torch

    if _is_state_dict(obj):
        return strip_wrapper_prefix(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            value = obj.get(key)
            if _is_state_dict(value):
                return strip_wrapper_prefix(value)
            if isinstance(value, torch.nn.Module):
                return value
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(
            f"'{path}' holds a dict with keys {keys} but no state_dict (looked for a dict of tensors at the top "
            f"level or under {', '.join(STATE_DICT_KEYS)})."
        )
    raise CheckpointError(f"'{path}' holds a {type(obj).__name__}; dpruner reads {SUPPORTED}.")


def strip_wrapper_prefix(state_dict: Mapping) -> dict:
    """Drop a 'module.' (DataParallel) or '_orig_mod.' (torch.compile) prefix shared by every key."""
    out = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def fit_state_dict(model, state_dict: Mapping, *, path: str, arch: str, num_classes: int | None) -> None:
    """Load weights strictly, turning every mismatch into one sentence that names the first few offenders.

    BatchNorm's ``num_batches_tracked`` counters may be absent (older checkpoints omit them): they only matter when
    momentum is None, and the freshly built module's value is kept.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        model.load_state_dict({**expected, **state_dict}, strict=True)
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if mismatched:
        shown = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:MAX_LISTED])
        more = f"; and {len(mismatched) - MAX_LISTED} more" if len(mismatched) > MAX_LISTED else ""
        parts.append(f"{len(mismatched)} shape mismatches ({shown}{more})")
    hint = ""
    last = mismatched[-1] if mismatched else None
    if num_classes is None and last and len(last[1]) in (1, 2) and last[1][0] != last[2][0] and not missing:
        hint = f"; if the classifier was trained for {last[1][0]} classes, pass --num-classes {last[1][0]}"
    raise ArchError(f"The weights in '{path}' do not fit {arch}: {', '.join(parts)}{hint}.")


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")
