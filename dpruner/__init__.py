"""dpruner: structured (filter/channel) pruning for trained PyTorch CNNs.

The public API is imported lazily so that `import dpruner` (and `dpruner --help`) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "dpruner.io.checkpoint",
    "load_checkpoint": "dpruner.io.checkpoint",
    "save_checkpoint": "dpruner.io.dpruner_format",
    "LoadedModel": "dpruner.io.dpruner_format",
    "parse_input_shape": "dpruner.io.shapes",
    "build_model": "dpruner.io.arch",
    "analyze": "dpruner.analysis.analyze",
    "Analysis": "dpruner.analysis.analyze",
    "count_macs": "dpruner.metrics.macs",
    "count_params": "dpruner.metrics.macs",
    "DprunerError": "dpruner.errors",
    "prune": "dpruner.methods.api",
    "PruneResult": "dpruner.methods.api",
    "run": "dpruner.methods.run",
    "MethodResult": "dpruner.methods.run",
    "OneShotConfig": "dpruner.methods.run",
    "ToleranceConfig": "dpruner.methods.tolerance",
    "SPPConfig": "dpruner.methods.spp",
    "GateConfig": "dpruner.methods.gate",
    "CoarseConfig": "dpruner.methods.coarse",
    "TrainConfig": "dpruner.train.config",
    "load_data": "dpruner.data.loaders",
    "build_graph": "dpruner.graph.build",
    "channel_groups": "dpruner.graph.groups",
    "apply_plan": "dpruner.surgery.plan",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpruner' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
