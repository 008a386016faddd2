"""Data-free redundancy measures of a layer's filters. Pure functions over weight tensors.

A layer's *filter matrix* has one row per output channel and the weights that produce it as columns
(Conv2d: out x in/groups*kh*kw; ConvTranspose2d: regrouped so rows are output channels; Linear: out x in).
Thresholds are module constants, documented in docs/analyze.md and echoed in the JSON output.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

L1_LOW_FRACTION = 0.01  # a filter is "low-norm" when its L1 norm < 1% of the layer's largest
GM_NEAR_FRACTION = 0.5  # "near the geometric median": distance < 0.5 x the mean distance of the layer's filters
PCA_LEVELS = (0.90, 0.95, 0.99)  # variance shares for which the number of principal components is reported
BN_LOW_FRACTION = 0.01  # a BN channel is "low" when |gamma| < 1% of the layer's largest |gamma|
# PCA costs about n*d*min(n,d) + min(n,d)^3 operations for an n x d filter matrix. Above this budget (about a second
# on 2 cores) the PCA and geometric-median measures are skipped unless asked for: VGG's 4096 x 25088 classifier
# layer alone would take ~30 s. Every conv layer of the torchvision models is far below it.
DEFAULT_MAX_COST = 2e10


def filter_matrix(layer: nn.Module) -> torch.Tensor:
    """One row per output channel of a Conv2d, ConvTranspose2d or Linear layer (float32, detached)."""
    w = layer.weight.detach().float()
    if isinstance(layer, nn.ConvTranspose2d):
        # weight is (in, out/groups, kh, kw); output channel j of group g reads input channels of group g only.
        g = layer.groups
        cin, cout_g = w.shape[0], w.shape[1]
        w = w.reshape(g, cin // g, cout_g, *w.shape[2:]).transpose(1, 2)
        return w.reshape(g * cout_g, -1)
    return w.reshape(w.shape[0], -1)


def _stats(values: torch.Tensor, low_fraction: float) -> dict:
    top = float(values.max())
    return {
        "min": float(values.min()),
        "median": float(values.median()),
        "max": top,
        "low_share": float((values < low_fraction * top).float().mean()) if top > 0 else 1.0,
    }


def l1_stats(filters: torch.Tensor) -> dict:
    """L1 norms of the filters: min, median, max, and the share below L1_LOW_FRACTION of the max."""
    return _stats(filters.abs().sum(dim=1), L1_LOW_FRACTION)


def geometric_median(points: torch.Tensor, *, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows (Weiszfeld's algorithm)."""
    x = points.double()
    median = x.mean(dim=0)
    for _ in range(iters):
        dist = (x - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        step = (new - median).norm()
        median = new
        if step <= tol * (median.norm() + 1e-12):
            break
    return median


def gm_redundancy(filters: torch.Tensor) -> dict:
    """FPGM's view: filters close to the geometric median of the layer are representable by the others.

    near_share = share of filters with ||F_i - GM|| < GM_NEAR_FRACTION * mean_j ||F_j - GM||. Relative to the mean
    (not the median) so that a layer whose majority of filters coincide still reports that majority.
    """
    gm = geometric_median(filters)
    dist = (filters.double() - gm).norm(dim=1)
    mean = float(dist.mean())
    near = float((dist < GM_NEAR_FRACTION * mean).float().mean()) if mean > 0 else 1.0
    return {"near_share": near, "min_rel_distance": float(dist.min()) / mean if mean > 0 else 0.0}


def pca_energy(filters: torch.Tensor, levels=PCA_LEVELS) -> dict:
    """Number of principal components of the (centred) filter matrix needed to explain each variance share.

    Eigenvalues come from the smaller Gram matrix (n x n or d x d), which equals the squared singular values. The
    eigensolver runs in float32 (1.5x faster than float64 on 1-2k wide layers): only cumulative shares of 90% and
    more are read, which the float32 round-off of the smallest eigenvalues does not move (same counts on every
    layer of torchvision's regnet_x_32gf).
    """
    n, d = filters.shape
    out = {"filters": n, "rank_bound": min(n, d)}
    eig = None
    for dtype in (torch.float32, torch.float64):  # float64 when float32 overflows or fails (extreme weights)
        centred = filters.to(dtype) - filters.to(dtype).mean(dim=0, keepdim=True)
        gram = centred @ centred.T if n <= d else centred.T @ centred
        if not bool(torch.isfinite(gram).all()):
            continue
        try:
            eig = torch.linalg.eigvalsh(gram).double().flip(0).clamp_min(0)
            break
        except RuntimeError:  # torch.linalg.LinAlgError: no convergence on an ill-conditioned matrix
            continue
    if eig is None:
        return out | {"error": "the eigensolver did not converge (extreme weight values)"}
    total = float(eig.sum())
    if total <= 0:
        return out | {f"k{round(level * 100)}": 0 for level in levels}
    cumulative = eig.cumsum(0) / total
    for level in levels:
        # smallest k with cumulative[k-1] >= level (a tiny slack absorbs rounding at level 1.0-ish)
        k = int((cumulative < level - 1e-12).sum()) + 1
        out[f"k{round(level * 100)}"] = min(k, n)
    return out


def bn_gamma_stats(norm: nn.Module) -> dict:
    """|gamma| of a BatchNorm: min, median, max and the share below BN_LOW_FRACTION of the max."""
    if norm.weight is None:
        return {}
    return _stats(norm.weight.detach().float().abs(), BN_LOW_FRACTION)


def pca_cost(n: int, d: int) -> float:
    """Rough operation count of pca_energy on an n x d matrix (Gram product + symmetric eigensolver)."""
    m = min(n, d)
    return float(n) * d * m + float(m) ** 3


def filter_measures(layer: nn.Module, *, max_cost: float | None = DEFAULT_MAX_COST) -> dict:
    """All data-free measures of a conv/linear layer's filters; PCA and GM only within `max_cost` (None: always)."""
    filters = filter_matrix(layer)
    out = {"l1": l1_stats(filters)}
    cost = pca_cost(*filters.shape)
    if max_cost is not None and cost > max_cost:
        out["skipped"] = f"gm and pca: {filters.shape[0]}x{filters.shape[1]} filter matrix is above the cost limit (--full)"
        return out
    return out | {"gm": gm_redundancy(filters), "pca": pca_energy(filters)}


def bn_measures(norm: nn.Module) -> dict:
    """All data-free measures of a BatchNorm layer."""
    stats = bn_gamma_stats(norm)
    return {"gamma": stats} if stats else {}


Measure = Callable[[nn.Module], dict]


def default_measures(*, full: bool = False, max_cost: float = DEFAULT_MAX_COST) -> dict[type, Measure]:
    """Which measure runs on which layer type (PCA/GM within `max_cost`, or always with `full`). analyze() takes such
    a mapping as an argument: activation-based measures (with data) plug in by passing an extended mapping, without
    touching this module."""
    filters = partial(filter_measures, max_cost=None if full else max_cost)
    return {nn.Conv2d: filters, nn.ConvTranspose2d: filters, nn.Linear: filters, nn.BatchNorm2d: bn_measures}

DEFINITIONS = {
    "l1.low_share": f"share of filters whose L1 norm is below {L1_LOW_FRACTION:g} x the layer's largest",
    "gm.near_share": (
        f"share of filters whose distance to the layer's geometric median is below {GM_NEAR_FRACTION:g} x the mean "
        "distance (FPGM: such filters are representable by the others)"
    ),
    "gm.min_rel_distance": "smallest distance to the geometric median divided by the mean distance",
    "pca.kNN": "number of principal components of the centred filter matrix explaining NN% of its variance",
    "gamma.low_share": f"share of BatchNorm channels with |gamma| below {BN_LOW_FRACTION:g} x the layer's largest",
}
