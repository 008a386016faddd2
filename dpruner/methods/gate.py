"""D-Pruner (Huynh, Lee and Balan, EMDL 2018; seed 000): a small scorer network embedded in the model rates every
channel while the network fine-tunes, and the channels it keeps rating low are removed.

[reading] (the paper's full text was not available here; every choice below is an option or stated in the docs):
- one scorer per prunable channel group (coupled channels share one gate): an MLP C -> max(4, C/8) -> C with a
  sigmoid, whose input is the batch- and space-averaged |z| of the group's norm outputs (the mean of z itself is
  BatchNorm's beta in training mode, a constant); its output s in (0, 1)^C multiplies the norm layer's output (after
  the norm, before the activation: a gate before the norm would be normalised away). Groups without a norm layer
  gate the producing layer's output. The scorer's input is detached: it reads the network, it does not train it.
- loss = task loss + sum over groups of [sparsity_weight * (mean(s) - keep)^2 + binary_weight * mean(s (1 - s))]
  (the second pushes scores to 0 or 1); `pull` "zero", the paper's form, uses mean(s) instead, which can collapse
  (see PULLS). The scorers train with their own learning rate (`scorer_lr`, no weight decay). The zero pull's
  defaults (2.0, 0.1, 0.5) were picked on the digits sample model so that scores separate within a few epochs:
  with equal weights the binarisation term holds scores starting near 1 where they are, and nothing is removed.
- every `prune_every` epochs the channels whose interval score (`rank`: RANKS) is below `threshold` go (lowest first,
  never past the goal, nor past --max-fraction of a group's current width in one removal). When the gating ends,
  the surviving channels' mean scores over the last interval are folded into the norm layer (gamma *= s,
  beta *= s) or the producer's weights and bias: exact, since the gate is linear after them.
- stop at the --ratio (MACs or params) or, with a tolerance, before validation accuracy drops past it (a removal
  below it gets one interval to recover, then is undone; with only a tolerance, Play-and-Prune's rate controller
  sizes the removals: MAX_RATE). With a ratio,
  `schedule` "progressive" (default) makes interval i of n reach at least ratio^(i/n), so removals spread over the
  gating phase and the network recovers between them; "last" forces only the last interval. What the threshold
  leaves short of an interval's goal is removed regardless of it (counted as forced): each group loses channels up
  to the width dpruner's planner gives it (uniform allocation), lowest score x L1 norm first (the folded channel's
  magnitude: the weights decide where the scores have not separated). After a removal the scorers continue,
  restricted to the surviving channels (`links`, `carry`), and stay on the network (BatchNorm is recalibrated with
  them on): a score keeps its history across removals and nothing is scaled twice. Only where a group's channels
  cannot be traced to one old scorer are all scores folded in and the scorers started over. Scorers are dropped
  at the end and the rest of the budget fine-tunes the plain model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from dpruner.criteria.stats import channel_dim
from dpruner.errors import InputError
from dpruner.train.loop import Callback


@dataclass(frozen=True)
class GateConfig:
    """Settings of `--method gate`: the goal (`ratio` of `target`, and/or `tolerance` of validation accuracy),
    the loss strengths, the removal threshold and cadence, and the share of the budget kept for the final
    fine-tune."""

    ratio: float | None = None
    tolerance: float | None = None
    target: str = "macs"
    exclude: tuple[str, ...] = ()
    max_fraction: float = 0.9
    seed: int = 0
    sparsity_weight: float | None = None  # None: SPARSITY[pull] (20 for target, 2 for zero)
    binary_weight: float = 0.1
    threshold: float = 0.1
    prune_every: float | None = None  # None: a tenth of the budget
    final_fraction: float | None = None  # None: 0.6 with a ratio, 0.3 with only a tolerance (FINAL)
    hidden_divisor: int = 8
    scorer_lr: float = 0.5
    initial_score: float = 0.95
    schedule: str = "progressive"
    rank: str = "logit"
    pull: str = "target"
    step_rate: float = 0.1  # --tolerance without --ratio: share of the target the first step removes (MAX_RATE)

    def __post_init__(self):
        from dpruner import validate

        if self.ratio is None and self.tolerance is None:
            raise InputError("--method gate needs a goal: --ratio, --tolerance, or both.")
        if self.ratio is not None and not (self.ratio > 1 and math.isfinite(self.ratio)):
            raise InputError(f"--ratio must be a finite number greater than 1 (e.g. 2x), got {self.ratio:g}.")
        if self.pull not in PULLS:
            raise InputError(f"--gate-pull must be one of {', '.join(PULLS)}, got {self.pull!r}.")
        if self.sparsity_weight is None:
            object.__setattr__(self, "sparsity_weight", SPARSITY[self.pull])
        validate.number(self.sparsity_weight, "--gate-sparsity", low=0, high=1e3)
        validate.number(self.binary_weight, "--gate-binary", low=0, high=1e3)
        validate.number(self.threshold, "--gate-threshold", low=0, low_open=True, high=1, high_open=True)
        if self.prune_every is not None:
            validate.number(self.prune_every, "--gate-every", low=0, low_open=True, high=validate.MAX_EPOCHS)
        if self.final_fraction is None:
            object.__setattr__(self, "final_fraction", FINAL["ratio" if self.ratio is not None else "tolerance"])
        validate.number(self.final_fraction, "--gate-final", low=0, high=1, high_open=True)
        validate.number(self.step_rate, "--gate-rate", low=MIN_RATE, high=MAX_RATE)
        if self.schedule not in SCHEDULES:
            raise InputError(f"--gate-schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.rank not in RANKS:
            raise InputError(f"--gate-rank must be one of {', '.join(RANKS)}, got {self.rank!r}.")


# progressive: interval i of n meets at least ratio^(i/n) (removals spread over the gating phase, the network
# recovers between them); last: only the last interval forces the ratio (earlier ones remove what the threshold says)
SCHEDULES = ("progressive", "last")


# how an interval's per-step scores become one ranking score per channel. logit: sigmoid of the mean logit; score:
# the mean score. The scores vary per batch (the scorers read the batch's features) and the sigmoid is concave near
# the initial 0.95, so the mean score is lowest for the channels whose logits fluctuate most (Jensen), whatever their
# level; the mean logit ranks by level. Folding always uses the mean score (the constant that best replaces the gate).
RANKS = ("logit", "score")
# the sparsity term per group. target (default): sparsity_weight * (mean(s) - keep)^2, keep = the share of the
# group's channels the planner keeps at the remaining ratio (with only a tolerance: after the interval's step): the
# mean score is held at what the goal needs and the task loss decides which channels carry it. zero:
# sparsity_weight * mean(s), a pull of every score toward 0 (the paper's form). A gate after a norm layer faces
# almost no resistance to a pull that lowers a whole group's scores together, since the next norm layer undoes a
# common scale: with `zero`, ResNet-56 saw the mean score fall from 0.86 to 0.21 within one interval of a 3-epoch
# budget (the threshold then removed 307 channels at once) and from 0.95 to 0.26 within the first 0.4 epoch of the
# full 50k-image training set (every removal then fell below the tolerance); the default weight of each form:
PULLS = ("target", "zero")
SPARSITY = {"target": 20.0, "zero": 2.0}  # the quadratic term is weak near its target, hence the larger weight
# share of the budget for the final fine-tune without scorers. With a ratio, 0.6 (a gating phase of 40%): ResNet-56 at
# 2x, 78.6% / 82.4% after 1 / 3 epochs where 0.2 gave 76.9% / 75.3%. With only a tolerance, 0.3 (70% for removals, as
# the tolerance controller's steps get): more intervals for the rate controller, ResNet-56 with 3 epochs 1.34x MACs
# at 84.3% where 0.6 reached 1.17x at 84.4% (target pull; zero pull 1.32x vs 1.19x)
FINAL = {"ratio": 0.6, "tolerance": 0.3}
# --tolerance without --ratio: Play-and-Prune's rate controller (the values of ToleranceConfig's defaults) sets how
# much every interval removes. Interval goal = (1 - rate) x the current target (MACs or params); the gate's ranking
# chooses the channels (the threshold's first, then forced_choice). A removal that keeps validation accuracy within
# the tolerance is accepted and the rate grows with the headroom: rate *= 1 + GAIN * min(margin / tolerance, 1), at
# most MAX_RATE. One that falls below it gets the next interval to recover in ("play", gates on, nothing removed):
# recovered, it is accepted and rate *= SHRINK (smaller steps near the edge); not recovered (or no interval left), the
# network goes back to before the removal (scores folded, scorers start over) and rate *= SHRINK. The run stops after
# MAX_FAILURES rollbacks in a row or once the rate is below MIN_RATE. Without it the threshold alone decided, and on
# ResNet-56 with a 1-epoch budget no score fell below it: --tolerance 1% returned the dense model (1.00x).
MAX_RATE, GAIN, SHRINK, MIN_RATE, MAX_FAILURES = 0.3, 0.5, 0.5, 0.01, 3
RECOVERING = "pruned, below the tolerance: recovering"


def interval_goal(before: float, goal: float, step: int, steps: int, schedule: str) -> float | None:
    """The target (MACs or params) interval `step` of `steps` must reach: None where nothing is forced."""
    if schedule == "last":
        return goal if step >= steps else None
    return before * (goal / before) ** (min(step, steps) / steps)


def _scorer(n: int, divisor: int, initial: float, hidden: int | None = None) -> nn.Sequential:
    """C -> max(4, C/divisor) -> C, sigmoid; starts at `initial` for every channel (last layer zero, bias logit)."""
    hidden = hidden or max(4, n // divisor)
    net = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n), nn.Sigmoid())
    nn.init.zeros_(net[2].weight)
    nn.init.constant_(net[2].bias, math.log(initial / (1 - initial)))
    return net


def _members(graph, index, group) -> list[tuple]:
    """The slots a group's gate multiplies: its norm layers' outputs, else its producers'. Empty when the gate
    could not be folded exactly (a norm without affine weight and bias)."""
    norms = [k for k in group.slots if graph.slots[k].role == "norm"]
    for key in norms:
        module = graph.modules.get(key[0])
        if module is None or getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
            return []
    if norms:
        return norms
    outs = [k for k in group.slots if graph.slots[k].role == "out"]
    for key in outs:
        module = graph.modules.get(key[0])
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or \
                isinstance(module, nn.modules.conv._ConvTransposeNd):
            return []
    return outs


def gate_members(graph, index) -> tuple[dict[int, int], dict[str, list[tuple]]]:
    """The gated groups' widths and, per gated module, (group id, output positions, their channel index in the
    group, the module's output width, slot role) for each group it carries."""
    sizes: dict[int, int] = {}
    probes: dict[str, list] = {}
    for group in index.groups:
        if not group.prunable:
            continue
        members = _members(graph, index, group)
        if not members:
            continue
        sizes[group.id] = len(group.channels)
        rank = np.full(len(index.roots), -1, dtype=np.int64)
        rank[index.roots.searchsorted(group.channels)] = np.arange(len(group.channels))
        for key in members:
            of_position = rank[index.slot_classes[key]]
            mine = np.nonzero(of_position >= 0)[0]
            probes.setdefault(key[0], []).append(
                (group.id, torch.as_tensor(mine), torch.as_tensor(of_position[mine]), len(of_position),
                 graph.slots[key].role))
    return sizes, probes


def links(members: dict[str, list[tuple]], plan: dict, sizes: dict[int, int],
          probes: dict[str, list[tuple]]) -> dict[int, tuple[int, torch.Tensor]]:
    """Where each gated group of a pruned model came from: new group id -> (old group id, the old channel index of
    each of its channels). `members`: the gates before the removal (`Gates.members`); `plan`: the removal;
    `sizes`, `probes`: `gate_members` of the pruned model. A group whose channels cannot be traced to one old group
    is left out."""
    old_at: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}
    for name, entries in members.items():
        for gid, mine, target, _, role in entries:
            old_at.setdefault((name, role), {}).update(
                {p: (gid, i) for p, i in zip(mine.tolist(), target.tolist())})
    out: dict[int, tuple[int, torch.Tensor]] = {}
    for gid, n in sizes.items():
        entry = next(((name, e) for name, entries in probes.items() for e in entries if e[0] == gid), None)
        if entry is None:
            continue
        name, (_, mine, target, _, role) = entry
        kept = plan.get("modules", {}).get(name, {}).get(role)
        source = old_at.get((name, role), {})
        pairs = [(j, source.get(kept[q] if kept is not None else q)) for q, j in zip(mine.tolist(), target.tolist())]
        if len(pairs) != n or any(o is None for _, o in pairs) or len({o[0] for _, o in pairs}) != 1:
            continue
        out[gid] = (pairs[0][1][0], torch.as_tensor([o[1] for _, o in sorted(pairs)]))
    return out


def carry(state: dict[int, dict], traced: dict[int, tuple[int, torch.Tensor]]) -> dict[int, dict]:
    """The scorers of a removal's survivors: each new group's scorer is its old group's restricted to the kept
    channels (input features and outputs; the hidden layer keeps its width), so what the scorers learned survives
    the removal. `traced`: `links`."""
    out = {}
    for gid, (old_gid, idx) in traced.items():
        old = state[old_gid]
        out[gid] = {"0.weight": old["0.weight"][:, idx], "0.bias": old["0.bias"],
                    "2.weight": old["2.weight"][idx], "2.bias": old["2.bias"][idx]}
    return out


class Gates:
    """Scorer networks attached to a model: a submodule `_dpruner_gates` (so fit's optimizer and DDP see the
    scorers' parameters) and forward hooks on the gated layers. `detach()` leaves the plain model."""

    NAME = "_dpruner_gates"

    def __init__(self, model: nn.Module, graph, index, config: GateConfig, seed: int = 0,
                 carried: dict[int, dict] | None = None):
        """`carried` (group id -> scorer state, from `carry`) continues earlier scorers for the groups whose width
        matches; the others start fresh (seeded)."""
        self.model, self.graph, self.index = model, graph, index
        self.sizes, self.members = gate_members(graph, index)
        with torch.random.fork_rng(devices=[]):  # seeded, so a resumed run draws the same scorers
            torch.manual_seed(seed)
            self.scorers = nn.ModuleDict({str(g): _scorer(n, config.hidden_divisor, config.initial_score)
                                          for g, n in sorted(self.sizes.items())})
        for g, state in (carried or {}).items():
            if g in self.sizes and state["2.bias"].numel() == self.sizes[g]:
                net = _scorer(self.sizes[g], config.hidden_divisor, config.initial_score,
                              hidden=state["0.weight"].shape[0])
                net.load_state_dict(state)
                self.scorers[str(g)] = net
        self.cache: dict[int, torch.Tensor] = {}
        self.constant: dict[int, torch.Tensor] | None = None  # fixed scores (folding checks); None: the scorers
        model.add_module(self.NAME, self.scorers)
        self.handles = [model.register_forward_pre_hook(lambda m, args: self.cache.clear())]
        for name in self.members:
            self.handles.append(graph.modules[name].register_forward_hook(self._hook(name)))

    def state(self) -> dict[int, dict]:
        """Each group's scorer weights (copies), the form `carry` and `carried=` take."""
        return {int(g): {k: v.detach().clone() for k, v in net.state_dict().items()}
                for g, net in self.scorers.items()}

    def _score(self, gid: int, z: torch.Tensor, axis: int, mine, target, n_pos) -> torch.Tensor:
        if self.constant is not None:
            return self.constant[gid].to(z.device, z.dtype)
        flat = z.detach().abs().movedim(axis, -1).reshape(-1, n_pos)[:, mine.to(z.device)].float().mean(0)
        feature = flat.new_zeros(self.sizes[gid]).index_add_(0, target.to(z.device), flat)
        return self.scorers[str(gid)](feature)

    def _hook(self, name: str):
        def fn(module, inputs, z):
            if not isinstance(z, torch.Tensor):
                return z
            axis = channel_dim(module, z, self.members[name][0][3])
            factor = None
            for gid, mine, target, n_pos, _ in self.members[name]:
                if gid not in self.cache:
                    self.cache[gid] = self._score(gid, z, axis, mine, target, n_pos)
                if factor is None:
                    factor = torch.ones(n_pos, device=z.device, dtype=torch.float32)
                factor = factor.index_put((mine.to(z.device),), self.cache[gid][target.to(z.device)].float())
            shape = [1] * z.dim()
            shape[axis] = factor.numel()
            return z * factor.to(z.dtype).view(shape)
        return fn

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        if hasattr(self.model, self.NAME):
            delattr(self.model, self.NAME)
        self.handles, self.cache = [], {}


def fold(model: nn.Module, graph, index, scores: dict[int, np.ndarray]) -> None:
    """Multiply each gated group's channels by its score, folded into the gated layers' parameters (norm: gamma and
    beta; producer without a norm: weight rows and bias), so the plain model computes what the gated one did with
    constant scores."""
    with torch.no_grad():
        for name, entries in gate_members(graph, index)[1].items():
            module = graph.modules[name]
            for gid, mine, target, _, _ in entries:
                if gid not in scores:
                    continue
                factor = torch.as_tensor(scores[gid], dtype=torch.float64)[target]
                for param in (module.weight, getattr(module, "bias", None)):
                    if param is None:
                        continue
                    shape = [-1] + [1] * (param.dim() - 1)
                    rows = param.index_select(0, mine)
                    param.index_copy_(0, mine, (rows.double() * factor.view(shape)).to(param.dtype))


class GateTraining(Callback):
    """fit() callback: adds the sparsity and binarisation terms of this step's scores and accumulates each group's
    mean score over the interval (summed over torchrun ranks when read)."""

    def __init__(self, gates: Gates, config: GateConfig, keep: dict[int, float] | None = None):
        """`keep`: group id -> the share of its channels the goal keeps (the `target` pull); None: pull to zero."""
        self.gates, self.config = gates, config
        self.keep = keep if config.pull == "target" else None
        self.sums = {g: torch.zeros(n, dtype=torch.float64) for g, n in gates.sizes.items()}
        self.logits = {g: torch.zeros(n, dtype=torch.float64) for g, n in gates.sizes.items()}
        self.count = 0

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        """The scorers train in their own group: learning rate `scorer_lr`, no weight decay (fit's default groups
        would give them the network's fine-tuning rate, far too slow for a gate to decide within a budget)."""
        mine = {id(p) for p in self.gates.scorers.parameters()}
        out = [{**g, "params": [p for p in g["params"] if id(p) not in mine]} for g in groups]
        out = [g for g in out if g["params"]]
        return out + [{"params": list(self.gates.scorers.parameters()), "lr": self.config.scorer_lr,
                       "weight_decay": 0.0}]

    def loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if not self.gates.cache:
            return None
        for gid, s in self.gates.cache.items():
            s = s.detach().double().cpu()
            self.sums[gid] += s
            self.logits[gid] += torch.logit(s.clamp(1e-9, 1 - 1e-9))
        self.count += 1
        terms = [self.config.sparsity_weight * self._pull(gid, s) + self.config.binary_weight * (s * (1 - s)).mean()
                 for gid, s in sorted(self.gates.cache.items())]
        return torch.stack(terms).sum()  # per group: a group's weight does not grow with its width

    def _pull(self, gid: int, s: torch.Tensor) -> torch.Tensor:
        if self.keep is not None and gid in self.keep:
            return (s.mean() - self.keep[gid]) ** 2
        return s.mean()

    def means(self, ctx, device) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per channel, over the steps seen (the same on every rank): the mean score (what folding multiplies by)
        and the ranking score (`GateConfig.rank`: the sigmoid of the mean logit, or the mean score)."""
        if ctx.enabled:
            import torch.distributed as dist

            for sums in (self.sums, self.logits):
                for gid in sorted(sums):
                    t = sums[gid].to(device)
                    dist.all_reduce(t)
                    sums[gid] = t.cpu()
            from dpruner.train.distributed import sum_across

            count = max(sum_across([float(self.count)], ctx, device)[0], 1.0)
        else:
            count = max(float(self.count), 1.0)
        scale = {g: (v / count).numpy() for g, v in self.sums.items()}
        if self.config.rank == "score":
            return scale, scale
        return scale, {g: torch.sigmoid(v / count).numpy() for g, v in self.logits.items()}


def choose(index, means: dict[int, np.ndarray], cost, goal: float | None, which: int, threshold: float | None,
           max_fraction: float) -> np.ndarray:
    """Flags (per dense class) of the channels to remove: ascending mean score, only below `threshold` (None: any),
    never more than `max_fraction` of a group's current width in one removal (at least one channel stays), and
    stopping once the estimated target is at most `goal` (None: no goal)."""
    removed = np.zeros(len(index.roots), dtype=bool)
    candidates = []
    for group in index.groups:
        s = means.get(group.id)
        if s is None:
            continue
        for i in np.argsort(s, kind="stable"):
            if threshold is None or s[i] < threshold:
                candidates.append((float(s[i]), group.id, int(i)))
    candidates.sort()
    taken: dict[int, int] = {}
    sizes = {g.id: len(g.channels) for g in index.groups}
    channels = {g.id: g.channels for g in index.groups}
    for _, gid, i in candidates:
        if goal is not None and cost.estimate(removed)[which] <= goal:
            break
        if taken.get(gid, 0) + 1 > min(math.floor(max_fraction * sizes[gid] + 1e-9), sizes[gid] - 1):
            continue
        removed[np.searchsorted(index.roots, channels[gid][i])] = True
        taken[gid] = taken.get(gid, 0) + 1
    return removed


def planned_losses(model: nn.Module, example: torch.Tensor, config: GateConfig, index, ratio: float,
                   leaf_modules=()) -> dict[int, int]:
    """Channels each group loses in dpruner's plan at `ratio` (uniform allocation, L1; as SPP's goals)."""
    from types import SimpleNamespace

    from dpruner.methods.spp import plan_goals

    planner = SimpleNamespace(ratio=ratio, target=config.target, criterion="l1", allocation="uniform",
                              exclude=config.exclude, round_to=1, max_fraction=config.max_fraction, seed=config.seed)
    return plan_goals(model, example, planner, index, leaf_modules)[0]


def keep_shares(model: nn.Module, example: torch.Tensor, config: GateConfig, graph, index, goal: float | None,
                leaf_modules=()) -> dict[int, float] | None:
    """The `target` pull's goal per gated group: the share of its channels the plan down to `goal` (the ratio's
    target, or with only a tolerance the interval's) keeps (None: no goal, or the `zero` pull)."""
    from dpruner.metrics.macs import count_sizes

    if goal is None or config.pull != "target":
        return None
    sizes = gate_members(graph, index)[0]
    now = count_sizes(model, example)[config.target]
    losses = planned_losses(model, example, config, index, now / goal, leaf_modules) if now > goal * (1 + 1e-9) \
        else {}
    return {g: 1.0 - losses.get(g, 0) / n for g, n in sizes.items()}


def forced_choice(model: nn.Module, example: torch.Tensor, config: GateConfig, graph, index,
                  means: dict[int, np.ndarray], removed: np.ndarray, goal: float, leaf_modules=(),
                  cost=None) -> np.ndarray:
    """A gating interval whose goal (the schedule's share of the ratio; the ratio itself in the last interval) the
    threshold did not meet: every group loses channels up to the width dpruner's planner gives it (uniform
    allocation, as SPP's goals), the threshold's choices first (they count toward the width), then lowest
    `forced_keys`. With `cost` (the model's cost model), the planner's ratio is the lowest (bisection) at which
    that union meets `goal`, so what the threshold removed in one group lowers what the others must give instead of
    adding to it. A global ranking by score alone takes the costliest groups while
    the scores have not separated: on ResNet-56 at 2x with a 1-epoch budget (mean score still 0.90) it cut the
    residual stream and ended at 48.3% top-1 after fine-tuning, below random pruning (76.7%)."""
    from dpruner.methods.cost import TARGET_INDEX
    from dpruner.methods.soft import lowest
    from dpruner.metrics.macs import count_sizes

    now = count_sizes(model, example)[config.target]
    if now <= goal * (1 + 1e-9):
        return removed
    keys = forced_keys(model, graph, index, means, config.seed)
    for group in index.groups:  # the threshold's choices count toward the group's width: they go first
        if group.id in keys:
            taken = removed[np.searchsorted(index.roots, np.asarray(group.channels))]
            keys[group.id] = np.where(taken, -np.inf, keys[group.id])

    def union(ratio: float) -> np.ndarray:
        return removed | lowest(index, keys, planned_losses(model, example, config, index, ratio, leaf_modules))

    best = union(now / goal)
    if cost is None or not removed.any():
        return best

    def meets(flags: np.ndarray) -> bool:
        return cost.estimate(flags)[TARGET_INDEX[config.target]] <= goal * (1 + 1e-9)

    if not meets(best):  # the estimate and the planner's count disagree: keep the planner's full share
        return best
    low, high = 1.0, now / goal
    for _ in range(8):  # ratio within (now/goal)^(1/256) of the lowest that meets the goal
        middle = math.sqrt(low * high)
        if middle <= 1 + 1e-9:
            break
        flags = union(middle)
        if meets(flags):
            high, best = middle, flags
        else:
            low = middle
    return best


def forced_keys(model: nn.Module, graph, index, means: dict[int, np.ndarray], seed: int = 0) -> dict:
    """Ranking keys of a forced removal: mean score x the channel's L1 norm (relative to its group's mean). Folding
    multiplies a channel's output by its score, so this is the folded channel's relative magnitude: separated
    scores (0.05 vs 0.9) decide as before, scores that have not separated leave the choice to the weights instead
    of to the scorers' random initialisation (ResNet-56 at 2x, 1-epoch budget: scores 0.90 +- 0.02 alone ended
    at 69.8% after fine-tuning, below random pruning's 76.7%)."""
    from dpruner.methods.api import score_groups

    l1 = score_groups(model, graph, index, "l1", seed)
    return {g: means[g] * l1[g] / max(float(np.mean(l1[g])), 1e-12) if g in l1 else means[g] for g in means}


def step_accuracy(model: nn.Module, data, device, ctx) -> float:
    """Validation top-1 after a removal (summed over torchrun ranks), the tolerance check's measurement."""
    from dpruner.train.evaluate import evaluate

    accuracy = evaluate(model.to(device), data.val, device, ctx=ctx).accuracy
    model.cpu()
    return accuracy


def run_gate(model: nn.Module, example: torch.Tensor, config: GateConfig, env) -> "MethodResult":
    """Train with scorers, remove low-scored channels every `prune_every` epochs until the goal, fold, drop the
    scorers, fine-tune the rest of the budget."""
    from dpruner.graph.check import check_pruned, expected_outputs
    from dpruner.graph.summary import analyze_groups, nothing_prunable
    from dpruner.methods.cost import TARGET_INDEX, build_cost_model
    from dpruner.methods.run import MethodResult, _evaluate
    from dpruner.metrics.macs import count_macs, count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan
    from dpruner.train.api import recalibrate
    from dpruner.train.loop import fit

    if env.train is None or env.data is None:
        raise InputError("--method gate learns what to remove while fine-tuning: give --data.")
    data, budget, device, ctx = env.data, env.train.epochs, env.device, env.ctx
    which = TARGET_INDEX[config.target]
    model = copy.deepcopy(model).cpu().eval()
    base = _evaluate(model, env)
    before = count_sizes(model, example)
    goal = before[config.target] / config.ratio if config.ratio is not None else None
    floor = base["accuracy"] - config.tolerance if config.tolerance is not None else None
    teacher = copy.deepcopy(model).to(device).eval() if env.distill else None
    graph, index = analyze_groups(model, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
    expected = expected_outputs(model, example, graph.scopes)
    if not any(g.prunable for g in index.groups):
        raise nothing_prunable(index)
    del graph, index
    from dpruner.methods.tolerance import _config_json
    from dpruner.train.state import check_state, make_state

    identity = {"data": getattr(data, "name", None), "params": before["params"], "macs": before["macs"],
                "world_size": ctx.world_size, "distill": env.distill}
    settings = _config_json(config, env.train, identity)
    gate_budget = budget * (1 - config.final_fraction)
    batches = len(data.train)
    if batches == 0:
        from dpruner.data.spec import DataError

        raise DataError("The training split is empty (a loader with drop_last and fewer items than a batch?).")
    every = config.prune_every if config.prune_every is not None else budget / 10
    interval = max(1, round(min(every, gate_budget) * batches)) / batches  # what fit really trains
    intervals = max(1, math.floor((gate_budget + 1e-9) / interval))  # gating intervals the budget holds
    plans: list[dict] = []
    history: list[dict] = []
    used, position, forced, reached, stop = 0.0, 0, 0, False, None
    saved: dict[int, dict] | None = None  # the scorers to continue (group id -> weights; `carry` after a removal)
    unfolded: dict[int, np.ndarray] | None = None  # last interval's scores, trained with but not yet folded
    analysed = None  # (graph, index) of the model as it is, when the last removal already analysed it
    rate = config.step_rate if goal is None else None  # tolerance only: the rate controller's state (MAX_RATE)
    failures = 0  # rollbacks in a row
    pending: nn.Module | None = None  # before a removal that fell below the tolerance, while the next interval plays
    if env.resume is not None:
        progress = check_state(env.resume, "gate", settings,
                               {"used": float, "position": int, "history": list, "forced": int, "reached": bool},
                               "the resume file")
        try:
            if progress.get("pending") is not None:  # the model before the last plan, as the rollback would need it
                pending = copy.deepcopy(model)
                for plan in env.resume["plans"][:-1]:
                    apply_plan(pending, plan)
                pending.load_state_dict(progress["pending"])
            for plan in env.resume["plans"]:
                apply_plan(model, plan)
            model.load_state_dict(env.resume["model"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError):
            raise InputError("The saved gate-run state does not fit this model; run without --resume.") from None
        plans, history = list(env.resume["plans"]), list(progress["history"])
        used, position, forced = progress["used"], progress["position"], progress["forced"]
        reached, stop = progress["reached"], progress.get("stop")
        rate, failures = progress.get("rate", rate), progress.get("failures", 0)
        if progress.get("scorers") is not None:
            saved = {int(k): v for k, v in progress["scorers"].items()}
        if progress.get("unfolded") is not None:
            unfolded = {int(k): v.numpy() for k, v in progress["unfolded"].items()}

    def checkpoint() -> None:
        """The state after an interval (or before the final fine-tune): --resume continues from here."""
        if env.on_checkpoint is not None:
            scorers = None if saved is None else {str(k): v for k, v in saved.items()}
            env.on_checkpoint(make_state("gate", settings, model.state_dict(),
                                         {"used": used, "position": position, "history": history, "forced": forced,
                                          "reached": reached, "stop": stop, "scorers": scorers,
                                          "rate": rate, "failures": failures,
                                          "pending": None if pending is None else pending.state_dict(),
                                          "unfolded": None if unfolded is None else
                                          {str(k): torch.from_numpy(v) for k, v in unfolded.items()}},
                                         plans=plans))

    def roll_back(entry: dict, back: nn.Module) -> None:
        """A removal below the tolerance for good: back to the network before it (`back`, scores folded), the
        scorers start over. With a ratio the run stops there; with only a tolerance the next step is smaller."""
        nonlocal model, saved, unfolded, analysed, stop, rate, failures
        model, saved, unfolded, analysed = back, None, None, None
        failures += 1
        if rate is not None:
            rate *= SHRINK
        if rate is None or rate < MIN_RATE or failures >= MAX_FAILURES:
            stop = "tolerance"
        history.append({**entry, "action": "rolled back", **({"rate": rate} if rate is not None else {})})
        checkpoint()

    def drop_pending() -> nn.Module:
        """Give up the removal that is recovering: its plan and forced count go; returns the network before it."""
        nonlocal pending, forced
        back, pending = pending, None
        forced -= next(h["forced"] for h in reversed(history) if h["action"] == RECOVERING)
        plans.pop()
        return back

    while stop is None and not reached and interval > 0 and used + interval <= gate_budget + 1e-9:
        final = used + 2 * interval > gate_budget + 1e-9  # the last gating interval: the goal must be met now
        model.cpu().eval()
        # what this interval must reach at least (the schedule's share of the ratio, or the rate's share of the
        # current size; None: the threshold decides, or an interval spent recovering removes nothing)
        if pending is not None:
            due = None
        elif goal is not None:
            due = goal if final else \
                interval_goal(before[config.target], goal, len(history) + 1, intervals, config.schedule)
        else:
            due = (1 - rate) * count_sizes(model, example)[config.target]
        if analysed is None:
            analysed = analyze_groups(model, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
        (graph, index), analysed = analysed, None
        # (before the gates are attached: the plan prunes a copy of the plain model)
        # the target pull's shares: of the ratio left, or with only a tolerance of this interval's step
        keep = keep_shares(model, example, config, graph, index, goal if goal is not None else due,
                           env.leaf_modules)
        gates = Gates(model, graph, index, config, seed=config.seed * 1_000_003 + len(history), carried=saved)
        if not gates.sizes:
            gates.detach()
            stop = "no group can carry a gate"
            break
        # an interval spent recovering trains without the sparsity pull (Play-and-Prune's "play" drops its penalty
        # too): with the zero pull, ResNet-56's mean score fell from 0.89 to 0.48 in one such interval
        training = GateTraining(gates, config if pending is None else replace(config, sparsity_weight=0.0), keep)
        result = fit(model.to(device), data, env.train.with_(epochs=interval, seed=env.train.seed + len(history)),
                     device=device, ctx=ctx, teacher=teacher, description="gate", position=position,
                     callbacks=[training])
        used += result.epochs
        position += result.steps
        means, ranks = training.means(ctx, device)
        saved = gates.state()
        gates.detach()
        model.cpu().eval()
        if pending is not None:  # the interval after a removal below the tolerance: has the network recovered?
            live = Gates(model, graph, index, config, carried=saved)
            try:
                accuracy = step_accuracy(model, data, device, ctx)
            finally:
                live.detach()
            entry = {"step": len(history) + 1, "epochs_used": round(used, 4), "removed": 0, "forced": 0,
                     "mean_score": float(np.mean(np.concatenate(list(means.values())))), "val_accuracy": accuracy}
            if accuracy < floor:
                roll_back(entry, drop_pending())
                continue
            pending, unfolded, failures = None, means, 0
            if rate is not None:
                rate = min(rate * SHRINK, MAX_RATE)
            history.append({**entry, "action": "recovered", **({"rate": rate} if rate is not None else {})})
            if goal is not None and count_sizes(model, example)[config.target] <= goal * (1 + 1e-9):
                reached, stop = True, "ratio"
            elif rate is not None and rate < MIN_RATE:
                stop = "tolerance"
            checkpoint()
            continue
        macs = count_macs(model, example)
        cost = build_cost_model(model, graph, index, macs.by_module, macs.total)
        # with only a tolerance the rate sizes the whole removal: the threshold stops at the interval's step too
        removed = choose(index, ranks, cost, goal if goal is not None else due, which, config.threshold,
                         config.max_fraction)
        extra = 0
        if due is not None:  # the schedule's share not met by the threshold: planner's widths, lowest score x L1
            everything = forced_choice(model, example, config, graph, index, ranks, removed, due,
                                       env.leaf_modules, cost)
            extra = int(everything.sum() - removed.sum())
            removed = everything
        entry = {"step": len(history) + 1, "epochs_used": round(used, 4), "removed": int(removed.sum()),
                 "forced": extra, "mean_score": float(np.mean(np.concatenate(list(means.values()))))}
        if not removed.any():
            history.append({**entry, "action": "none below the threshold"})
            unfolded = means  # folded if the loop ends here; the next interval's gates start from these scorers
            checkpoint()
            continue
        kept_before = copy.deepcopy(model)  # as trained, scores not folded: what a rollback returns to (folded)

        def folded_before() -> nn.Module:
            """A copy of the network before this removal with its scores folded in (`graph` belongs to `model`,
            which the removal changes: the copy is analysed again, to the same groups)."""
            out = copy.deepcopy(kept_before)
            fold(out, *analyze_groups(out, example, exclude=config.exclude, leaf_modules=env.leaf_modules), means)
            return out

        plan = make_plan(graph, index, index.roots[removed])
        apply_plan(model, plan)
        check_pruned(model, example, expected, leaf_modules=env.leaf_modules)
        new_graph, new_index = analyze_groups(model, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
        new_sizes, new_probes = gate_members(new_graph, new_index)
        traced = links(gates.members, plan, new_sizes, new_probes)
        if set(traced) == set(new_sizes):
            # every survivor keeps its scorer: the gates stay on, nothing is folded until the gating ends
            saved = carry(saved, traced)
            unfolded = {g: means[old][idx.numpy()] for g, (old, idx) in traced.items()}
            analysed = (new_graph, new_index)
        else:  # a group would start over: fold every score in (its scale would be lost otherwise), fresh scorers
            model = folded_before()
            apply_plan(model, plan)
            saved, unfolded = None, None
        # the removed channels' (scaled) outputs are gone from every later layer's input: re-estimate BatchNorm
        # statistics, with the gates on as training goes on with them, before the tolerance check measures the
        # model and before training continues
        sizes = count_sizes(model, example)
        live = Gates(model, new_graph, new_index, config, carried=saved) if saved is not None else None
        try:
            recalibrate(model, data, env)
            accuracy = step_accuracy(model, data, device, ctx) if floor is not None else None
        finally:
            if live is not None:
                live.detach()
        entry.update(sizes)
        if floor is not None:
            entry["val_accuracy"] = accuracy
            if accuracy < floor and used + interval <= gate_budget + 1e-9:  # an interval left to recover in
                pending = folded_before()
                forced += extra
                plans.append(plan)
                history.append({**entry, "action": RECOVERING})
                checkpoint()
                continue
            if accuracy < floor:  # and no interval left: keep the model before it
                roll_back(entry, folded_before())
                continue
            failures = 0
            if rate is not None:  # Play-and-Prune: larger steps while there is headroom
                rate = min(rate * (1 + GAIN * min((accuracy - floor) / config.tolerance, 1.0)), MAX_RATE)
                entry["rate"] = rate
        forced += extra
        plans.append(plan)
        history.append({**entry, "action": "pruned"})
        if goal is not None and sizes[config.target] <= goal * (1 + 1e-9):
            reached = True
            stop = "ratio"
        checkpoint()
    if pending is not None:  # (the loop leaves an interval for recovery; only a break ends it here): undo it
        model, unfolded = drop_pending(), None
        history.append({"step": len(history) + 1, "epochs_used": round(used, 4), "removed": 0, "forced": 0,
                        "action": "rolled back"})
    if stop is None:
        stop = "budget"
    if unfolded is not None:  # the last interval removed nothing: its scores still shape what the network learned
        model.cpu().eval()
        graph, index = analyze_groups(model, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
        fold(model, graph, index, unfolded)
    if goal is not None and not reached:
        reached = count_sizes(model, example)[config.target] <= goal * 1.05
    rest = budget - used
    if rest > 1e-9:
        used += fit(model.to(device), data, env.train.with_(epochs=rest), device=device, ctx=ctx, teacher=teacher,
                    description="fine-tune", position=position).epochs
    model.cpu().eval()
    after = {**count_sizes(model, example), **_evaluate(model, env)}
    met = (goal is None or reached) and (floor is None or after.get("accuracy", 0.0) >= floor) and bool(plans)
    return MethodResult(
        model=model, plans=plans, method="gate", criterion="gate", target_met=bool(met),
        before={**before, **base}, after=after,
        requested={"ratio": config.ratio, "tolerance": config.tolerance}, history=history, epochs_used=used,
        details={"gate": {"sparsity_weight": config.sparsity_weight, "binary_weight": config.binary_weight,
                          "pull": config.pull, "rank": config.rank, "schedule": config.schedule,
                          "threshold": config.threshold, "prune_every": every,
                          "forced_channels": forced, "stopped_by": stop}})
