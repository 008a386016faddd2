"""Soft filter pruning (He et al. 2018, as FPGM's paper uses it, He et al. 2019): while fine-tuning, every
`every` epochs the channels the criterion ranks lowest are zeroed (filters and biases; the norm's gamma and beta
only in the last round, see zero_channels) but stay trainable, so a channel that was wrongly chosen can
regrow; after the soft phase the final choice is zeroed and then removed physically, which changes nothing
the network computes, and the last `soft_final` of the budget (default 0.2) fine-tunes the smaller model: the final
round zeroes the norms' affine too, and a network that leaned on those channels' constant beta needs steps to adapt
(without them, ResNet-56 at 2x with a 1-epoch budget ended at 40% top-1, below random pruning's 77%). How many channels each group loses comes from dpruner's planner (criterion + allocation at
the --ratio), as for SPP; which ones is re-decided at every interval on the current weights."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from dpruner.train.loop import Callback


def lowest(index, scores: dict[int, np.ndarray], goals: dict[int, int]) -> np.ndarray:
    """Flags (per dense class) of each group's `goals[g]` lowest-scored channels (ties: lower position first)."""
    removed = np.zeros(len(index.roots), dtype=bool)
    for group in index.groups:
        n = goals.get(group.id, 0)
        if n <= 0:
            continue
        s = scores[group.id]
        order = np.lexsort((np.arange(len(s)), s))[:n]
        removed[np.searchsorted(index.roots, np.asarray(group.channels)[order])] = True
    return removed


def zero_channels(model: nn.Module, graph, index, removed: np.ndarray, *, final: bool = True) -> None:
    """Zero the parameters that compute the flagged channels: producers' weight rows and biases and, when `final`,
    the norms' gamma and beta. Between intervals the norm keeps its affine, as in soft filter pruning's code: a
    training-mode BatchNorm of the zeroed filter's output emits beta, so gradient still reaches the filter (through
    gamma) and a wrongly chosen channel can regrow; with gamma and beta zeroed too, a channel followed by a ReLU
    gets no gradient at all and soft pruning would be hard pruning. The final round zeroes the affine as well, so
    the zeroed channels output exactly zero and removal changes nothing (the constant beta they emitted is lost
    there; BatchNorm statistics are recalibrated after removal)."""
    from dpruner.criteria.views import channel_parameters

    norm_params = {id(p) for slot in graph.slots.values() if slot.role == "norm"
                   for p in (getattr(graph.modules.get(slot.module), "weight", None),
                             getattr(graph.modules.get(slot.module), "bias", None)) if p is not None}
    with torch.no_grad():
        for tensor, dim, idx in channel_parameters(model, graph, index, removed):
            if not final and id(tensor) in norm_params:
                continue
            tensor.index_fill_(dim, idx.to(tensor.device), 0.0)


class SoftZeroing(Callback):
    """fit() callback: every `every` optimizer steps (and after the last one) rescore and zero each group's lowest
    channels; `removed` holds the latest choice."""

    def __init__(self, graph, index, goals: dict[int, int], criterion: str, every: int, total: int, seed: int = 0):
        self.graph, self.index, self.goals, self.criterion = graph, index, goals, criterion
        self.every, self.total, self.seed = every, total, seed
        self.removed = np.zeros(len(index.roots), dtype=bool)
        self.rounds = 0

    def zero(self, model: nn.Module, final: bool = False) -> None:
        from dpruner.methods.api import score_groups

        scores = score_groups(model, self.graph, self.index, self.criterion, self.seed)
        self.removed = lowest(self.index, scores, self.goals)
        zero_channels(model, self.graph, self.index, self.removed, final=final)
        self.rounds += 1

    def after_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.zero(model, final=step + 1 == self.total)


def run_soft(model: nn.Module, example: torch.Tensor, config, env):
    """One-shot's --soft path: plan the widths, fine-tune with soft zeroing for the whole budget, remove the last
    choice (exact: it is zero), report like one-shot."""
    from dpruner.graph.check import check_pruned, expected_outputs
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.run import MethodResult, _evaluate
    from dpruner.methods.spp import plan_goals
    from dpruner.metrics.macs import count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan
    from dpruner.train.loop import fit

    data = env.data
    base = _evaluate(model, env)
    work = copy.deepcopy(model).cpu().eval()
    before = count_sizes(work, example)
    graph, index = analyze_groups(work, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
    expected = expected_outputs(work, example, graph.scopes)
    goals, planned_met = plan_goals(work, example, config, index, env.leaf_modules)
    batches = len(data.train)
    total_all = max(1, round(env.train.epochs * batches))
    total = max(1, round(total_all * (1 - config.soft_final)))  # soft phase steps; the rest fine-tunes the result
    every = max(1, round(config.soft_every * batches))
    soft = SoftZeroing(graph, index, goals, config.criterion, every, total, config.seed)
    soft.zero(work)  # start from the planned cut, as the hard path does
    teacher = copy.deepcopy(model).to(env.device).eval() if env.distill else None
    phase = fit(work.to(env.device), data, env.train.with_(epochs=total / batches), device=env.device, ctx=env.ctx,
                teacher=teacher, description="soft fine-tune", callbacks=[soft])
    used = phase.epochs
    work.cpu().eval()
    plan = make_plan(graph, index, index.roots[soft.removed])
    apply_plan(work, plan)
    check_pruned(work, example, expected, leaf_modules=env.leaf_modules)
    from dpruner.train.api import recalibrate

    recalibrate(work, data, env)
    final_epochs = 0.0
    if total_all > total:
        final_epochs = fit(work.to(env.device), data, env.train.with_(epochs=(total_all - total) / batches),
                           device=env.device, ctx=env.ctx, teacher=teacher, description="fine-tune",
                           position=phase.steps).epochs
        used += final_epochs
        work.cpu().eval()
    after = {**count_sizes(work, example), **_evaluate(work, env)}
    return MethodResult(model=work, plans=[plan], method="one-shot", criterion=config.criterion,
                        target_met=planned_met, before={**before, **base}, after=after,
                        requested={"ratio": config.ratio}, epochs_used=used,
                        details={"soft": {"every_epochs": every / batches, "rounds": soft.rounds,
                                          "final_epochs": final_epochs,
                                          "allocation": config.allocation}})
