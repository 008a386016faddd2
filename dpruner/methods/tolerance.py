"""Pruning to an accuracy tolerance: the Play-and-Prune controller (Singh et al., IJCAI'19), on dpruner's engine.

The user gives the accuracy they can lose, not a pruning level. State: the pruning rate r (which sets the
threshold W on normalised criterion scores: W is the r-quantile of the current model's scores, each divided by its
group's mean so layers compare) and the last model that met the tolerance. Each step (Adaptive Filter Pruning):
  1. score the current model; U = channels whose normalised score is below W (global allocation, with a cap per
     group so no layer vanishes);
  2. fine-tune `step_epochs` on the task loss (+ distillation) + sum over U of lambda * |theta|, an L1 penalty on
     every parameter computing a U channel (filter rows, bias, and the norm's gamma/beta: BatchNorm would undo a
     shrink of the filter alone), so capacity moves out of U before it goes. lambda is set per tensor so that the
     penalty alone would move U's weights by `penalty` times their mean magnitude over the step (SGD with
     momentum mu moves a weight by about lr * lambda / (1 - mu) per step): a raw lambda would depend on the
     layer's scale and on the step's length. The task loss pushes back, so the default is 5 (on the digits
     ResNet, accuracy right after removing the first step's channels: 75% without the term, 85% at 1, 98% at 5);

  3. remove U physically and measure validation accuracy A_t.
A data criterion (taylor, activation) is rescored on fresh batches at every step and smoothed across steps with
`score_momentum` (Molchanov et al. 2019 average Taylor scores with momentum between pruning steps): a surviving
channel's score is m * previous + (1 - m) * new, so one noisy set of batches does not decide alone. Weight
criteria read the current weights, which carry their history already, and are not smoothed.
Pruning Rate Controller: margin m = A_t - (A_orig - tolerance), in accuracy points.
  - m >= 0: accept (this is the new last good model) and raise the rate in proportion to the headroom:
    r <- r * (1 + gain * m / tolerance), m / tolerance capped at 1 -- larger steps while there is room, at most
    1.5x per step and never above `max_rate` (0.3): on the CIFAR ResNet-56 an earlier setting (growth up to 2x,
    rate up to 0.5) jumped from 1.6x to 4.8x MACs in one step, lost 24 points, and spent the budget recovering;
  - m < 0: "play": fine-tune without the penalty, `step_epochs` at a time, up to `recover_epochs`, until m >= 0
    (accept, and r <- r * shrink: smaller steps near the edge); if it does not recover, roll back to the last good
    model and r <- r * shrink.
Stop when the rate falls below `min_step`, after `max_failures` failed steps in a row, when `max_ratio` is
reached, or when the budget (minus the final fine-tune) is spent. Then fine-tune the
last good model for the rest of the budget; if that ends below the tolerance (rare), the pre-fine-tune weights are
kept, so the result always meets the tolerance on the validation split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from dpruner.errors import DprunerError, InputError
from dpruner.graph.check import check_pruned, expected_outputs
from dpruner.graph.summary import analyze_groups, nothing_prunable
from dpruner.methods.api import score_groups
from dpruner.methods.cost import build_cost_model
from dpruner.methods.oneshot import Allocation, normalized, search, select
from dpruner.metrics.macs import count_macs, count_sizes, run_forward
from dpruner.surgery.plan import apply_plan, make_plan
from dpruner.criteria import get_criterion
from dpruner.criteria.views import channel_parameters
from dpruner.train.state import check_state, make_state
from dpruner.train.config import TrainConfig
from dpruner.train.distributed import DistContext
from dpruner.train.evaluate import evaluate
from dpruner.train.loop import fit


@dataclass(frozen=True)
class ToleranceConfig:
    """Knobs of the controller; see the module docstring for what each does."""

    tolerance: float  # accuracy points as a fraction: 0.01 = at most 1 point of top-1 lost on validation
    budget_epochs: float = 10.0  # all fine-tuning, steps + recovery + final
    step_epochs: float = 1.0
    final_epochs: float | None = None  # default: 30% of the budget (at least one step's worth)
    recover_epochs: float | None = None  # default: 2 steps' worth
    initial_rate: float = 0.1  # share of prunable channels the first step removes
    max_rate: float = 0.3  # no step removes more than this share
    gain: float = 0.5
    shrink: float = 0.5
    min_step: float = 0.01  # stop when the rate falls below this share of the prunable channels
    max_failures: int = 3
    max_ratio: float | None = None  # cap on the MACs ratio
    max_latency: float | None = None  # cap: stop once the measured latency is at most this share of the original's
    latency: object | None = None  # with max_latency: a runtime.latency.LatencySpec (runtime, batch, threads)
    penalty: float = 5.0  # strength of the L1 term on U, relative (module docstring; 5 measured in docs/benchmarks.md)
    criterion: str = "l1"  # the channel criterion (dpruner.criteria) ranking channels at every step
    score_momentum: float = 0.5  # data criteria: weight of the previous steps' scores (module docstring)
    max_fraction: float = 0.9
    round_to: int = 1
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        from dpruner import validate

        if not 0 < self.tolerance < 1:  # also false for NaN
            raise InputError(f"--tolerance must lie between 0% and 100% (exclusive), got {100 * self.tolerance:g}%.")
        validate.epochs(self.budget_epochs, "--budget-epochs")
        validate.epochs(self.step_epochs, "--step-epochs")
        if self.max_ratio is not None:
            validate.number(self.max_ratio, "--max-ratio", low=1, low_open=True)
        if self.max_latency is not None:
            validate.number(self.max_latency, "--max-latency", low=0, low_open=True, high=1, high_open=True)
        validate.number(self.penalty, "--penalty", low=0, high=1e6)
        validate.number(self.max_fraction, "--max-fraction", low=0, low_open=True, high=1, high_open=True)
        validate.number(self.score_momentum, "--score-momentum", low=0, high=1, high_open=True)
        for name in ("initial_rate", "max_rate", "min_step", "gain", "shrink"):
            validate.number(getattr(self, name), name, low=0, low_open=True, high=1e3)
        if self.budget_epochs < self.step_epochs + self.final:
            raise InputError(f"--budget-epochs {self.budget_epochs:g} leaves no room for a pruning step: it must "
                             f"cover one step ({self.step_epochs:g}) plus the final fine-tune ({self.final:g}).")

    @property
    def final(self) -> float:
        return self.final_epochs if self.final_epochs is not None else max(self.step_epochs, 0.3 * self.budget_epochs)

    @property
    def recover(self) -> float:
        return self.recover_epochs if self.recover_epochs is not None else 2 * self.step_epochs


@dataclass
class ToleranceResult:
    model: nn.Module  # the last model that met the tolerance, fine-tuned
    plans: list[dict]  # one plan per accepted step, replayable on the original architecture
    met: bool  # False when not even the first step met the tolerance (model is then the original)
    before: dict  # params, macs, accuracy (validation) [, test_accuracy]
    after: dict
    history: list[dict] = field(default_factory=list)
    epochs_used: float = 0.0

    @property
    def ratio(self) -> dict:
        return {k: self.before[k] / max(self.after[k], 1) for k in ("params", "macs")}


def parse_tolerance(text: str | float) -> float:
    """'1%' -> 0.01 and '0.01' -> 0.01 (a bare number >= 1 is read as percent points: '1' -> 0.01)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        cleaned = text.strip()
        percent = cleaned.endswith("%")
        try:
            value = float(cleaned.rstrip("%").strip())
        except ValueError:
            raise InputError(f"--tolerance must look like 1% or 0.01, got '{text}'.") from None
        if percent or value >= 1:
            value /= 100
    if not 0 < value < 1:
        raise InputError(f"--tolerance must lie strictly between 0% and 100%, got '{text}'.")
    return value


def _penalty(params: list[tuple[torch.Tensor, int, torch.Tensor]], strength: float, train: TrainConfig,
             steps: int) -> Callable | None:
    """sum_t lambda_t * |theta_t[U]|_1 with lambda_t = strength * mean|theta_t[U]| * (1 - mu) / (mean lr * steps);
    the cosine schedule's mean LR is half the peak."""
    if not params or strength <= 0:
        return None
    mean_lr = 0.5 * train.lr
    scale = strength * (1 - train.momentum) / (mean_lr * max(steps, 1))
    weights = [scale * float(p.detach().index_select(dim, idx).abs().mean()) for p, dim, idx in params]

    def term(_model) -> torch.Tensor:
        return sum(w * p.index_select(dim, idx.to(p.device)).abs().sum() for w, (p, dim, idx) in zip(weights, params))
    return term


def prune_to_tolerance(model: nn.Module, example: torch.Tensor, data, config: ToleranceConfig,
                       train: TrainConfig, *, device: torch.device | str = "cpu", ctx: DistContext = DistContext(),
                       distill: bool = True, leaf_modules: Iterable[type] = (),
                       on_step: Callable[[dict], None] | None = None,
                       measure: Callable[[nn.Module], float] | None = None,
                       on_checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
                       log: Callable[[str], None] = lambda message: None) -> ToleranceResult:
    """Run the controller on `model` (not modified: it is copied) and return the smallest model found that stays
    within `config.tolerance` of its validation accuracy. `on_step(entry)` sees every history entry; `measure`
    replaces the accuracy measurement (default: top-1 on data.val, summed over torchrun ranks).

    `on_checkpoint(state)` receives a resumable state (plain data + the last good model's state_dict) whenever
    the last good model or the rate changes; `resume=state` continues from it (an interrupted step is redone)."""
    device = torch.device(device)
    if measure is None:
        def measure(m: nn.Module) -> float:
            return evaluate(m.to(device), data.val, device, ctx=ctx).accuracy

    example = example.to("cpu")
    original = copy.deepcopy(model).cpu().eval()
    teacher = copy.deepcopy(original).to(device).eval() if distill else None
    for p in teacher.parameters() if teacher is not None else ():
        p.requires_grad_(False)
    base = count_sizes(original, example)
    run_forward(original, example)
    expected = None  # the original's outputs (and its traced blocks'), taken once the first graph names the blocks
    base_acc = measure(original.to(device))
    original.cpu()
    floor = base_acc - config.tolerance
    before = {**base, "accuracy": base_acc}
    table = None
    if config.max_latency is not None:
        # one latency table for the original: the layers keep their names as they shrink, so it prices every
        # later step's widths too (interpolated inside the original grid)
        from dpruner.methods.api import LATENCY_NOISE
        from dpruner.runtime.latency import LatencySpec, build_latency_table

        spec = config.latency or LatencySpec()
        base["latency"] = spec.measure(original, tuple(example.shape))
        before["latency"] = base["latency"]
        names = [n for n, m in original.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        table = build_latency_table(original, example, names, spec, full_ms=base["latency"], log=log)
        latency_goal = base["latency"] * config.max_latency
    alloc = Allocation("global", config.max_fraction, config.round_to)
    history: list[dict] = []
    used = 0.0
    step_no = 0

    def record(entry: dict) -> None:
        entry = {"step": step_no, "epochs_used": round(used, 4), **entry}
        history.append(entry)
        if on_step is not None:
            on_step(entry)
        log(_describe(entry))

    good_model, good_plans, good_acc = copy.deepcopy(original), [], base_acc
    rate = config.initial_rate
    failures = 0
    stopped: str | None = None  # why the pruning loop stopped early (kept in the resume state)
    smooth = config.score_momentum > 0 and get_criterion(config.criterion).needs_data
    memory: dict[str, np.ndarray] = {}  # smoothed scores of the last good model's channels, by group (smooth only)
    batches = len(data.train)
    if batches == 0:
        from dpruner.data.spec import DataError

        raise DataError("The training split is empty (a loader with drop_last and fewer items than a batch?).")
    step_epochs = max(1, round(config.step_epochs * batches)) / batches  # what fit will really train
    identity = {"data": getattr(data, "name", None), "params": base["params"], "macs": base["macs"],
                "world_size": ctx.world_size, "distill": distill}
    if resume is None:
        record({"action": "start", "val_accuracy": base_acc, "floor": floor, **base,
                "ratio_macs": 1.0, "ratio_params": 1.0})
    else:
        progress = check_state(resume, "tolerance", _config_json(config, train, identity),
                               {"good_acc": float, "rate": float, "failures": int, "used": float, "step": int,
                                "history": list, "position": int}, "the resume file")
        try:
            for plan in resume["plans"]:
                apply_plan(good_model, plan)
            good_model.load_state_dict(resume["model"])
        except (DprunerError, RuntimeError, KeyError, ValueError, TypeError, IndexError):
            raise InputError("The saved tolerance-run state does not fit this model; run without --resume.") from None
        good_plans, good_acc = list(resume["plans"]), progress["good_acc"]
        rate, failures, used, step_no = progress["rate"], progress["failures"], progress["used"], progress["step"]
        stopped = progress.get("stopped")
        history.extend(progress["history"])
        memory = {k: v.numpy() for k, v in progress.get("scores", {}).items()}
        record({"action": "resume", "val_accuracy": good_acc, "rate": rate})

    position = progress["position"] if resume is not None else 0  # training batches consumed so far

    def train_for(net: nn.Module, epochs: float, seed: int, term, description: str) -> float:
        """Fine-tune and continue the data stream where the previous fine-tune stopped."""
        nonlocal position
        result = fit(net, data, train.with_(epochs=epochs, seed=seed), device=device, ctx=ctx, teacher=teacher,
                     penalty=term, description=description, position=position)
        position += result.steps
        return result.epochs

    def checkpoint() -> None:
        if on_checkpoint is not None:
            on_checkpoint(make_state("tolerance", _config_json(config, train, identity), good_model.state_dict(),
                                     {"stopped": stopped, "good_acc": good_acc, "rate": rate, "failures": failures,
                                      "used": used, "step": step_no, "history": history, "position": position,
                                      "scores": {k: torch.from_numpy(v) for k, v in memory.items()}},
                                     plans=good_plans))

    current = copy.deepcopy(good_model)
    loop_budget = config.budget_epochs - config.final
    while used + step_epochs <= loop_budget + 1e-9 and failures < config.max_failures and stopped is None:
        step_no += 1
        current.cpu().eval()
        graph, index = analyze_groups(current, example, exclude=config.exclude, leaf_modules=leaf_modules)
        scores = score_groups(current, graph, index, config.criterion, data=data.train, device=device, ctx=ctx)
        if smooth:
            scores = smooth_scores(scores, index, memory, config.score_momentum)
        n_prunable = sum(len(g) for g in index.groups if g.prunable)
        if (not scores or n_prunable == 0) and not good_plans and step_no == 1:
            raise nothing_prunable(index)
        if not scores or n_prunable == 0:
            stopped = "nothing left to prune"
            record({"action": "stop", "reason": stopped})
            checkpoint()
            break
        if rate < config.min_step:
            stopped = f"the pruning rate fell to {100 * rate:.2f}% (< --min-step)"
            record({"action": "stop", "reason": stopped})
            checkpoint()
            break
        flat = np.concatenate([normalized(s) for s in scores.values()])
        threshold = float(np.quantile(flat, min(rate, config.max_rate)))
        removed = select(index, scores, alloc, threshold)
        capped = False
        if config.max_ratio is not None or table is not None:
            macs = count_macs(current, example)
            cost = build_cost_model(current, graph, index, macs.by_module, macs.total)
            cost.latency = table
        if config.max_ratio is not None:
            goal = base["macs"] / config.max_ratio
            if cost.estimate(removed)[0] < goal:
                removed, _ = search(index, scores, alloc, cost, target="macs", goal=goal)
                capped = True
        if table is not None and cost.estimate(removed)[2] < latency_goal:
            removed, _ = search(index, scores, alloc, cost, target="latency", goal=latency_goal)
            capped = "latency"
        share = float(removed.sum()) / n_prunable
        if not removed.any():
            stopped = "every group is at its --max-fraction cap"
            record({"action": "stop", "reason": stopped})
            checkpoint()
            break
        if smooth:
            survivors, memory = carry_scores(scores, index, removed), carry_scores(scores, index, None)
        # AFP: fine-tune with the L1 penalty on exactly the channels about to go, then remove them.
        steps = max(1, round(config.step_epochs * len(data.train)))
        term = _penalty(channel_parameters(current, graph, index, removed), config.penalty, train, steps)
        current.to(device)
        used += train_for(current, config.step_epochs, train.seed + step_no, term,
                          f"step {step_no}: fine-tune with penalty")
        current.cpu().eval()
        plan = make_plan(graph, index, index.roots[removed])
        apply_plan(current, plan)
        if expected is None:
            expected = expected_outputs(original, example, graph.scopes)
        check_pruned(current, example, expected, leaf_modules=leaf_modules)
        sizes = count_sizes(current, example)
        if table is not None:
            sizes["latency"] = spec.measure(current.cpu(), tuple(example.shape))
            capped = capped or ("latency" if sizes["latency"] <= latency_goal * (1 + LATENCY_NOISE) else False)
        acc = measure(current.to(device))
        margin = acc - floor
        entry = {"rate": rate, "threshold": threshold, "removed_channels": int(removed.sum()), "removed_share": share, **sizes,
                 "ratio_macs": base["macs"] / sizes["macs"], "ratio_params": base["params"] / sizes["params"],
                 **({"ratio_latency": base["latency"] / sizes["latency"]} if "latency" in sizes else {}),
                 "val_accuracy": acc, "margin": margin}
        recovered = False
        if margin < 0:
            record({"action": "prune", "accepted": False, **entry})
            spent = 0.0
            while margin < 0 and spent + step_epochs <= config.recover + 1e-9 \
                    and used + step_epochs <= loop_budget + 1e-9:
                done = train_for(current, config.step_epochs, train.seed + 1000 + step_no, None,
                                 f"step {step_no}: recover")
                spent += done
                used += done
                acc = measure(current)
                margin = acc - floor
                entry = {**entry, "val_accuracy": acc, "margin": margin}
                record({"action": "recover", "accepted": margin >= 0, **entry})
            recovered = margin >= 0
        if margin >= 0:
            if not recovered:
                record({"action": "prune", "accepted": True, **entry})
            good_model, good_plans, good_acc = copy.deepcopy(current).cpu(), [*good_plans, plan], acc
            if smooth:
                memory = survivors
            failures = 0
            rate = min(rate * (config.shrink if recovered else 1 + config.gain * min(margin / config.tolerance, 1.0)),
                       config.max_rate)
            checkpoint()
            if capped:
                stopped = (f"--max-latency {config.max_latency:g}x reached (measured)" if capped == "latency"
                           else f"--max-ratio {config.max_ratio:g} reached")
                record({"action": "stop", "reason": stopped})
                checkpoint()
                break
        else:
            failures += 1
            current = copy.deepcopy(good_model)
            rate *= config.shrink
            record({"action": "rollback", "rate": rate, "val_accuracy": good_acc,
                    "reason": "tolerance exceeded; back to the last good model with a smaller step"})
            checkpoint()
    else:
        if stopped is None:
            record({"action": "stop", "reason": "budget spent" if failures < config.max_failures
                    else f"{config.max_failures} failed steps in a row"})

    met = bool(good_plans)
    final_model = good_model.to(device)
    if met:
        batches = len(data.train)  # whole batches only, rounded down: the budget is a hard cap
        remaining = math.floor(max(config.budget_epochs - used, 0.0) * batches + 1e-9) / batches
        if remaining > 0:
            snapshot = copy.deepcopy(final_model.state_dict())
            used += train_for(final_model, remaining, train.seed + 2000, None, "final fine-tune")
            acc = measure(final_model)
            kept = acc >= floor
            if not kept:
                final_model.load_state_dict(snapshot)
                acc = good_acc
            good_acc = acc
            record({"action": "final", "accepted": kept, "val_accuracy": acc, "margin": acc - floor,
                    "epochs": remaining})
    final_model.cpu().eval()
    after = {**count_sizes(final_model, example), "accuracy": good_acc}
    if table is not None:
        after["latency"] = spec.measure(final_model, tuple(example.shape))
    return ToleranceResult(final_model, good_plans, met, before, after, history, used)


def _group_key(group) -> str:
    """A group's name that survives pruning and re-tracing: its slots (module, role, part), sorted."""
    return ";".join(sorted(map(repr, group.slots)))


def smooth_scores(scores: dict[int, np.ndarray], index, memory: dict[str, np.ndarray],
                  momentum: float) -> dict[int, np.ndarray]:
    """Each group's fresh scores averaged with its remembered ones: momentum * old + (1 - momentum) * new. A group
    with no memory (the first step, or a shape the memory does not fit) keeps its fresh scores."""
    out = {}
    for group in index.groups:
        if group.id in scores:
            new, old = scores[group.id], memory.get(_group_key(group))
            out[group.id] = new if old is None or old.shape != new.shape else momentum * old + (1 - momentum) * new
    return out


def carry_scores(scores: dict[int, np.ndarray], index, removed: np.ndarray | None) -> dict[str, np.ndarray]:
    """The scores of the channels that survive `removed` (a mask over index.roots; None: all survive), keyed by
    group name, in the order the pruned model's groups number them (kept channels keep their relative order)."""
    out = {}
    for group in index.groups:
        if group.id in scores:
            kept = np.ones(len(group.channels), bool) if removed is None \
                else ~removed[np.searchsorted(index.roots, group.channels)]
            out[_group_key(group)] = scores[group.id][kept]
    return out


def _config_json(config: ToleranceConfig, train: TrainConfig, identity: dict) -> dict:
    """What must match for a saved state to continue a run: the options that change results (not --quiet or
    --device), the data set, the input model's size, the process count and distillation."""
    from dataclasses import asdict

    controller = asdict(config)
    controller["exclude"] = list(controller["exclude"])
    if hasattr(config, "latency"):  # gate and spp share this function with configs that have no latency cap
        spec = config.latency
        controller["latency"] = None if spec is None else {"runtime": spec.runtime, "batch": spec.batch,
                                                           "threads": spec.resolved_threads()}
    training = {k: v for k, v in train.to_json().items() if k not in ("quiet", "device")}
    return {"controller": controller, "train": training, "identity": identity}


def _describe(entry: dict) -> str:
    action = entry["action"]
    if action in ("start", "prune", "recover", "final", "resume"):
        parts = [f"step {entry['step']} {action}"]
        if "ratio_macs" in entry:
            parts.append(f"MACs {entry['ratio_macs']:.2f}x params {entry['ratio_params']:.2f}x")
        parts.append(f"val {100 * entry['val_accuracy']:.2f}%")
        if "accepted" in entry:
            parts.append("ok" if entry["accepted"] else "over tolerance")
        parts.append(f"epochs {entry['epochs_used']:.2f}")
        return "  ".join(parts)
    return f"step {entry['step']} {action}: {entry.get('reason', '')}"


def to_json_history(history: list[dict]) -> list[dict]:
    """History entries as plain JSON (floats rounded for reading)."""
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in e.items()} for e in history]

