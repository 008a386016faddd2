"""Structured Probabilistic Pruning (Wang et al., BMVC 2018; seed 004): every channel of a group carries a pruning
probability p (0 at the start). While the network fine-tunes, each step samples a keep-mask Bernoulli(1 - p) per
channel (coupled channels share it: one draw per channel of a group, applied to every member), trains on the masked
weights and puts the masked values back after the optimizer step, so the step (its momentum and weight decay
included) leaves them as they were. Their momentum buffers are not reset: an entry that still received gradient
while masked (a BatchNorm beta) carries it into the steps where the channel is drawn again.
Every `interval` steps the group's live channels are ranked by a weight criterion (L1 in the paper) and p moves by
the paper's rank-based increment (`increments`): the weakest gain up to A, the strongest lose, so a channel that
becomes useful again can recover. p = 1 prunes a channel for good; a group stops when it has lost its share, and
the run stops when every group has. Then the channels go physically (a dense, smaller model), BatchNorm statistics
are recalibrated and the rest of the fine-tuning budget retrains it.

[reading] choices, documented in docs/methods.md: the unit is a channel group (rows, so the result is dense); each
group's share comes from dpruner's planner (the criterion + allocation that one-shot pruning would use to reach the
--ratio); ranks and M count only the channels not yet pruned for good ("M groups still to prune").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from dpruner.errors import InputError
from dpruner.train.loop import Callback


@dataclass(frozen=True)
class SPPConfig:
    """Settings of `--method spp`: the goal (ratio of `target`), how each group's share is planned (criterion,
    allocation, ... as in one-shot pruning), the paper's A, u and t (`interval`, in optimizer steps), and how much
    of the fine-tuning budget the probabilistic phase may use (`prune_fraction`); the rest retrains."""

    ratio: float
    target: str = "macs"
    criterion: str = "l1"
    allocation: str = "uniform"
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    max_fraction: float = 0.9
    seed: int = 0
    A: float | None = None  # None: auto (effective_A): the paper's 0.05, raised when the phase is too short for it
    u: float = 0.25
    interval: int | None = None  # None: auto (interval_for); the paper's 180 assumes ImageNet-length training
    prune_fraction: float = 0.5
    recal_batches: int = 50

    def __post_init__(self):
        from dpruner import validate

        if self.A is not None:
            validate.number(self.A, "--spp-a", low=0, low_open=True, high=1)
        validate.number(self.u, "--spp-u", low=0, low_open=True, high=0.5, high_open=True)
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise InputError(f"--spp-interval must be a whole number of steps >= 1, got {self.interval}.")
        validate.number(self.prune_fraction, "--spp-fraction", low=0, low_open=True, high=1)


PAPER_A = 0.05


def effective_A(steps: int, A: float | None, interval: int | None) -> float:
    """A when none is given: the paper's 0.05, unless the phase holds fewer than 6/0.05 = 120 rank updates even at
    one update per `interval` steps; then 6/updates (at most 1), so every group can reach its goal inside the phase
    instead of having most of it forced at the end. [reading]: measured on ResNet-56 with a 1-epoch budget (39
    updates): A = 0.05 reached no goal and forced 151 of 315 channels (test 77.0%); A = 0.2 reached every goal
    (79.3%)."""
    if A is not None:
        return A
    updates = max(1, steps // (interval or 1))
    return min(1.0, max(PAPER_A, 6 / updates))


def interval_for(steps: int, A: float) -> int:
    """Steps between rank updates when none is given: the phase then holds 6/A updates. The ranks below the
    boundary gain about 0.4 A per update on average (the curve's mean over 0..M), so a group's goal needs about
    2.5/A updates; 6/A leaves room for ranks to change their minds. [reading]: the paper's t = 180 belongs to
    ImageNet schedules of 10^5 steps; with it a CIFAR fine-tune of a few hundred steps would prune nothing."""
    return max(1, int(steps * A / 6))


def increments(n: int, m: int, A: float, u: float) -> np.ndarray:
    """The paper's increment of p for ranks r = 0..n-1 (ascending criterion: r = 0 is the weakest) when m channels
    are still to prune: alpha = ln(2/u) / m, N_c = -ln(u) / alpha; delta(r) = A exp(-alpha r) for r <= N_c, else
    2uA - A exp(-alpha (2 N_c - r)). delta(0) = A, delta(N_c) = uA, delta(m) = 0: ranks past the boundary get
    negative increments, so channels that grew strong again recover."""
    if m <= 0:
        return np.zeros(n)
    alpha = math.log(2 / u) / m
    n_c = -math.log(u) / alpha
    r = np.arange(n, dtype=np.float64)
    return np.where(r <= n_c, A * np.exp(-alpha * r), 2 * u * A - A * np.exp(-alpha * (2 * n_c - r)))


def update_probabilities(p: np.ndarray, scores: np.ndarray, goal: int, A: float, u: float) -> np.ndarray:
    """One rank update of a group: `p` its probabilities (1 = pruned for good), `scores` the criterion (higher =
    keep), `goal` how many channels the group loses in all. Returns the new probabilities; at most `goal` end at 1
    (the highest unclipped values win, weaker score first on ties), and once `goal` are at 1 the others return
    to 0 (the group is done; nothing more is sampled)."""
    p = p.astype(np.float64).copy()
    gone = p >= 1
    left = goal - int(gone.sum())
    if left <= 0:
        p[~gone] = 0.0
        return p
    live = np.flatnonzero(~gone)
    order = live[np.lexsort((live, scores[live]))]  # ascending score, then position: rank r = 0 is the weakest
    raw = p.copy()
    raw[order] += increments(len(order), left, A, u)
    crossing = order[raw[order] >= 1]
    if len(crossing) > left:  # more cross than may go: the highest raw values (then the weakest) are pruned
        keep = crossing[np.lexsort((np.arange(len(crossing)), -raw[crossing]))][left:]
        raw[keep] = np.nextafter(1.0, 0.0)
    p = np.clip(raw, 0.0, 1.0)
    if int((p >= 1).sum()) >= goal:
        p[p < 1] = 0.0
    return p


@dataclass
class SPPState:
    """The probabilistic phase's state: probabilities per group id, each group's goal, rank updates made."""

    probabilities: dict[int, np.ndarray]
    goals: dict[int, int]
    updates: int = 0
    steps: int = 0
    forced: int = 0
    history: list[dict] = field(default_factory=list)

    def done(self) -> bool:
        return all(int((self.probabilities[g] >= 1).sum()) >= n for g, n in self.goals.items())

    def pruned(self) -> int:
        return sum(int((p >= 1).sum()) for p in self.probabilities.values())


class SPPMasks(Callback):
    """fit() callback of the probabilistic phase: rank updates every `interval` steps, a seeded Bernoulli keep-mask
    per step (the same on every torchrun rank: seeded by step, not by rank), masked weights zeroed for the step's
    forward/backward and restored after optimizer.step()."""

    def __init__(self, graph, index, state: SPPState, config: SPPConfig, interval: int | None = None):
        self.graph, self.index, self.state, self.config = graph, index, state, config
        self.interval = interval or config.interval or 1
        self.positions = {g.id: np.searchsorted(index.roots, g.channels) for g in index.groups if g.id in state.goals}
        self.saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    def _rank_update(self, model: nn.Module) -> None:
        from dpruner.methods.api import score_groups

        scores = score_groups(model, self.graph, self.index, self.config.criterion, self.config.seed)
        for gid, goal in self.state.goals.items():
            self.state.probabilities[gid] = update_probabilities(self.state.probabilities[gid], scores[gid], goal,
                                                                 self.config.A, self.config.u)
        self.state.updates += 1

    def masks(self, step: int) -> np.ndarray:
        """Flags per dense class of the channels masked at `step` (p = 1 always; others drawn with probability p)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        masked = np.zeros(len(self.index.roots), dtype=bool)
        for gid in sorted(self.state.goals):
            p = torch.as_tensor(self.state.probabilities[gid])
            draw = torch.rand(len(p), generator=generator, dtype=torch.float64) < p
            masked[self.positions[gid]] = draw.numpy() | (p.numpy() >= 1)
        return masked

    def before_step(self, model: nn.Module, step: int) -> None:
        from dpruner.criteria.views import channel_parameters

        if step % self.interval == 0 and not self.state.done():
            self._rank_update(model)
        masked = self.masks(step)
        self.saved = []
        with torch.no_grad():
            for tensor, dim, idx in channel_parameters(model, self.graph, self.index, masked):
                idx = idx.to(tensor.device)
                self.saved.append((tensor, dim, idx, tensor.index_select(dim, idx).clone()))
                tensor.index_fill_(dim, idx, 0.0)

    def after_step(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for tensor, dim, idx, values in self.saved:
                tensor.index_copy_(dim, idx, values)
        self.saved = []
        self.state.steps = step + 1

    def should_stop(self, model: nn.Module, step: int) -> bool:
        return self.state.done()


def plan_goals(model: nn.Module, example: torch.Tensor, config: SPPConfig, index, leaf_modules=()) -> tuple:
    """({group id: channels to lose}, whether the planner met the ratio) from dpruner's planner at config.ratio (a
    one-shot plan on a copy, same criterion and allocation): SPP decides which channels go, the planner how many.
    `index` is the channel index of the model SPP trains (the analysis is deterministic: the same group ids)."""
    from dpruner.methods.api import prune

    planned = prune(copy.deepcopy(model), example, ratio=config.ratio, target=config.target,
                    criterion=config.criterion, allocation=config.allocation, exclude=config.exclude,
                    round_to=config.round_to, max_fraction=config.max_fraction, seed=config.seed,
                    leaf_modules=leaf_modules)
    sizes = {g.id: len(g) for g in index.groups if g.prunable}
    goals = {}
    for group in planned.groups:
        if sizes.get(group["group"]) != group["channels"]:
            raise RuntimeError("the planner's groups differ from the graph's")
        if group["channels"] > group["kept"]:
            goals[group["group"]] = group["channels"] - group["kept"]
    return goals, planned.target_met


def force_goals(state: SPPState, scores: dict[int, np.ndarray]) -> None:
    """End of the budget: a group short of its goal loses the live channels with the highest p (weakest score
    first on ties), so the result still reaches the planned widths; how many were forced is recorded."""
    for gid, goal in state.goals.items():
        p = state.probabilities[gid]
        left = goal - int((p >= 1).sum())
        if left <= 0:
            continue
        live = np.flatnonzero(p < 1)
        order = live[np.lexsort((live, scores[gid][live], -p[live]))]
        p = p.copy()
        p[order[:left]] = 1.0
        p[p < 1] = 0.0
        state.probabilities[gid] = p
        state.forced += left


def removed_flags(index, state: SPPState) -> np.ndarray:
    """Flags per dense class of the channels pruned for good."""
    removed = np.zeros(len(index.roots), dtype=bool)
    for group in index.groups:
        p = state.probabilities.get(group.id)
        if p is not None:
            removed[np.searchsorted(index.roots, np.asarray(group.channels)[p >= 1])] = True
    return removed


def run_spp(model: nn.Module, example: torch.Tensor, config: SPPConfig, env) -> "MethodResult":
    """The method: plan each group's share, train with probabilistic masks until every group reached it (or the
    phase's budget ends: the rest is forced), remove, recalibrate BatchNorm, retrain for the remaining budget."""
    from dpruner.graph.check import check_pruned, expected_outputs
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.api import score_groups
    from dpruner.methods.run import MethodResult, _evaluate
    from dpruner.metrics.macs import count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan
    from dpruner.train.api import recalibrate
    from dpruner.train.loop import fit

    if env.train is None or env.data is None:
        raise InputError("--method spp learns what to remove while fine-tuning: give --data.")
    from dpruner.criteria import get_criterion

    if get_criterion(config.criterion).needs_data:
        raise InputError(f"--method spp ranks channels by a weight criterion (l1, l2, fpgm, bn); "
                         f"'{config.criterion}' needs data at every rank update.")
    from dpruner.methods.coarse import check_planner

    check_planner(config, "spp")
    from dpruner.methods.tolerance import _config_json
    from dpruner.train.state import check_state, make_state

    data, budget = env.data, env.train.epochs
    base = _evaluate(model, env)
    model.eval()
    before = count_sizes(model, example)
    work = copy.deepcopy(model)
    graph, index = analyze_groups(work, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
    expected = expected_outputs(model, example, graph.scopes)
    goals, planned_met = plan_goals(model, example, config, index, env.leaf_modules)
    sizes = {g.id: len(g) for g in index.groups}
    state = SPPState({gid: np.zeros(sizes[gid]) for gid in goals}, goals)
    teacher = copy.deepcopy(model).to(env.device).eval() if env.distill else None
    phase = replace(env.train, epochs=budget * config.prune_fraction)
    phase_steps = round(phase.epochs * len(data.train))
    A = effective_A(phase_steps, config.A, config.interval)
    config = replace(config, A=A)
    interval = config.interval or interval_for(phase_steps, A)
    identity = {"data": getattr(data, "name", None), "params": before["params"], "macs": before["macs"],
                "world_size": env.ctx.world_size, "distill": env.distill}
    settings = _config_json(config, env.train, identity)

    def save(stage: str, weights: dict, plans: list, extra: dict) -> None:
        if env.on_checkpoint is not None:
            env.on_checkpoint(make_state("spp", settings, weights, {
                "stage": stage, "probabilities": {str(g): torch.from_numpy(p) for g, p in state.probabilities.items()},
                "updates": state.updates, "steps": state.steps, "forced": state.forced, **extra}, plans=plans))

    start, resumed = None, None
    if env.resume is not None:
        resumed = check_state(env.resume, "spp", settings, {"stage": str, "updates": int, "steps": int,
                                                            "forced": int, "probabilities": dict}, "the resume file")
        try:
            probabilities = {int(g): p.numpy().astype(np.float64) for g, p in resumed["probabilities"].items()}
            if set(probabilities) != set(goals) or any(len(p) != sizes[g] for g, p in probabilities.items()):
                raise ValueError("groups differ")
            state.probabilities = probabilities
            state.updates, state.steps, state.forced = resumed["updates"], resumed["steps"], resumed["forced"]
            if resumed["stage"] == "masking":
                work.load_state_dict(env.resume["model"])
                start = resumed["fit"]
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError):
            raise InputError("The saved spp-run state does not fit this model; run without --resume.") from None
    masks = SPPMasks(graph, index, state, config, interval)
    if resumed is None or resumed["stage"] == "masking":
        def epoch_end(fit_state: dict) -> None:  # mid-phase: weights are whole (masked ones restored)
            save("masking", work.state_dict(), [], {"fit": fit_state})

        phase_fit = fit(work.to(env.device), data, phase, device=env.device, ctx=env.ctx, teacher=teacher,
                        description="spp", callbacks=[masks], start=start, on_epoch_end=epoch_end)
        used, position = phase_fit.epochs, phase_fit.steps
        work.cpu()
        reached = state.done()
        if not reached:
            force_goals(state, score_groups(work, graph, index, config.criterion, config.seed))
        plan = make_plan(graph, index, index.roots[removed_flags(index, state)])
        pruned = apply_plan(work, plan)
        check_pruned(pruned, example, expected, leaf_modules=env.leaf_modules)
        recalibrate(pruned, data, env, batches=config.recal_batches)
        save("retrain", pruned.state_dict(), [plan], {"used": used, "position": position, "reached": reached})
    else:  # the phase had finished: an interrupted retrain starts over from the pruned model
        try:
            plan = env.resume["plans"][0]
            pruned = apply_plan(work, plan)
            pruned.load_state_dict(env.resume["model"])
            used, position, reached = float(resumed["used"]), int(resumed["position"]), bool(resumed["reached"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError):
            raise InputError("The saved spp-run state does not fit this model; run without --resume.") from None
    rest = budget - used
    if rest > 1e-9:
        used += fit(pruned.to(env.device), data, replace(env.train, epochs=rest), device=env.device, ctx=env.ctx,
                    teacher=teacher, description="retrain", position=position).epochs
    pruned.cpu().eval()
    after = {**count_sizes(pruned, example), **_evaluate(pruned, env)}
    return MethodResult(
        model=pruned, plans=[plan], method="spp", criterion=config.criterion, target_met=planned_met,
        before={**before, **base}, after=after, requested={"ratio": config.ratio}, epochs_used=used,
        details={"spp": {"A": config.A, "u": config.u, "interval": interval, "rank_updates": state.updates,
                         "masked_steps": state.steps, "reached_in_phase": reached, "forced_channels": state.forced,
                         "pruned_channels": state.pruned(), "allocation": config.allocation}})
