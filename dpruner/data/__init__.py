"""Data sets: `--data` specs (`spec`, torch-free) and the loaders built from them (`loaders`, imported lazily).

`from dpruner.data import load_data` works, but importing this package alone does not import torch.
"""

from __future__ import annotations

import importlib

from dpruner.data.spec import DataError, DataSpec, parse_data_spec

_LAZY = {name: "dpruner.data.loaders" for name in ("DataBundle", "ShardSampler", "load_data")}

__all__ = ["DataBundle", "DataError", "DataSpec", "ShardSampler", "load_data", "parse_data_spec"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpruner.data' has no attribute {name!r}")
