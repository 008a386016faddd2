"""Channel-importance criteria: `Criterion` objects wrapping pure functions `fn(GroupTensors) -> Tensor[n_channels]`,
higher = keep, each declaring what it needs (weights; or gradients/activations, gathered by criteria.stats).

How a group's members are aggregated: each producing layer's per-channel measure is divided by that layer's mean
over the group (so layers of different fan-in weigh the same), then averaged over the producers. Registry:
CRITERIA; get_criterion(name) resolves one with a clear error.
"""

from dpruner.criteria.basic import CRITERIA, Criterion, get_criterion

__all__ = ["CRITERIA", "Criterion", "get_criterion"]
