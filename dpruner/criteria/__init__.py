"""Channel-importance criteria: pure functions `fn(GroupTensors) -> Tensor[n_channels]`, higher = keep.

How a group's members are aggregated: each producing layer's per-channel measure is divided by that layer's mean
over the group (so layers of different fan-in weigh the same), then averaged over the producers. Registry:
CRITERIA; get_criterion(name) resolves one with a clear error.
"""

from dpruner.criteria.basic import CRITERIA, get_criterion

__all__ = ["CRITERIA", "get_criterion"]
