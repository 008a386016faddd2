"""Reading a checkpoint's pickles without running them: which globals they import (so a file that would run code
is named as such) and how much tensor storage they declare (so a legacy file cannot make torch allocate more than
it holds). pickletools.genops only parses; a small stack model follows STACK_GLOBAL and persistent ids."""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from typing import NamedTuple

from dpruner.usercode import describe


# Bytes per element of the legacy storage types (torch.FloatStorage -> 'Float'); unknown types count as the widest.
_ELEMENT_BYTES = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt8": 1, "QUInt8": 1, "QInt32": 4, "QUInt4x2": 1,
    "QUInt2x4": 1, "Untyped": 1,
}
_WIDEST = 16
# Helpers every pickled object goes through: named only when nothing more telling is there.
_PICKLE_HELPERS = {"copyreg._reconstructor", "copyreg.__newobj__", "builtins.object"}
_LEGACY_PICKLES = 5  # magic number, protocol, sys_info, the object, storage keys; raw tensor data follows


@dataclass
class PickleScan:
    globals: list = field(default_factory=list)  # 'module.name' of every global imported, in order
    storage_bytes: int = 0  # tensor storage declared by persistent ids, per distinct storage
    error: str | None = None  # why parsing stopped (None: every pickle parsed)


class _Global(NamedTuple):
    module: str
    name: str


_MARK = object()
_OPAQUE = object()


class _Bounded:
    """A read-only view of a file that never asks for more bytes than remain (a pickle can declare any length)."""

    def __init__(self, fh, size: int):
        self._fh, self._size = fh, size

    def read(self, n: int = -1) -> bytes:
        remaining = max(self._size - self._fh.tell(), 0)
        return self._fh.read(remaining if n is None or n < 0 else min(n, remaining))

    def readline(self) -> bytes:
        return self._fh.readline(max(self._size - self._fh.tell(), 0))

    def tell(self) -> int:
        return self._fh.tell()

    def at_end(self) -> bool:
        return self._fh.tell() >= self._size


def scan_file(path: str, kind: str) -> PickleScan:
    """Scan the pickle(s) of a checkpoint: data.pkl in a torch.save zip, the leading pickles of the legacy format."""
    try:
        if kind == "torch-zip":
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
                if not names:
                    return PickleScan(error="no data.pkl in the archive")
                data = zf.read(min(names, key=len))
            return _scan_pickles(io.BytesIO(data), len(data), 1)
        with open(path, "rb") as fh:
            return _scan_pickles(fh, os.path.getsize(path), _LEGACY_PICKLES)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        return PickleScan(error=describe(exc))


def _scan_pickles(fh, size: int, count: int) -> PickleScan:
    """Walk up to `count` consecutive pickles with pickletools.genops (which parses and never executes), tracking just
    enough of the stack to name STACK_GLOBAL imports and read storage persistent ids."""
    scan = PickleScan()
    storages: dict = {}
    reader = _Bounded(fh, size)
    for _ in range(count):
        if reader.at_end():
            break
        try:
            _scan_one(reader, scan.globals, storages)
        except Exception as exc:  # genops: bad opcode, truncated argument, missing STOP
            scan.error = describe(exc)
            break
    scan.storage_bytes = sum(storages.values())
    return scan


def _scan_one(reader: _Bounded, found: list, storages: dict) -> None:
    stack: list = []
    memo: dict = {}

    def pop():
        return stack.pop() if stack else _OPAQUE

    def pop_mark() -> list:
        items = []
        while stack and stack[-1] is not _MARK:
            items.append(stack.pop())
        if stack:
            stack.pop()
        return items[::-1]

    for op, arg, _pos in pickletools.genops(reader):
        name = op.name
        if name == "STOP":
            return
        if name == "MARK":
            stack.append(_MARK)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else _OPAQUE
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _OPAQUE
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _OPAQUE))
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            if name == "INST":
                pop_mark()
            stack.append(_note_global(found, module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            if isinstance(module, str) and isinstance(attr, str):
                stack.append(_note_global(found, module, attr))
            else:
                found.append("<a computed global>")
                stack.append(_OPAQUE)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [pop() for _ in range(int(name[-1]))]
            stack.append(tuple(reversed(items)))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("BINPERSID", "PERSID"):
            _note_storage(pop() if name == "BINPERSID" else arg, storages)
            stack.append(_OPAQUE)
        elif not op.stack_before and len(op.stack_after) == 1 and arg is not None:
            stack.append(arg)  # a constant: int, float, str, bytes
        else:  # anything else: pop what it consumes, push placeholders for what it produces
            before = list(op.stack_before)
            if pickletools.markobject in before:
                pop_mark()
                before = before[: before.index(pickletools.markobject)]
            for _ in before:
                pop()
            stack.extend(_OPAQUE for _ in op.stack_after)
    raise ValueError("pickle exhausted before seeing STOP")


def _note_global(found: list, module: str, attr: str) -> _Global:
    # torch.save writes protocol 2, whose names are Python 2's (__builtin__.set); map them as pickle does.
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    found.append(f"{module}.{attr}")
    return _Global(module, attr)


def _note_storage(pid, storages: dict) -> None:
    """Record ('storage', <torch.XStorage>, key, location, numel[, view]) persistent ids: numel elements of X."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
        return
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if type(numel) is not int or numel < 0:
        return
    kind = storage_type.name.removesuffix("Storage") if isinstance(storage_type, _Global) else ""
    nbytes = numel * _ELEMENT_BYTES.get(kind, _WIDEST)
    try:
        hash(key)
    except TypeError:
        key = ("unhashable", len(storages))
    storages[key] = max(storages.get(key, 0), nbytes)


def first_disallowed(names: list) -> str | None:
    """The first global that torch's weights-only unpickler would not import (pickle's own helpers last)."""
    try:
        from torch import _weights_only_unpickler as wou

        allowed = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except Exception:  # private API moved: accept torch's own names, refuse the rest
        allowed = None
    refused = [n for n in names if (n not in allowed if allowed is not None else not n.startswith("torch."))]
    telling = [n for n in refused if n not in _PICKLE_HELPERS]
    return (telling or refused or [None])[0]
