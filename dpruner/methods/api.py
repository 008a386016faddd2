"""`dpruner.prune`: one-shot, data-free structured pruning to a ratio or a sparsity (the call `dpruner prune` wraps)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn

from dpruner.criteria import get_criterion
from dpruner.errors import InputError
from dpruner.graph.build import DependencyGraph
from dpruner.graph.groups import ChannelIndex
from dpruner.graph.summary import analyze_groups, nothing_prunable, opaque_summary, prunable_macs_share
from dpruner.methods.cost import TARGET_INDEX, build_cost_model
from dpruner.methods.oneshot import Allocation, normalized, search, select
from dpruner.graph.check import check_pruned, expected_outputs
from dpruner.metrics.macs import count_macs, count_params, count_sizes, run_forward
from dpruner.surgery.plan import apply_plan, make_plan
from dpruner.criteria.views import group_tensors

TARGETS = ("macs", "params")
ALL_TARGETS = (*TARGETS, "latency")  # latency: one-shot pruning to a measured speedup (dpruner.runtime.latency)
RATIO_TOLERANCE = 0.05  # the achieved ratio must be within 5% of the requested one
LATENCY_NOISE = 0.03  # --target latency: a measured latency up to 3% above the goal counts as met (timing noise)
MAX_CORRECTIONS = 6


@dataclass
class PruneResult:
    """What prune() did. `model` is the caller's model object, now pruned in place."""

    model: nn.Module
    plan: dict
    before: dict
    after: dict
    ratio: dict
    target: str
    requested: dict
    target_met: bool
    method: str
    allocation: str
    groups: list[dict] = field(default_factory=list)
    unprunable: list[dict] = field(default_factory=list)
    prunable_macs_share: float | None = None  # share of the original MACs in layers a prunable group touches
    opaque: list[dict] = field(default_factory=list)  # modules torch.fx could not follow (see opaque_summary)
    sensitivity: dict | None = None  # allocation 'sensitivity': key, samples, seconds, whether it came from the cache
    latency: dict | None = None  # target 'latency': runtime, batch, threads, before/after ms, predicted ms, table info

    def to_json(self) -> dict:
        return {
            "before": self.before, "after": self.after, "ratio": self.ratio, "target": self.target,
            "requested": self.requested, "target_met": self.target_met, "method": self.method,
            "allocation": self.allocation, "prunable_macs_share": self.prunable_macs_share, "opaque": self.opaque,
            "groups": self.groups, "unprunable": self.unprunable,
            **({"sensitivity": self.sensitivity} if self.sensitivity is not None else {}),
            **({"latency": self.latency} if self.latency is not None else {}),
        }


def score_groups(model: nn.Module, graph: DependencyGraph, index: ChannelIndex, method: str,
                 seed: int = 0, *, data=None, score_batches: int = 10, device="cpu", ctx=None) -> dict[int, np.ndarray]:
    """Criterion scores of every prunable group's channels. A criterion that needs data (taylor, activation)
    first gathers its statistics over `score_batches` batches of `data` (an iterable of (inputs, labels))."""
    criterion = get_criterion(method)
    stats: dict = {}
    if criterion.needs_data:
        if data is None:
            raise InputError(f"The '{criterion.name}' criterion scores channels on data; give --data.")
        from dpruner.criteria.stats import collect_stats

        stats = collect_stats(model, graph, index, data, needs=criterion.stats, batches=score_batches,
                              device=device, ctx=ctx)
    scores = {}
    for group in index.groups:
        if group.prunable:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + group.id)
            view = group_tensors(model, graph, index, group, generator)
            view.stats = stats.get(group.id, {})
            scores[group.id] = criterion(view).detach().double().cpu().numpy()
    return scores


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ratio: float | None = None,
    sparsity: float | None = None,
    target: str = "macs",
    method: str = "l2",
    allocation: str = "uniform",
    exclude: Iterable[str] = (),
    round_to: int = 1,
    max_fraction: float = 0.9,
    seed: int = 0,
    leaf_modules: Iterable[type] = (),
    data=None,
    score_batches: int = 10,
    pca_energy: float | None = None,
    val_data=None,
    sensitivity=None,
    sensitivity_batches: int = 8,
    data_key: str = "",
    ctx=None,
    criterion: str | None = None,
    latency=None,
) -> PruneResult:
    """Prune `model` in place so that `target` shrinks by `ratio` (e.g. 2.0: at most half the MACs), or remove
    `sparsity` (a fraction) of every group's channels. Channels are ranked by `criterion` (see dpruner.criteria;
`method` is its older name, also taking 'pca-gm').
    The final classifier's outputs and the network input are never pruned; `exclude` protects layers by fnmatch
    pattern. Criteria that score on data (taylor, activation) read `score_batches` batches of `data` (an iterable
    of (inputs, labels), e.g. a training loader). `allocation='sensitivity'` spreads the cut by per-group
    sensitivity curves: `sensitivity` (a methods.sensitivity.Sensitivity) or, when absent, measured (and cached
    under `data_key`) on `sensitivity_batches` batches of `val_data`, held-out data. Under torchrun pass `ctx`
    (train.distributed.DistContext): data statistics are then summed over ranks, so every rank makes the same
    plan. `target='latency'` prunes until the latency measured in `latency` (a runtime.latency.LatencySpec:
    runtime, batch, threads) falls by `ratio`, planning with a per-layer latency table and confirming end to end.
    Returns a PruneResult with the plan (plain data) and measured before/after params and MACs (and latency)."""
    if criterion is not None:
        method = criterion
    requested_method = method
    exclude, leaf_modules = tuple(exclude), tuple(leaf_modules)
    if method == "pca-gm":  # seed 001: widths from PCA of the activations, survivors by geometric median
        method, allocation = "fpgm", "pca"
    if pca_energy is not None:
        if allocation != "pca":
            raise InputError("--pca-energy sets widths by PCA: use it with --allocation pca or --method pca-gm.")
        if not 0 < pca_energy <= 1:
            raise InputError(f"--pca-energy must lie in (0, 1], got {pca_energy:g}.")
    if sum(v is not None for v in (ratio, sparsity, pca_energy)) != 1:
        raise InputError("Give exactly one of --ratio and --sparsity"
                         + (" (or --pca-energy)." if allocation == "pca" else "."))
    if allocation == "pca" and sparsity is not None:
        raise InputError("--allocation pca sets each group's width from its activations; give --ratio or "
                         "--pca-energy, not --sparsity.")
    if allocation == "sensitivity" and sparsity is not None:
        raise InputError("--allocation sensitivity spreads a target over the groups; give --ratio, not --sparsity.")
    if allocation == "sensitivity" and sensitivity is None and val_data is None:
        raise InputError("--allocation sensitivity measures each group's sensitivity on held-out data; give --data.")
    if allocation == "pca" and data is None:
        raise InputError("--allocation pca (and --method pca-gm) measures activations on data; give --data.")
    if ratio is not None and not (ratio > 1 and math.isfinite(ratio)):
        raise InputError(f"--ratio must be a finite number greater than 1 (e.g. 2x), got {ratio:g}.")
    if sparsity is not None and not 0 < sparsity < 1:
        raise InputError(f"--sparsity must lie strictly between 0 and 1, got {sparsity:g}.")
    if target not in ALL_TARGETS:
        raise InputError(f"--target must be one of {', '.join(ALL_TARGETS)}, got '{target}'.")
    if target == "latency":
        from dpruner.runtime.latency import LatencySpec

        latency = latency or LatencySpec()
        if ratio is None:
            raise InputError("--target latency prunes to a speedup: give --ratio (e.g. 1.5x).")
        if allocation == "sensitivity":
            raise InputError("--target latency plans with uniform, global or pca allocation (sensitivity curves "
                             "are measured against MACs or params).")
    alloc = Allocation(allocation, max_fraction, round_to)
    if get_criterion(method).needs_data and data is None:  # fail on a bad name or missing data before any work
        raise InputError(f"The '{method}' criterion scores channels on data; give --data.")
    from dpruner.validate import finite_weights

    finite_weights(model, "The model")
    was_training = model.training
    model.eval()
    try:
        base_macs = count_macs(model, example_input)
        before = {"params": count_params(model), "macs": base_macs.total}
        run_forward(model, example_input)  # a model that cannot run on the input is the user's ShapeError
        graph, index = analyze_groups(model, example_input, exclude=exclude, leaf_modules=leaf_modules)
        expected = expected_outputs(model, example_input, graph.scopes)
        if not any(g.prunable for g in index.groups):
            raise nothing_prunable(index)
        scores = score_groups(model, graph, index, method, seed, data=data, score_batches=score_batches, ctx=ctx)
        if alloc.kind == "pca":
            from dataclasses import replace

            from dpruner.criteria.stats import collect_stats

            stats = collect_stats(model, graph, index, data, needs=["spectrum"], batches=score_batches, ctx=ctx)
            alloc = replace(alloc, spectra={gid: s["spectrum"].numpy() for gid, s in stats.items() if s})
        cost = build_cost_model(model, graph, index, base_macs.by_module, base_macs.total)
        latency_info = None
        if target == "latency":
            from dpruner.runtime.latency import build_latency_table

            before["latency"] = latency.measure(model, tuple(example_input.shape))
            cost.latency = build_latency_table(model, example_input, [t.name for t in cost.terms if t.kind != "norm"],
                                               latency, full_ms=before["latency"])
            latency_info = {"runtime": latency.runtime, "batch": latency.batch,
                            "threads": latency.resolved_threads(), "table": cost.latency.info}
        if alloc.kind == "sensitivity":
            from dataclasses import replace

            from dpruner.methods.sensitivity import group_savings, measure_sensitivity

            if sensitivity is None:
                sensitivity = measure_sensitivity(model, example_input, val_data, criterion=method,
                                                  batches=sensitivity_batches, exclude=exclude,
                                                  leaf_modules=leaf_modules, seed=seed, score_data=data,
                                                  score_batches=score_batches, data_key=data_key, ctx=ctx)
            alloc = replace(alloc, curves=sensitivity.curves(),
                            savings=group_savings(index, cost, TARGET_INDEX[target]))

        def sizes_of(plan: dict) -> dict:
            """Params and MACs (and with target latency the measured latency) of the model `plan` makes, after the
            engine's check that it still runs."""
            pruned = apply_plan(copy.deepcopy(model), plan)
            check_pruned(pruned, example_input, expected, leaf_modules=leaf_modules)
            sizes = count_sizes(pruned, example_input)
            if target == "latency":
                sizes["latency"] = latency.measure(pruned, tuple(example_input.shape))
            return sizes

        if sparsity is not None or pca_energy is not None:
            if pca_energy is not None:
                level = 1.0 - pca_energy
            else:
                level = sparsity if alloc.kind == "uniform" else _global_quantile(scores, sparsity)
            plan = make_plan(graph, index, index.roots[select(index, scores, alloc, level)])
            after = sizes_of(plan)
            met = True
        else:
            plan, after, met = _search_ratio(graph, index, scores, alloc, cost, target, before[target] / ratio,
                                             sizes_of, trail := [])
            if latency_info is not None:
                latency_info.update({"before_ms": before["latency"], "after_ms": after["latency"],
                                     "predicted_ms": [t for t in trail if t.get("chosen")][-1]["predicted"],
                                     "goal_ms": before["latency"] / ratio, "tries": trail,
                                     "noise_allowance": LATENCY_NOISE})
        apply_plan(model, plan)
    finally:
        model.train(was_training)
    return PruneResult(
        model=model,
        plan=plan,
        before=before,
        after=after,
        ratio={k: before[k] / max(after[k], 1e-12 if k == "latency" else 1) for k in ALL_TARGETS if k in after},
        target=target,
        requested={"ratio": ratio, "sparsity": sparsity, **({"pca_energy": pca_energy} if pca_energy else {})},
        target_met=met,
        method=requested_method,
        allocation=allocation,
        groups=_group_summaries(index, plan, graph),
        unprunable=[{"layers": g.layers, "channels": len(g), "reasons": g.reasons[:5]}
                    for g in index.groups if not g.prunable and g.has_producer],
        prunable_macs_share=prunable_macs_share(index, base_macs.by_module, base_macs.total),
        opaque=opaque_summary(graph),
        sensitivity=None if sensitivity is None else {
            "key": sensitivity.key, "samples": sensitivity.samples, "seconds": sensitivity.seconds,
            "cached": sensitivity.cached, "criterion": sensitivity.criterion},
        latency=latency_info,
    )


def parse_ratio(text: str | float) -> float:
    """'2x', '2', '2.5X' -> 2.0, 2.0, 2.5 (must be > 1)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        cleaned = text.strip().lower().removesuffix("x").strip()
        try:
            value = float(cleaned)
        except ValueError:
            raise InputError(f"--ratio must look like 2x or 1.5, got '{text}'.") from None
    if not value > 1 or not math.isfinite(value):
        raise InputError(f"--ratio must be a finite number greater than 1 (e.g. 2x), got '{text}'.")
    return value


def _global_quantile(scores: dict[int, np.ndarray], sparsity: float) -> float:
    flat = np.concatenate([normalized(s) for s in scores.values()] or [np.zeros(1)])
    return float(np.quantile(flat, sparsity))


def _search_ratio(graph, index, scores, alloc, cost, target, goal, sizes_of, trail=None):
    """Bisection on the estimate, then measure the real value (fvcore; for latency, a timed run) and correct the
    goal until the measured value lies within RATIO_TOLERANCE below the goal (latency: up to LATENCY_NOISE above
    it counts too) in at most MAX_CORRECTIONS rounds. Each round's prediction and measurement go to `trail`."""
    aim = goal
    best = None
    top = goal * (1 + LATENCY_NOISE) if target == "latency" else goal
    for _ in range(MAX_CORRECTIONS):
        removed, estimate = search(index, scores, alloc, cost, target=target, goal=aim)
        plan = make_plan(graph, index, index.roots[removed])
        after = sizes_of(plan)
        real = after[target]
        met = (1 - RATIO_TOLERANCE) * goal <= real <= top
        if trail is not None:
            trail.append({"aim": aim, "predicted": estimate, "measured": real})
        if best is None or _better(real, best[1][target], goal):
            best = (plan, after, met)
            if trail is not None:
                trail[-1]["chosen"] = True
        if met or estimate > aim:  # reached, or nothing stronger is possible
            break
        aim *= goal / real  # the estimate was off by this factor (ops it does not model): correct and retry
    return best


def _better(real: float, current: float, goal: float) -> bool:
    """Prefer results that meet the goal (at most it), then the one closest to it."""
    if (real <= goal) != (current <= goal):
        return real <= goal
    return abs(real - goal) < abs(current - goal)


def _group_summaries(index: ChannelIndex, plan: dict, graph) -> list[dict]:
    out = []
    kept_by_module = plan.get("modules", {})
    for g in index.groups:
        if not g.prunable:
            continue
        producer = next(k for k in g.slots if k[1] == "out")
        total_positions = int(np.isin(index.slot_classes[producer],
                                      np.searchsorted(index.roots, g.channels)).sum())
        kept_out = kept_by_module.get(producer[0], {}).get("out")
        if kept_out is None:
            kept = len(g)
        else:
            classes = index.slot_classes[producer][kept_out]
            kept = len(set(classes.tolist()) & set(np.searchsorted(index.roots, g.channels).tolist()))
        out.append({"group": g.id, "layers": g.layers[:8], "n_layers": len(g.layers), "channels": len(g),
                    "kept": kept, "positions": total_positions})
    return out
