"""Data-free criteria: L1 / L2 filter norm (Li et al. 2017), FPGM (He et al. 2019), BN scale (network slimming),
and random (a baseline for tests and benchmarks)."""

from __future__ import annotations

from typing import Callable

import torch

from dpruner.errors import InputError
from dpruner.criteria.views import GroupTensors

Criterion = Callable[[GroupTensors], torch.Tensor]


def _normalized_mean(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Average of per-layer measures, each divided by its mean over the group's channels."""
    scaled = [m / m.mean().clamp_min(1e-12) for m in per_layer]
    return torch.stack(scaled).mean(dim=0)


def l1(view: GroupTensors) -> torch.Tensor:
    """Sum of |w| of each channel's filters."""
    return _normalized_mean([f.abs().sum(dim=1) for f in view.filters])


def l2(view: GroupTensors) -> torch.Tensor:
    """Euclidean norm of each channel's filters."""
    return _normalized_mean([f.norm(dim=1) for f in view.filters])


def fpgm(view: GroupTensors) -> torch.Tensor:
    """Sum of distances to the other channels' filters (FPGM: the smallest lie near the geometric median and are
    representable by the rest). Coupled layers: filters concatenated, each layer scaled to unit mean row norm."""
    scaled = [f / f.norm(dim=1).mean().clamp_min(1e-12) for f in view.filters]
    filters = torch.cat(scaled, dim=1).double()
    return torch.cdist(filters, filters).sum(dim=1).float()


def bn(view: GroupTensors) -> torch.Tensor:
    """|gamma| of the channel's BatchNorm(s); groups without a norm layer fall back to L2."""
    if not view.norms:
        return l2(view)
    return _normalized_mean(view.norms)


def random(view: GroupTensors) -> torch.Tensor:
    """Uniform random scores from the view's seeded generator."""
    return torch.rand(len(view.group.channels), generator=view.generator)


CRITERIA: dict[str, Criterion] = {"l1": l1, "l2": l2, "fpgm": fpgm, "bn": bn, "random": random}


def get_criterion(name: str) -> Criterion:
    """A criterion by name (case-insensitive)."""
    fn = CRITERIA.get(name.lower())
    if fn is None:
        raise InputError(f"Unknown method '{name}'; choose one of {', '.join(sorted(CRITERIA))}.")
    return fn
