"""Coarse pruning with least-adversarial masks (Anwar and Sung, arXiv 1610.09639; seed 002), feature-map
granularity: group by group from the input to the output, draw `candidates` random masks that remove the group's
planned number of channels (on top of the masks already fixed), measure each on a held-out evaluation subset, and
keep the least adversarial one (lowest error; lower loss breaks ties). Then the masked channels are removed
physically (a dense, smaller model), BatchNorm statistics recalibrated, and the model retrained once.

[reading] choices (documented in docs/pruning.md): how many channels each group loses comes from dpruner's
planner (criterion + allocation at the --ratio, as for SPP); candidates are scored on `eval_batches` batches of the
validation split, decoded once and kept in memory (the evaluation reuses those cached inputs; every candidate runs
the whole network on them, which works for any graph, rather than caching each layer's input); a masked channel is
zeroed in every member of its group (filters, biases and the norms' affine), so a candidate shows exactly what its
removal would do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpruner.errors import InputError


@dataclass(frozen=True)
class CoarseConfig:
    """Settings of `--method coarse`: the goal and how each group's share is planned (as one-shot), the number of
    random candidates per group and the evaluation subset they are judged on."""

    ratio: float
    target: str = "macs"
    criterion: str = "l1"
    allocation: str = "uniform"
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    max_fraction: float = 0.9
    seed: int = 0
    candidates: int = 20
    eval_batches: int = 8

    def __post_init__(self):
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise InputError(f"--candidates must be a whole number >= 1, got {self.candidates}.")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 1:
            raise InputError(f"--eval-batches must be a whole number >= 1, got {self.eval_batches}.")


def group_order(model: nn.Module, graph, index) -> list:
    """Prunable groups from the input to the output: by the first position of any of their producing layers in
    the model's module order."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def first(group) -> int:
        return min((position.get(k[0], len(position)) for k in group.slots if graph.slots[k].role == "out"),
                   default=len(position))

    return sorted((g for g in index.groups if g.prunable), key=lambda g: (first(g), g.id))


@torch.no_grad()
def error_and_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], ctx=None,
                   device: torch.device | str = "cpu") -> tuple[float, float]:
    """Top-1 error and mean cross-entropy of `model` (eval mode) on in-memory batches, summed over torchrun ranks
    (each holds its own share of the evaluation subset), so every rank keeps the same candidate."""
    wrong, loss, n = 0.0, 0.0, 0.0
    for x, y in batches:
        out = model(x.to(device)).float()
        y = y.to(device)
        wrong += float((out.argmax(1) != y).sum())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        n += len(y)
    if ctx is not None and ctx.enabled:
        from dpruner.train.distributed import sum_across

        wrong, loss, n = sum_across([wrong, loss, n], ctx, device)
    return wrong / max(n, 1.0), loss / max(n, 1.0)


class Masking:
    """Zero a set of channels (every member of their groups) and put them back: trying a candidate mask."""

    def __init__(self, model, graph, index):
        self.model, self.graph, self.index = model, graph, index
        self.saved: list = []

    def apply(self, flags: np.ndarray) -> None:
        from dpruner.criteria.views import channel_parameters

        self.saved = []
        with torch.no_grad():
            for tensor, dim, idx in channel_parameters(self.model, self.graph, self.index, flags):
                self.saved.append((tensor, dim, idx, tensor.index_select(dim, idx).clone()))
                tensor.index_fill_(dim, idx, 0.0)

    def undo(self) -> None:
        with torch.no_grad():
            for tensor, dim, idx, values in self.saved:
                tensor.index_copy_(dim, idx, values)
        self.saved = []


def least_adversarial(model, graph, index, group, n_remove: int, fixed: np.ndarray, batches, candidates: int,
                      generator: torch.Generator, ctx=None, device="cpu") -> tuple[np.ndarray, list[dict]]:
    """The least adversarial of `candidates` random masks removing `n_remove` of `group`'s channels on top of
    `fixed` (flags per dense class): (its flags, every candidate's error and loss)."""
    masking = Masking(model, graph, index)
    positions = np.searchsorted(index.roots, np.asarray(group.channels))
    best, best_key, tried = None, None, []
    for _ in range(candidates):
        chosen = torch.randperm(len(positions), generator=generator)[:n_remove].numpy()
        flags = fixed.copy()
        flags[positions[chosen]] = True
        masking.apply(flags)
        error, loss = error_and_loss(model, batches, ctx, device)
        masking.undo()
        tried.append({"error": error, "loss": loss})
        if best_key is None or (error, loss) < best_key:
            best, best_key = flags, (error, loss)
    return best, tried


def run_coarse(model: nn.Module, example: torch.Tensor, config: CoarseConfig, env) -> "MethodResult":
    """Plan each group's share, choose its mask as the least adversarial of N random ones (input to output), remove,
    recalibrate BatchNorm, retrain for the budget."""
    from dpruner.graph.check import check_pruned, expected_outputs
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.run import MethodResult, _evaluate
    from dpruner.methods.spp import plan_goals
    from dpruner.metrics.macs import count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan
    from dpruner.train.evaluate import _batches, recalibrate_bn
    from dpruner.train.loop import fit

    if env.data is None:
        raise InputError("--method coarse judges candidate masks on held-out data: give --data.")
    data = env.data
    base = _evaluate(model, env)
    work = copy.deepcopy(model).cpu().eval()
    before = count_sizes(work, example)
    graph, index = analyze_groups(work, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
    expected = expected_outputs(work, example, graph.scopes)
    goals, planned_met = plan_goals(work, example, config, index, env.leaf_modules)
    batches = [(x.cpu(), y.cpu()) for _, (x, y) in zip(range(config.eval_batches), _batches(data.val, "val"))]
    generator = torch.Generator().manual_seed(config.seed)  # the same draws on every rank
    work.to(env.device)
    fixed = np.zeros(len(index.roots), dtype=bool)
    choices = []
    for group in group_order(work, graph, index):
        n_remove = goals.get(group.id, 0)
        if n_remove <= 0:
            continue
        fixed, tried = least_adversarial(work, graph, index, group, n_remove, fixed, batches, config.candidates,
                                         generator, env.ctx, env.device)
        errors = [t["error"] for t in tried]
        choices.append({"group": group.id, "layers": group.layers[:4], "removed": n_remove,
                        "best_error": min(errors), "median_error": float(np.median(errors)),
                        "worst_error": max(errors)})
    work.cpu()
    plan = make_plan(graph, index, index.roots[fixed])
    apply_plan(work, plan)
    check_pruned(work, example, expected, leaf_modules=env.leaf_modules)
    recalibrate_bn(work, data.train, batches=50)
    used = 0.0
    if env.train is not None:
        teacher = copy.deepcopy(model).to(env.device).eval() if env.distill else None
        used = fit(work.to(env.device), data, env.train, device=env.device, ctx=env.ctx, teacher=teacher,
                   description="retrain").epochs
    work.cpu().eval()
    after = {**count_sizes(work, example), **_evaluate(work, env)}
    return MethodResult(model=work, plans=[plan], method="coarse", criterion=config.criterion,
                        target_met=planned_met, before={**before, **base}, after=after,
                        requested={"ratio": config.ratio}, epochs_used=used,
                        details={"coarse": {"granularity": "feature-map", "candidates": config.candidates,
                                            "eval_samples": sum(len(y) for _, y in batches), "groups": choices}})
