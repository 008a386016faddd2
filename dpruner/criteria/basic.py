"""The criteria registry. Data-free: L1 / L2 filter norm (Li et al. 2017), FPGM (He et al. 2019), BN scale (network
slimming), random (a baseline). Data-driven, from the statistics criteria.stats collects: Taylor (Molchanov et al.
2019) and mean activation. Each criterion declares what it needs, so a method knows whether to gather data first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dpruner.criteria.views import GroupTensors
from dpruner.errors import InputError

NEEDS = ("weights", "gradients", "activations")  # what a criterion can need: gradients/activations mean data


@dataclass(frozen=True)
class Criterion:
    """A channel score: `score(view) -> Tensor[n_channels]`, higher = keep. `needs` says what it reads (weights
    alone, or statistics gathered on data: `stats` names them, see criteria.stats)."""

    name: str
    score: Callable[[GroupTensors], torch.Tensor]
    summary: str
    needs: frozenset = frozenset({"weights"})
    stats: tuple[str, ...] = ()

    @property
    def needs_data(self) -> bool:
        return bool(self.needs & {"gradients", "activations"})

    def __call__(self, view: GroupTensors) -> torch.Tensor:
        return self.score(view)


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


def taylor(view: GroupTensors) -> torch.Tensor:
    """First-order Taylor importance: (sum over the group's members and positions of z * dL/dz)^2 per sample,
    averaged (Molchanov et al. 2019; criteria/stats.py says why). Comparable across groups without normalisation."""
    return view.stats["taylor"]


def activation(view: GroupTensors) -> torch.Tensor:
    """Mean positive part of the channel's activation over the data (what a following ReLU lets through). A channel
    several layers write into (a residual stream: members tied by adds) is ranked by its filters' L2 norm instead,
    scaled to the group's mean activation so global ranking still compares groups by their data: summed over the
    members' norm outputs, the activation follows the BatchNorm biases, not what the stream carries (measured on
    the CIFAR ResNet-56: the stream ranked by activation fell below random; docs/pruning.md)."""
    measured = view.stats["activation"]
    if max(len(view.filters), len(view.norms)) <= 1:
        return measured
    return l2(view) * measured.mean()


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("l1", l1, "sum of |w| of the channel's filters (Li et al. 2017)"),
    Criterion("l2", l2, "Euclidean norm of the channel's filters"),
    Criterion("fpgm", fpgm, "distance to the other filters: the nearest to the geometric median go (He et al. 2019)"),
    Criterion("bn", bn, "|gamma| of the channel's BatchNorm (network slimming); L2 without one"),
    Criterion("random", random, "seeded uniform scores (a baseline)"),
    Criterion("taylor", taylor, "(z * dL/dz)^2 after the norm layer over a few batches (Molchanov et al. 2019)",
              frozenset({"gradients", "activations"}), ("taylor",)),
    Criterion("activation", activation, "mean positive activation over a few batches (APoZ-style)",
              frozenset({"activations"}),
              ("activation",)),
)}


def get_criterion(name: str) -> Criterion:
    """A criterion by name (case-insensitive)."""
    found = CRITERIA.get(name.lower())
    if found is None:
        raise InputError(f"Unknown method '{name}'; choose one of {', '.join(sorted(CRITERIA))}.")
    return found
