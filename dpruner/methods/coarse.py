"""Coarse pruning with least-adversarial masks (Anwar and Sung, arXiv 1610.09639; seed 002), feature-map
granularity: group by group from the input to the output, draw `candidates` random masks that remove the group's
planned number of channels (on top of the masks already fixed), measure each on a held-out evaluation subset, and
keep the least adversarial one (lowest error; lower loss breaks ties). Then the masked channels are removed
physically (a dense, smaller model), BatchNorm statistics recalibrated, and the model retrained once.

[reading] choices (documented in docs/pruning.md): how many channels each group loses comes from dpruner's
planner (criterion + allocation at the --ratio, as for SPP); unless `criterion_candidate` is off, the criterion's
own choice (the group's lowest-scored channels) is the first of the N candidates, so the kept mask is never worse
on the evaluation subset than the criterion's (with 20 random candidates only, ResNet-56 at 2x tied random pruning
after fine-tuning; docs/benchmarks.md); candidates are scored on `eval_batches` batches of the
validation split, decoded once and kept in memory; per batch, the part of the network that runs before the masked
layers is computed once and replayed for every candidate (methods/prefix.py: the paper's cached layer inputs, found
from the modules' call order, so it works for any graph); a masked channel is
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
from dpruner.methods.prefix import Prefix
from dpruner.train.loop import Callback


@dataclass(frozen=True)
class CoarseConfig:
    """Settings of `--method coarse`: the goal and how each group's share is planned (as one-shot), the number of
    random candidates per group and the evaluation subset they are judged on."""

    ratio: float | None = None
    granularity: str = "feature-map"  # or "kernel": individual k x k kernels at `sparsity` per conv layer
    sparsity: float | None = None
    target: str = "macs"
    criterion: str = "l1"
    allocation: str = "uniform"
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    max_fraction: float = 0.9
    seed: int = 0
    candidates: int = 20
    eval_batches: int = 8
    criterion_candidate: bool = True  # feature-map: the criterion's own choice is one of the `candidates` masks
    bn_statistics: str = "batch"  # candidates judged with BatchNorm on each evaluation batch's statistics, or "running"
    cached_inputs: bool = True  # replay what runs before the masked layers once per batch (methods/prefix.py)

    def __post_init__(self):
        if self.granularity not in ("feature-map", "kernel"):
            raise InputError(f"--granularity must be feature-map or kernel, got '{self.granularity}'.")
        if self.granularity == "feature-map" and (self.ratio is None or self.sparsity is not None):
            raise InputError("--method coarse removes feature maps to a --ratio (kernel granularity takes "
                             "--sparsity).")
        if self.granularity == "kernel" and (self.sparsity is None or self.ratio is not None):
            raise InputError("--granularity kernel zeroes a share of every conv layer's kernels: give --sparsity "
                             "(e.g. 0.8), not --ratio.")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise InputError(f"--sparsity must lie strictly between 0 and 1, got {self.sparsity:g}.")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise InputError(f"--candidates must be a whole number >= 1, got {self.candidates}.")
        if self.bn_statistics not in ("batch", "running"):
            raise InputError(f"--bn-statistics must be batch or running, got '{self.bn_statistics}'.")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 1:
            raise InputError(f"--eval-batches must be a whole number >= 1, got {self.eval_batches}.")


def check_planner(config, method: str) -> None:
    """The widths of spp and coarse come from the weight-only planner: a data criterion or a pca / sensitivity
    allocation would need data it is not given, so they are refused up front."""
    from dpruner.criteria import get_criterion

    if get_criterion(config.criterion).needs_data:
        raise InputError(f"--method {method} plans its widths with a weight criterion (l1, l2, fpgm, bn, random); "
                         f"'{config.criterion}' needs data.")
    if config.allocation not in ("uniform", "global"):
        raise InputError(f"--method {method} takes --allocation uniform or global, not '{config.allocation}'.")


def group_order(model: nn.Module, graph, index) -> list:
    """Prunable groups from the input to the output: by the first position of any of their producing layers in
    the model's module order."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def first(group) -> int:
        return min((position.get(k[0], len(position)) for k in group.slots if graph.slots[k].role == "out"),
                   default=len(position))

    return sorted((g for g in index.groups if g.prunable), key=lambda g: (first(g), g.id))


class batch_statistics:
    """Within it, every BatchNorm normalises with the statistics of the batch in front of it (its running
    statistics are neither used nor updated): how a candidate would do after BatchNorm recalibration, which follows
    every removal. With the stale running statistics, removing channels shifts what later norms see, and the
    error measures that shift more than the mask (ResNet-56: the l1 mask of the first residual stream showed 99.8%
    error, a random one 32.5%; after recalibration and fine-tuning l1's masks are the better ones)."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
        self.saved: list = []

    def __enter__(self):
        self.saved = [(m.training, m.track_running_stats) for m in self.norms]
        for m in self.norms:
            m.training, m.track_running_stats = True, False
        return self

    def __exit__(self, *exc):
        for m, (training, track) in zip(self.norms, self.saved):
            m.training, m.track_running_stats = training, track
        return False


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
                idx = idx.to(tensor.device)
                self.saved.append((tensor, dim, idx, tensor.index_select(dim, idx).clone()))
                tensor.index_fill_(dim, idx, 0.0)

    def undo(self) -> None:
        with torch.no_grad():
            for tensor, dim, idx, values in self.saved:
                tensor.index_copy_(dim, idx, values)
        self.saved = []


def judge(model: nn.Module, batches, variants: list, apply, undo, changed: set[str], prefix=None, ctx=None,
          device="cpu", bn_batch: bool = False) -> list[tuple[float, float]]:
    """(top-1 error, mean cross-entropy) of each variant on the in-memory `batches`, summed over torchrun ranks
    (each holds its own share of the evaluation subset, so every rank keeps the same candidate). `apply(v)` /
    `undo()` put a variant into the model and take it out; with a `Prefix`, what runs before the `changed`
    modules is computed once per batch and replayed for every variant (the paper's cached layer inputs)."""
    totals = np.zeros((len(variants), 3))
    names = prefix.clean(changed) if prefix is not None else []
    with torch.no_grad(), batch_statistics(model, bn_batch):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            cache = {}
            for i, variant in enumerate(variants):
                apply(variant)
                try:
                    if cache:
                        with prefix.replay(cache):
                            out = model(x).float()
                    elif names:  # the prefix ends before the changed modules: the same under every variant
                        out, cache = prefix.record(names, x)
                        out = out.float()
                    else:
                        out = model(x).float()
                finally:
                    undo()
                totals[i] += (float((out.argmax(1) != y).sum()), float(F.cross_entropy(out, y, reduction="sum")),
                              len(y))
    if ctx is not None and ctx.enabled:
        from dpruner.train.distributed import sum_across

        totals = np.asarray(sum_across(totals.ravel().tolist(), ctx, device)).reshape(totals.shape)
    return [(w / max(n, 1.0), l / max(n, 1.0)) for w, l, n in totals]


def changed_modules(graph, index, flags: np.ndarray) -> set[str]:
    """The modules whose parameters `Masking` zeroes for the flagged channels (their producers and norms)."""
    gone = np.nonzero(flags)[0]
    return {slot.module for key, slot in graph.slots.items()
            if slot.role in ("out", "norm") and np.isin(index.slot_classes[key], gone).any()}


def least_adversarial(model, graph, index, group, n_remove: int, fixed: np.ndarray, batches, candidates: int,
                      generator: torch.Generator, ctx=None, device="cpu",
                      prior: np.ndarray | None = None, bn_batch: bool = False,
                      prefix=None) -> tuple[np.ndarray, list[dict]]:
    """The least adversarial of `candidates` masks removing `n_remove` of `group`'s channels on top of `fixed`
    (flags per dense class): (its flags, every candidate's error and loss). Random masks, except that `prior`
    (positions within the group, e.g. the criterion's lowest-scored channels) is the first candidate when given."""
    positions = np.searchsorted(index.roots, np.asarray(group.channels))
    draws = []
    for i in range(candidates):
        chosen = torch.randperm(len(positions), generator=generator)[:n_remove].numpy()
        if i == 0 and prior is not None:  # the random draw is still made: later candidates stay the same
            chosen = np.asarray(prior)[:n_remove]
        flags = np.zeros_like(fixed)
        flags[positions[chosen]] = True
        draws.append(flags)
    held, masking = Masking(model, graph, index), Masking(model, graph, index)
    held.apply(fixed)  # the earlier groups' masks, held while this group's candidates are judged
    try:
        every = np.zeros_like(fixed)
        every[positions] = True
        results = judge(model, batches, draws, masking.apply, masking.undo, changed_modules(graph, index, every),
                        prefix, ctx, device, bn_batch)
    finally:
        held.undo()
    best, best_key, tried = None, None, []
    for i, (error, loss) in enumerate(results):
        tried.append({"error": error, "loss": loss, "prior": i == 0 and prior is not None})
        if best_key is None or (error, loss) < best_key:  # strict: on a full tie the earlier (the prior) stays
            best, best_key, kept = fixed | draws[i], (error, loss), i
    tried[kept]["kept"] = True
    return best, tried


def kernel_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Convolutions whose (output, input) kernels can be masked one by one, input to output: ungrouped (a
    depthwise kernel is its channel's only filter), not excluded."""
    from fnmatch import fnmatch

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
            and m.groups == 1 and not any(fnmatch(name, pattern) for pattern in exclude)]


class KernelMasks(Callback):
    """Fixed kernel masks {layer: bool (out, in), True = zeroed}: applied to the weights, and re-applied after
    every optimizer step while retraining (a fit callback), so momentum and weight decay cannot revive them."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.modules = dict(model.named_modules())
        self.masks = masks

    def apply(self) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = self.modules[name].weight
                weight[mask.to(weight.device)] = 0.0

    def before_step(self, model: nn.Module, step: int) -> None:
        if step == 0:
            self.apply()

    def after_step(self, model: nn.Module, step: int) -> None:
        self.apply()


def least_adversarial_kernels(model: nn.Module, name: str, n_zero: int, batches, candidates: int,
                              generator: torch.Generator, ctx=None, device="cpu",
                              bn_batch: bool = False, prefix=None) -> tuple[torch.Tensor, list]:
    """The least adversarial of `candidates` random masks zeroing `n_zero` of layer `name`'s kernels."""
    weight = dict(model.named_modules())[name].weight
    out_ch, in_ch = weight.shape[:2]
    original = weight.detach().clone()
    masks = []
    for _ in range(candidates):
        mask = torch.zeros(out_ch * in_ch, dtype=torch.bool)
        mask[torch.randperm(out_ch * in_ch, generator=generator)[:n_zero]] = True
        masks.append(mask.view(out_ch, in_ch))

    def apply(mask):
        weight[mask.to(weight.device)] = 0.0

    results = judge(model, batches, masks, apply, lambda: weight.copy_(original), {name}, prefix, ctx, device,
                    bn_batch)
    best, best_key, tried = None, None, []
    for mask, (error, loss) in zip(masks, results):
        tried.append({"error": error, "loss": loss})
        if best_key is None or (error, loss) < best_key:
            best, best_key = mask, (error, loss)
    return best, tried


def empty_channels(model: nn.Module, graph, index, masks: dict[str, torch.Tensor]) -> np.ndarray:
    """Flags (per dense class) of prunable channels no layer reads any more: every consumer of the channel is a
    masked convolution whose kernels from it are all zeroed. Removing them is exact and a real saving."""
    removed = np.zeros(len(index.roots), dtype=bool)
    for group in index.groups:
        if not group.prunable:
            continue
        consumers = [k for k in group.slots if graph.slots[k].role == "in"]
        if not consumers or any(k[0] not in masks for k in consumers):
            continue
        rank = np.full(len(index.roots), -1, dtype=np.int64)
        rank[index.roots.searchsorted(group.channels)] = np.arange(len(group.channels))
        unread = np.ones(len(group.channels), dtype=bool)
        for key in consumers:
            of_position = rank[index.slot_classes[key]]
            dead = masks[key[0]].all(dim=0).numpy()  # input position read by no output channel
            for position, channel in enumerate(of_position):
                if channel >= 0 and not dead[position]:
                    unread[channel] = False
        keep_one = unread.sum() == len(unread)
        if keep_one:  # a group must keep a channel: the first stays
            unread[0] = False
        removed[np.searchsorted(index.roots, np.asarray(group.channels)[unread])] = True
    return removed


def run_kernel(model: nn.Module, example: torch.Tensor, config: CoarseConfig, env) -> "MethodResult":
    """Kernel granularity: layer by layer the least adversarial of N random masks zeroing `sparsity` of its
    kernels; input channels no layer reads any more are removed; retrained with the masks held at zero."""
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.run import MethodResult, _evaluate
    from dpruner.metrics.macs import count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan
    from dpruner.train.api import recalibrate
    from dpruner.train.evaluate import _batches
    from dpruner.train.loop import fit

    data = env.data
    base = _evaluate(model, env)
    work = copy.deepcopy(model).cpu().eval()
    before = count_sizes(work, example)
    batches = [(x.cpu(), y.cpu()) for _, (x, y) in zip(range(config.eval_batches), _batches(data.val, "val"))]
    generator = torch.Generator().manual_seed(config.seed)
    layers = kernel_layers(work, config.exclude)
    if not layers:
        raise InputError("--granularity kernel found no ungrouped convolution to mask.")
    work.to(env.device)
    prefix = Prefix(work, batches[0][0].to(env.device)) if config.cached_inputs and batches else None
    masks, choices = {}, []
    for name, module in layers:
        out_ch, in_ch = module.weight.shape[:2]
        n_zero = int(config.sparsity * out_ch * in_ch)
        if n_zero == 0:
            continue
        mask, tried = least_adversarial_kernels(work, name, n_zero, batches, config.candidates, generator, env.ctx,
                                                env.device, bn_batch=config.bn_statistics == "batch",
                                                prefix=prefix)
        masks[name] = mask
        with torch.no_grad():
            module.weight[mask.to(module.weight.device)] = 0.0
        errors = [t["error"] for t in tried]
        choices.append({"layer": name, "kernels": out_ch * in_ch, "zeroed": n_zero, "best_error": min(errors),
                        "median_error": float(np.median(errors)), "worst_error": max(errors)})
    work.cpu().eval()
    graph, index = analyze_groups(work, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
    unread = empty_channels(work, graph, index, masks)
    plans = []
    if unread.any():
        plan = make_plan(graph, index, index.roots[unread])
        kept_in = {name: plan.get("modules", {}).get(name, {}).get("in") for name in masks}
        kept_out = {name: plan.get("modules", {}).get(name, {}).get("out") for name in masks}
        apply_plan(work, plan)
        plans.append(plan)
        for name in list(masks):  # the masks follow the surviving rows and columns
            mask = masks[name]
            if kept_out[name] is not None:
                mask = mask[torch.as_tensor(kept_out[name])]
            if kept_in[name] is not None:
                mask = mask[:, torch.as_tensor(kept_in[name])]
            masks[name] = mask
    holder = KernelMasks(work, masks)
    holder.apply()
    recalibrate(work, data, env)
    used = 0.0
    if env.train is not None:
        teacher = copy.deepcopy(model).to(env.device).eval() if env.distill else None
        used = fit(work.to(env.device), data, env.train, device=env.device, ctx=env.ctx, teacher=teacher,
                   description="retrain", callbacks=[holder]).epochs
    work.cpu().eval()
    modules = dict(work.named_modules())
    zero = sum(int(masks[n].sum()) * int(np.prod(modules[n].weight.shape[2:])) for n in masks)
    total = sum(modules[n].weight.numel() for n in masks)
    after = {**count_sizes(work, example), **_evaluate(work, env)}
    return MethodResult(model=work, plans=plans, method="coarse", criterion="random (least adversarial)",
                        target_met=True, before={**before, **base}, after=after,
                        requested={"sparsity": config.sparsity}, epochs_used=used,
                        details={"coarse": {"granularity": "kernel", "candidates": config.candidates,
                                            "bn_statistics": config.bn_statistics,
                                            "kernel_sparsity": zero / max(total, 1), "masked_layers": len(masks),
                                            "removed_channels": int(unread.sum()),
                                            "eval_samples": sum(len(y) for _, y in batches), "layers": choices}})


def run_coarse(model: nn.Module, example: torch.Tensor, config: CoarseConfig, env) -> "MethodResult":
    """Plan each group's share, choose its mask as the least adversarial of N random ones (input to output), remove,
    recalibrate BatchNorm, retrain for the budget."""
    from dpruner.graph.check import check_pruned, expected_outputs
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.api import score_groups
    from dpruner.methods.run import MethodResult, _evaluate
    from dpruner.methods.spp import plan_goals
    from dpruner.metrics.macs import count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan
    from dpruner.train.api import recalibrate
    from dpruner.train.evaluate import _batches
    from dpruner.train.loop import fit

    if env.data is None:
        raise InputError("--method coarse judges candidate masks on held-out data: give --data.")
    check_planner(config, "coarse")
    if config.granularity == "kernel":
        return run_kernel(model, example, config, env)
    data = env.data
    base = _evaluate(model, env)
    work = copy.deepcopy(model).cpu().eval()
    before = count_sizes(work, example)
    graph, index = analyze_groups(work, example, exclude=config.exclude, leaf_modules=env.leaf_modules)
    expected = expected_outputs(work, example, graph.scopes)
    goals, planned_met = plan_goals(work, example, config, index, env.leaf_modules)
    batches = [(x.cpu(), y.cpu()) for _, (x, y) in zip(range(config.eval_batches), _batches(data.val, "val"))]
    generator = torch.Generator().manual_seed(config.seed)  # the same draws on every rank
    scores = score_groups(work, graph, index, config.criterion, config.seed) if config.criterion_candidate else {}
    work.to(env.device)
    prefix = Prefix(work, batches[0][0].to(env.device)) if config.cached_inputs and batches else None
    fixed = np.zeros(len(index.roots), dtype=bool)
    choices = []
    for group in group_order(work, graph, index):
        n_remove = goals.get(group.id, 0)
        if n_remove <= 0:
            continue
        prior = None
        if config.criterion_candidate:  # the criterion's lowest-scored channels (ties: lower position first)
            s = scores[group.id]
            prior = np.lexsort((np.arange(len(s)), s))[:n_remove]
        fixed, tried = least_adversarial(work, graph, index, group, n_remove, fixed, batches, config.candidates,
                                         generator, env.ctx, env.device, prior=prior,
                                         bn_batch=config.bn_statistics == "batch", prefix=prefix)
        errors = [t["error"] for t in tried]
        choices.append({"group": group.id, "layers": group.layers[:4], "removed": n_remove,
                        "best_error": min(errors), "median_error": float(np.median(errors)),
                        "worst_error": max(errors), "criterion_won": tried[0]["prior"] and tried[0].get("kept", False),
                        "criterion_error": tried[0]["error"] if prior is not None else None})
    work.cpu()
    plan = make_plan(graph, index, index.roots[fixed])
    apply_plan(work, plan)
    check_pruned(work, example, expected, leaf_modules=env.leaf_modules)
    recalibrate(work, data, env)
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
                                            "criterion_candidate": config.criterion_candidate,
                                            "bn_statistics": config.bn_statistics,
                                            "criterion_won": sum(c["criterion_won"] for c in choices),
                                            "eval_samples": sum(len(y) for _, y in batches), "groups": choices}})
