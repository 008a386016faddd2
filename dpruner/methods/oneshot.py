"""One-shot, data-free planning: choose which channels to remove so a target ratio (MACs or params) or a per-group
sparsity is met, with uniform or global allocation over the channel groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpruner.errors import InputError
from dpruner.graph.groups import ChannelIndex
from dpruner.methods.cost import TARGET_INDEX, CostModel

ALLOCATIONS = ("uniform", "global", "pca", "sensitivity")


@dataclass(frozen=True)
class Allocation:
    """How channels are spread over groups: 'uniform' (the same fraction of every group), 'global' (one threshold
    over scores normalised by each group's mean) or 'pca' (seed 001: each group keeps the smallest width whose
    principal components explain a share of its output activations' variance; `spectra` holds each group's
    cumulative explained-variance shares, from criteria.stats) or 'sensitivity' (each group takes the cut that
    minimises its predicted loss increase minus lambda times what the cut saves; lambda is searched for the target;
    `curves` and `savings` from methods/sensitivity.py). `max_fraction` caps any group's loss; `round_to` rounds each
    group's kept count up to a multiple (hardware-friendly widths)."""

    kind: str = "uniform"
    max_fraction: float = 0.9
    round_to: int = 1
    spectra: dict | None = None  # 'pca': group id -> cumulative explained-variance shares (ascending to 1)
    curves: dict | None = None  # 'sensitivity': group id -> (removed fractions from 0, predicted loss increase)
    savings: dict | None = None  # 'sensitivity': group id -> share of the target saved by removing the whole group

    def __post_init__(self):
        if self.kind not in ALLOCATIONS:
            raise InputError(f"Unknown allocation '{self.kind}'; choose one of {', '.join(ALLOCATIONS)}.")
        if not 0 < self.max_fraction < 1:
            raise InputError("--max-fraction must lie strictly between 0 and 1.")
        if self.round_to < 1:
            raise InputError("--round-to must be a positive integer.")


def normalized(scores: np.ndarray) -> np.ndarray:
    """A group's scores divided by their mean: comparable across groups (global allocation, refinement)."""
    return scores / max(float(np.mean(scores)), 1e-12)


def _kept_count(n: int, n_remove: int, alloc: Allocation) -> int:
    n_remove = min(n_remove, math.floor(alloc.max_fraction * n), n - 1)
    kept = n - max(n_remove, 0)
    if alloc.round_to > 1 and n >= alloc.round_to:
        kept = min(n, math.ceil(kept / alloc.round_to) * alloc.round_to)
    return kept


def pca_width(cumulative: np.ndarray, energy: float) -> int:
    """The smallest number of principal components whose variance shares add up to at least `energy` (at least
    one; all of them at energy 1)."""
    if energy >= 1.0 - 1e-12:
        return len(cumulative)
    return max(1, int(np.searchsorted(cumulative, energy - 1e-12) + 1))


def select(index: ChannelIndex, scores: dict[int, np.ndarray], alloc: Allocation, level: float) -> np.ndarray:
    """Flags (per dense class) of the channels removed at `level`: a fraction for 'uniform', a threshold on
    normalised scores for 'global'. Ties break by channel order, so the result is deterministic."""
    removed = np.zeros(len(index.roots), dtype=bool)
    for group in index.groups:
        if not group.prunable or group.id not in scores:
            continue
        s = scores[group.id]
        n = len(s)
        order = np.lexsort((np.arange(n), s))  # ascending score, then position
        if alloc.kind == "uniform":
            n_remove = math.floor(level * n + 1e-9)
        elif alloc.kind == "pca":
            n_remove = n - pca_width(alloc.spectra[group.id], 1.0 - level) if alloc.spectra and \
                group.id in alloc.spectra else 0
        elif alloc.kind == "sensitivity":
            n_remove = _sensitivity_cut(n, alloc, group.id, level)
        else:
            n_remove = int((normalized(s) < level).sum())
        kept = _kept_count(n, n_remove, alloc)
        gone = [group.channels[i] for i in order[: n - kept]]
        if gone:
            removed[np.searchsorted(index.roots, gone)] = True
    return removed


def _sensitivity_cut(n: int, alloc: Allocation, group: int, level: float) -> int:
    """Channels a group loses at multiplier lambda = level / (1 - level): the measured cut f minimising
    increase(f) - lambda * f * saving (a Lagrangian relaxation of "least summed predicted loss increase for the
    target"; ties go to the smaller cut). A group without a curve keeps everything."""
    if not alloc.curves or group not in alloc.curves:
        return 0
    fractions, increase = alloc.curves[group]
    lam = level / max(1.0 - level, 1e-12)
    objective = np.asarray(increase) - lam * np.asarray(fractions) * (alloc.savings or {}).get(group, 0.0)
    best = int(np.flatnonzero(objective <= objective.min() + 1e-12)[0])
    return int(round(fractions[best] * n))


def search(index: ChannelIndex, scores: dict[int, np.ndarray], alloc: Allocation, cost: CostModel, *,
           target: str, goal: float, iterations: int = 40) -> tuple[np.ndarray, float]:
    """Smallest pruning level whose estimated `target` ('macs' or 'params') is at most `goal` (bisection).
    Returns the removal flags and the estimate; if even the strongest level cannot reach the goal, that level."""
    which = TARGET_INDEX[target]
    if alloc.kind in ("uniform", "pca"):  # pca: level = 1 - the explained-variance share kept
        lo, hi = 0.0, 1.0
    elif alloc.kind == "sensitivity":  # level maps to the multiplier lambda = level / (1 - level)
        lo, hi = 0.0, 1.0 - 1e-9
    else:
        top = max((float(np.max(normalized(s))) for s in scores.values()), default=1.0)
        lo, hi = 0.0, top + 1e-6
    best = select(index, scores, alloc, hi)
    best_value = cost.estimate(best)[which]
    if best_value > goal:
        return best, best_value
    for _ in range(iterations):
        mid = (lo + hi) / 2
        removed = select(index, scores, alloc, mid)
        value = cost.estimate(removed)[which]
        if value <= goal:
            hi, best, best_value = mid, removed, value
        else:
            lo = mid
    if alloc.round_to == 1:
        best, best_value = _refine(index, scores, cost, which, goal, select(index, scores, alloc, lo), best,
                                   best_value)
    return best, best_value


def _refine(index: ChannelIndex, scores, cost: CostModel, which: int, goal: float, below: np.ndarray,
            above: np.ndarray, above_value: float) -> tuple[np.ndarray, float]:
    """Between the last level that misses the goal and the first that meets it, many groups may step at once (a
    RegNet stage has only a few whole-group channels, so one step moves MACs a lot). Add those channels one at a
    time instead, lowest normalised score first, and stop as soon as the goal is met."""
    candidates = np.nonzero(above & ~below)[0]
    if len(candidates) <= 1:
        return above, above_value
    flat = np.zeros(len(index.roots))
    for group in index.groups:
        if group.id in scores:
            flat[np.searchsorted(index.roots, group.channels)] = normalized(scores[group.id])
    removed = below.copy()
    for c in candidates[np.lexsort((candidates, flat[candidates]))]:
        removed[c] = True
        value = cost.estimate(removed)[which]
        if value <= goal:
            return removed, value
    return above, above_value
