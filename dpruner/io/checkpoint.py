"""Safe model loading: the one entry point every command uses.

Order of business: check the file exists, sniff what kind of file it is (so a TorchScript archive, an ONNX model or
random bytes get a precise message), bound what loading it would allocate, ``torch.load(weights_only=True)``, and
only with ``trust_checkpoint=True`` fall back to full unpickling. The loaded object is then one of: a dpruner
checkpoint, a state_dict (plain, or under a ``state_dict``/``model`` key, possibly with DataParallel's ``module.``
prefix) that needs an architecture, or a whole pickled ``nn.Module``.

Memory bounds (dpruner.io.limits): a zip archive's uncompressed size is read from its directory and checked before
torch inflates anything; a legacy (non-zip) file may not be larger than the limit, nor declare more tensor storage
in its pickle (read with pickletools, nothing executed) than the file holds; in a zip, torch itself checks each
storage against its record before allocating. Left open: what a pickle builds from its own bytes (a long list, say)
is bounded only by the file's size, and so by the load limit.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from dpruner.errors import ArchError, CheckpointError, InputError
from dpruner.io.arch import EXAMPLES, build_model
from dpruner.io.dpruner_format import LoadedModel, is_dpruner_checkpoint, load_dpruner_checkpoint
from dpruner.io.limits import ENV_MAX_LOAD_BYTES, ZIP_INFLATE_SLACK_BYTES, Limits, format_bytes, limits_from_env
from dpruner.io.pickle_scan import PickleScan, first_disallowed, scan_file
from dpruner.usercode import describe

SUPPORTED = "a state_dict (with --arch), a dpruner checkpoint, or a pickled nn.Module (with --trust-checkpoint)"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "ema")
# Prefixes that wrappers add to every key: DataParallel/DistributedDataParallel, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 3  # how many offending keys an error message names


def load_model(
    path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    limits: Limits | None = None,
):
    """Load a model from a checkpoint file, in eval mode. See load_checkpoint for what is accepted."""
    return load_checkpoint(
        path, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint, limits=limits
    ).model


def load_checkpoint(
    path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    limits: Limits | None = None,
) -> LoadedModel:
    """Load a checkpoint and return the model with what the file says about it (arch, input shape, plan).
    `limits` bounds what the file may make dpruner allocate (None: the defaults, overridden by the environment)."""
    path = str(path)
    limits = limits if limits is not None else limits_from_env()
    obj = _read(path, trust_checkpoint=trust_checkpoint, limits=limits)
    import torch

    if isinstance(obj, torch.nn.Module):
        if arch is not None:
            raise InputError(f"'{path}' holds a whole model, so --arch is not needed; drop it.")
        return LoadedModel(model=_float(obj).eval(), source_format="pickled-module", meta=_dtype_meta(obj))
    if is_dpruner_checkpoint(obj):
        return load_dpruner_checkpoint(
            obj, path, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint, limits=limits
        )
    found = find_state_dict(obj, path)
    if isinstance(found, torch.nn.Module):  # e.g. {"model": <nn.Module>, "epoch": 3}, readable only when trusted
        meta = _dtype_meta(found)
        ours = obj.get("dpruner") if isinstance(obj, Mapping) else None  # what a pruned pickle recorded (save_pruned)
        shape = ours.get("input_shape") if isinstance(ours, Mapping) else None
        shape = tuple(shape) if isinstance(shape, (list, tuple)) and all(type(d) is int and d > 0 for d in shape) \
            else None
        return LoadedModel(model=_float(found).eval(), source_format="pickled-module", container=obj, meta=meta,
                           input_shape=shape)
    if arch is None:
        raise ArchError(
            f"'{path}' holds only weights (a state_dict); say which architecture they belong to with --arch, "
            f"e.g. {EXAMPLES}."
        )
    model = build_model(arch, num_classes=num_classes)
    fit_state_dict(model, found, path=path, arch=arch, num_classes=num_classes)
    return LoadedModel(model=model.eval(), source_format="state_dict", arch=arch, num_classes=num_classes)


def _dtype_meta(model) -> dict:
    """{'dtype': name} of a pickled model's weights as stored (computed before _float), so it is written back so."""
    import torch

    return {"dtype": str(next(model.parameters(), torch.empty(0)).dtype).removeprefix("torch.")}


def _float(model):
    """A half-precision pickled model (Ultralytics stores its weights in float16) in float32: pruning, counting
    and checking run on the CPU, where float16 convolutions are slow or missing."""
    import torch

    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model.float()
    return model


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
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
                RuntimeError):  # a damaged directory (UnicodeDecodeError is a ValueError)
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


def _read(path: str, *, trust_checkpoint: bool, limits: Limits) -> Any:
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

    check_torch_version(torch.__version__)
    scan = _check_zip_sizes(path, limits) if kind == "torch-zip" else _check_pickle_sizes(path, limits)
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError/EOFError/ValueError/... for refused files
        refused = exc
    scan = scan or scan_file(path, kind)
    code = first_disallowed(scan.globals)
    if code is None:
        if isinstance(refused, pickle.UnpicklingError) and scan.error is None:
            # every opcode parses and names only tensor types, yet the weights-only unpickler cannot read it
            if not trust_checkpoint:
                raise CheckpointError(
                    f"'{path}' uses pickle features that safe loading does not support "
                    f"({_weights_only_reason(refused)}); re-save it with torch.save's defaults, or pass "
                    "--trust-checkpoint if you trust where the file came from."
                ) from refused
        else:
            reason = _weights_only_reason(refused) if isinstance(refused, pickle.UnpicklingError) else describe(refused)
            raise CheckpointError(f"'{path}' is truncated or corrupt ({reason}).") from refused
    elif not trust_checkpoint:
        raise CheckpointError(
            f"'{path}' contains pickled Python objects (here {code}), and unpickling them can run arbitrary code, "
            "so dpruner refuses it; if you trust where the file came from (e.g. a whole model you saved with "
            "torch.save(model)), pass --trust-checkpoint, or save model.state_dict() instead."
        ) from refused
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"'{path}' could not be unpickled even as trusted ({describe(exc)}).") from exc


MIN_TORCH = (2, 6)


def check_torch_version(version: str) -> None:
    """Refuse torch older than 2.6: its weights_only=True loading can be bypassed (CVE-2025-32434)."""
    found = re.match(r"(\d+)\.(\d+)", str(version))
    if found and (int(found.group(1)), int(found.group(2))) < MIN_TORCH:
        raise CheckpointError(
            f"torch {version} is older than 2.6, whose weights_only loading has a known bypass (CVE-2025-32434); "
            "upgrade torch (pip install 'torch>=2.6') to load checkpoints safely."
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.load warns about pickle protocols and weights_only defaults; dpruner reports refusals itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_zip_sizes(path: str, limits: Limits) -> None:
    """Refuse, from the zip's directory alone, an archive that would inflate past the load limit or far past its own
    size (torch.save stores entries uncompressed, so only a zip bomb does that)."""
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(f"'{path}' is a truncated or corrupt zip archive ({describe(exc)}).") from exc
    on_disk = os.path.getsize(path)
    if total > on_disk + ZIP_INFLATE_SLACK_BYTES:
        raise CheckpointError(
            f"'{path}' is a zip archive of {format_bytes(on_disk)} whose entries inflate to {format_bytes(total)} "
            "(torch.save never compresses them), so dpruner refuses it as a likely zip bomb."
        )
    _check_load_limit(path, total, limits)


def _check_pickle_sizes(path: str, limits: Limits) -> PickleScan:
    """The legacy (non-zip) format allocates each tensor storage at the size its pickle declares before reading the
    data, and all that data lies in the file: refuse a file that declares more than it holds."""
    on_disk = os.path.getsize(path)
    _check_load_limit(path, on_disk, limits)
    scan = scan_file(path, "pickle")
    if scan.storage_bytes > on_disk:
        raise CheckpointError(
            f"'{path}' declares {format_bytes(scan.storage_bytes)} of tensor data but holds only "
            f"{format_bytes(on_disk)}, so it is damaged or made to exhaust memory; dpruner refuses it."
        )
    return scan


def _check_load_limit(path: str, size: int, limits: Limits) -> None:
    if size > limits.max_load_bytes:
        raise CheckpointError(
            f"'{path}' holds {format_bytes(size)} ({size:,} bytes) uncompressed, more than dpruner's load limit of "
            f"{format_bytes(limits.max_load_bytes)}; if that size is expected, raise the limit with "
            f"{ENV_MAX_LOAD_BYTES}={size}."
        )


def _weights_only_reason(exc: BaseException) -> str:
    """The specific part of torch's long weights-only message (e.g. 'Unsupported operand 103')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("Unsupported")]
    return specific[0] if specific else "unreadable pickle data"


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
        if not obj:
            raise CheckpointError(f"'{path}' holds an empty dict; dpruner reads {SUPPORTED}.")
        keys = ", ".join(_clip(repr(k)) for k in list(obj)[:8])
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
        try:
            model.load_state_dict({**expected, **state_dict}, strict=True)
        except Exception as exc:  # e.g. a sparse or meta tensor where a dense one belongs
            raise CheckpointError(f"The weights in '{path}' cannot be loaded into {arch} ({describe(exc)}).") from exc
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if mismatched:
        shown = "; ".join(f"{_clip(k)}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:MAX_LISTED])
        more = f"; and {len(mismatched) - MAX_LISTED} more" if len(mismatched) > MAX_LISTED else ""
        parts.append(f"{len(mismatched)} shape mismatches ({shown}{more})")
    hint = ""
    last = mismatched[-1] if mismatched else None
    if num_classes is None and last and len(last[1]) in (1, 2) and last[1][0] != last[2][0] and not missing:
        hint = f"; if the classifier was trained for {last[1][0]} classes, pass --num-classes {last[1][0]}"
    raise ArchError(f"The weights in '{path}' do not fit {arch}: {', '.join(parts)}{hint}.")


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(keys: list[str]) -> str:
    shown = ", ".join(_clip(k) for k in keys[:MAX_LISTED])
    return shown + (f", ... {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")
