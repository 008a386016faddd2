"""One entry point for every pruning method: `run(name, model, example, config, ...) -> MethodResult`.

A method is an algorithm (one-shot, tolerance, pca-gm; the learned methods come next) that composes a criterion
(which channels go: dpruner.criteria) with an allocation (how many per group: methods.oneshot). Each method declares
its settings as a frozen data class, the goals it accepts and what it needs (data, training), and returns a
MethodResult, whose `to_json()` is the one JSON form the CLI prints and CI scripts read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import nn

from dpruner.errors import InputError
from dpruner.methods.coarse import CoarseConfig
from dpruner.methods.gate import GateConfig
from dpruner.methods.spp import SPPConfig
from dpruner.methods.tolerance import ToleranceConfig, to_json_history
from dpruner.train.distributed import DistContext


@dataclass(frozen=True)
class OneShotConfig:
    """Settings of the one-shot methods: exactly one of ratio / sparsity / pca_energy, and dpruner.prune's other
    arguments (see there for each)."""

    ratio: float | None = None
    sparsity: float | None = None
    pca_energy: float | None = None
    target: str = "macs"
    criterion: str = "l2"
    allocation: str = "uniform"
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    max_fraction: float = 0.9
    seed: int = 0
    score_batches: int = 10
    sensitivity_batches: int = 8
    data_key: str = ""  # names the held-out data for the sensitivity cache (cli.training.data_key)
    soft: bool = False  # soft pruning while fine-tuning (methods.soft; FPGM's schedule): needs data and a ratio
    soft_every: float = 1.0  # epochs between re-choices of the zeroed channels
    soft_final: float = 0.2  # share of the budget that fine-tunes the model after the soft channels are removed
    latency: object | None = None  # target 'latency': a runtime.latency.LatencySpec (runtime, batch, threads)


@dataclass
class RunEnv:
    """What a method runs with besides its settings: data (a DataBundle: train/val[/test] loaders), fine-tuning
    (`train`; None: no training), where and how (device, torchrun context), and the hooks of a resumable run
    (`resume`: a state saved earlier through `on_checkpoint`)."""

    data: object | None = None
    train: object | None = None  # TrainConfig
    device: torch.device | str = "cpu"
    ctx: DistContext = field(default_factory=DistContext)
    distill: bool = True
    leaf_modules: tuple[type, ...] = ()
    log: Callable[[str], None] = lambda message: None
    resume: dict | None = None
    on_checkpoint: Callable[[dict], None] | None = None


@dataclass
class MethodResult:
    """What every method returns. `model` is pruned (dense, smaller); `plans` replay it on the original
    architecture; `before`/`after` hold params, MACs and, when data was given, validation `accuracy` and
    `test_accuracy`; `history` is the method's steps (empty for one-shot); `details` its own JSON fields."""

    model: nn.Module
    plans: list[dict]
    method: str
    criterion: str
    target_met: bool
    before: dict
    after: dict
    requested: dict
    history: list[dict] = field(default_factory=list)
    epochs_used: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> dict:
        return {k: self.before[k] / max(self.after[k], 1e-12 if k == "latency" else 1)
                for k in ("params", "macs", "latency") if k in self.before and k in self.after}

    def to_json(self) -> dict:
        return {"method": self.method, "criterion": self.criterion, "before": self.before, "after": self.after,
                "ratio": self.ratio, "requested": self.requested, "target_met": self.target_met,
                "epochs_used": self.epochs_used, "history": to_json_history(self.history), **self.details}


@dataclass(frozen=True)
class Method:
    """A registered method: `fn(model, example, config, env) -> MethodResult` with `config` of type `config_type`;
    `goals` are the settings that state what to reach; `needs` what it reads besides the weights."""

    name: str
    summary: str
    how: str
    goals: frozenset[str]
    needs: frozenset[str]
    config_type: type
    fn: Callable[..., MethodResult]


def _evaluate(model: nn.Module, env: RunEnv) -> dict:
    """Validation (and test) top-1 of `model` when data was given, summed over torchrun ranks."""
    if env.data is None:
        return {}
    from dpruner.train.api import evaluate_splits

    splits = evaluate_splits(model.to(env.device), env.data, env.device, ctx=env.ctx)
    model.cpu()
    return {"accuracy": splits["val"].accuracy,
            **({"test_accuracy": splits["test"].accuracy} if "test" in splits else {})}


def _one_shot(model: nn.Module, example: torch.Tensor, config: OneShotConfig, env: RunEnv,
              method: str = "one-shot", criterion_name: str | None = None) -> MethodResult:
    """Score, plan to the goal and cut once (dpruner.prune); with `env.train`, then fine-tune for its epochs,
    distilling from the unpruned model when `env.distill`. `model` itself is not modified."""
    from dpruner.methods.api import prune
    from dpruner.train.loop import fit

    if config.soft:
        from dpruner.criteria import get_criterion
        from dpruner.methods.soft import run_soft

        if env.train is None or env.data is None or config.ratio is None:
            raise InputError("--soft zeroes channels while fine-tuning and removes them at the end: give --ratio "
                             "and --data.")
        if get_criterion(criterion_name or config.criterion).needs_data or config.allocation in ("pca",
                                                                                               "sensitivity"):
            raise InputError("--soft re-chooses channels on the current weights: use a weight criterion (fpgm, l1, "
                             "l2, bn) with --allocation uniform or global.")
        if not 0 < config.soft_every <= 1e4:
            raise InputError(f"--soft-every must be a positive number of epochs, got {config.soft_every:g}.")
        if not 0 <= config.soft_final < 1:
            raise InputError(f"soft_final must be in [0, 1), got {config.soft_final:g}.")
        return run_soft(model, example, config, env)
    data = env.data
    base = _evaluate(model, env)
    pruned = prune(copy.deepcopy(model), example, ratio=config.ratio, sparsity=config.sparsity,
                   pca_energy=config.pca_energy, target=config.target, method=criterion_name or config.criterion,
                   allocation=config.allocation, exclude=config.exclude, round_to=config.round_to,
                   max_fraction=config.max_fraction, seed=config.seed, leaf_modules=env.leaf_modules,
                   data=None if data is None else data.train, score_batches=config.score_batches,
                   val_data=None if data is None else data.val, sensitivity_batches=config.sensitivity_batches,
                   data_key=config.data_key, ctx=env.ctx if data is not None else None, latency=config.latency)
    used = 0.0
    if env.train is not None:
        if data is None:
            raise InputError("Fine-tuning after pruning needs --data.")
        teacher = copy.deepcopy(model).to(env.device).eval() if env.distill else None
        used = fit(pruned.model.to(env.device), data, env.train, device=env.device, ctx=env.ctx, teacher=teacher,
                   description="fine-tune").epochs
    after = _evaluate(pruned.model, env)
    pruned.model.cpu().eval()
    details = {k: v for k, v in pruned.to_json().items()
               if k not in ("before", "after", "ratio", "requested", "target_met", "method")}
    return MethodResult(model=pruned.model, plans=[pruned.plan], method=method, criterion=config.criterion,
                        target_met=pruned.target_met, before={**pruned.before, **base},
                        after={**pruned.after, **after}, requested=pruned.requested, epochs_used=used,
                        details=details)


def _pca_gm(model, example, config: OneShotConfig, env: RunEnv) -> MethodResult:
    """Seed 001: widths from PCA of each group's activations, survivors chosen by geometric median (FPGM)."""
    return _one_shot(model, example, replace(config, criterion="fpgm", allocation="pca"), env, method="pca-gm",
                     criterion_name="pca-gm")


def _tolerance(model, example, config: ToleranceConfig, env: RunEnv) -> MethodResult:
    """Play-and-Prune (methods.tolerance): the smallest model within config.tolerance of validation accuracy."""
    from dpruner.methods.tolerance import prune_to_tolerance
    from dpruner.train.evaluate import evaluate

    if env.train is None:
        raise InputError("--tolerance fine-tunes between pruning steps; give a training configuration.")
    test = getattr(env.data, "test", None)

    def test_accuracy(m: nn.Module) -> dict:
        if test is None:
            return {}
        accuracy = evaluate(m.to(env.device), test, env.device, ctx=env.ctx, description="test").accuracy
        m.cpu()
        return {"test_accuracy": accuracy}

    before_test = test_accuracy(model)
    result = prune_to_tolerance(model, example, env.data, config, env.train, device=env.device, ctx=env.ctx,
                                distill=env.distill, leaf_modules=env.leaf_modules, log=env.log,
                                on_checkpoint=env.on_checkpoint, resume=env.resume)
    after_test = test_accuracy(result.model)
    result.model.cpu().eval()
    return MethodResult(model=result.model, plans=result.plans, method="tolerance", criterion=config.criterion,
                        target_met=result.met, before={**result.before, **before_test},
                        after={**result.after, **after_test},
                        requested={"tolerance": config.tolerance, "max_ratio": config.max_ratio},
                        history=result.history, epochs_used=result.epochs_used,
                        details={"tolerance": config.tolerance})


def _spp(model, example, config, env: RunEnv) -> MethodResult:
    """Seed 004: structured probabilistic pruning (methods.spp)."""
    from dpruner.methods.spp import run_spp

    return run_spp(model, example, config, env)


def _gate(model, example, config, env: RunEnv) -> MethodResult:
    """Seed 000: D-Pruner's embedded scorer networks (methods.gate)."""
    from dpruner.methods.gate import run_gate

    return run_gate(model, example, config, env)


def _coarse(model, example, config, env: RunEnv) -> MethodResult:
    """Seed 002: least-adversarial feature-map masks (methods.coarse)."""
    from dpruner.methods.coarse import run_coarse

    return run_coarse(model, example, config, env)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("one-shot", "score every group, plan to the target (MACs or params), cut once; with --data, then "
           "fine-tune for --budget-epochs (distilling from the original)",
           "--ratio / --sparsity [--data]", frozenset({"ratio", "sparsity", "pca_energy"}), frozenset(),
           OneShotConfig, _one_shot),
    Method("pca-gm", "seed 001: widths from PCA of each group's activations, survivors nearest the geometric "
           "median go last (FPGM); with --data fine-tuned like one-shot", "--method pca-gm --data, --ratio or "
           "--pca-energy", frozenset({"ratio", "pca_energy"}), frozenset({"data"}), OneShotConfig, _pca_gm),
    Method("tolerance", "Play-and-Prune: prune, fine-tune with an L1 push, measure, adapt the rate until accuracy "
           "would drop past the tolerance", "--tolerance 1% --data", frozenset({"tolerance"}),
           frozenset({"data", "training"}), ToleranceConfig, _tolerance),
    Method("spp", "seed 004: structured probabilistic pruning: per-channel pruning probabilities moved by rank "
           "every --spp-interval steps, Bernoulli masks while fine-tuning, p = 1 removes; then retrain",
           "--method spp --ratio 2x --data", frozenset({"ratio"}), frozenset({"data", "training"}), SPPConfig,
           _spp),
    Method("gate", "seed 000 (D-Pruner): a small scorer network per group gates its channels while fine-tuning; "
           "low-scored channels are removed every --gate-every epochs until the ratio or tolerance, scores folded",
           "--method gate --ratio 3x | --tolerance 1% --data", frozenset({"ratio", "tolerance"}),
           frozenset({"data", "training"}), GateConfig, _gate),
    Method("coarse", "seed 002: group by group from input to output, the least adversarial of --candidates random "
           "feature-map masks on held-out data; removed, then retrained once", "--method coarse --ratio 2x --data",
           frozenset({"ratio"}), frozenset({"data"}), CoarseConfig, _coarse),
)}


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        from dpruner.criteria import CRITERIA

        raise InputError(f"Unknown method '{name}'; choose one of {', '.join(METHODS)} (or a criterion: "
                         f"{', '.join(CRITERIA)}).")
    return method


def resolve(method: str | None, criterion: str | None, *, tolerance: bool) -> tuple[str, str]:
    """(method, criterion) from the CLI's --method and --criterion. `--method l1` (a criterion name, as before
    methods existed) still means the default method with that criterion. Defaults: the tolerance controller when
    a tolerance is given, else one-shot; criterion l1 with a tolerance (as in Play-and-Prune), else l2."""
    from dpruner.criteria import CRITERIA, get_criterion

    if method is not None and method not in METHODS and method in CRITERIA:
        if criterion is not None and criterion != method:
            raise InputError(f"--method {method} names a criterion and --criterion {criterion} another; give the "
                             "criterion once (--criterion) and the algorithm with --method "
                             f"({', '.join(METHODS)}).")
        method, criterion = None, method
    name = method if method is not None else ("tolerance" if tolerance else "one-shot")
    found = get_method(name)
    if tolerance and "tolerance" not in found.goals:
        raise InputError(f"--method {name} prunes to a --ratio or --sparsity, not to a --tolerance; use "
                         "--method tolerance (the default with --tolerance).")
    if not tolerance and found.goals == {"tolerance"}:
        raise InputError(f"--method {name} prunes to an accuracy tolerance: give --tolerance (e.g. 1%).")
    if name == "gate":
        if criterion not in (None, "gate"):
            raise InputError(f"--method gate scores channels with its own scorer networks; drop --criterion "
                             f"{criterion}.")
        return name, "gate"
    if name == "pca-gm":
        if criterion not in (None, "fpgm", "pca-gm"):
            raise InputError("--method pca-gm keeps the channels nearest the geometric median (fpgm); for PCA "
                             f"widths with --criterion {criterion} use --allocation pca.")
        return name, "fpgm"
    criterion = criterion if criterion is not None else ("l1" if tolerance or name in ("spp", "coarse") else "l2")  # "" is a
    # name, and unknown
    if criterion == "pca-gm":
        raise InputError("pca-gm is a method: give --method pca-gm.")
    get_criterion(criterion)  # an unknown name fails here, before any work
    return name, criterion


def run(method: str, model: nn.Module, example: torch.Tensor, config, *, data=None, train=None,
        device: torch.device | str = "cpu", ctx: DistContext | None = None, distill: bool = True,
        leaf_modules: Iterable[type] = (), log: Callable[[str], None] = lambda message: None,
        resume: dict | None = None, on_checkpoint: Callable[[dict], None] | None = None) -> MethodResult:
    """Run the registered `method` on `model` (not modified) with its settings `config`; `data` is a DataBundle
    (train/val[/test]), `train` a TrainConfig for the method's fine-tuning (None: none). Under torchrun pass `ctx`;
    every rank computes the same plans. `resume`/`on_checkpoint`: a resumable method's saved state and the hook
    that receives it after every step."""
    found = get_method(method)
    kind = found.config_type
    if not isinstance(config, kind):
        raise TypeError(f"method '{method}' takes a {kind.__name__}, got {type(config).__name__}")
    if "data" in found.needs and data is None:
        raise InputError(f"--method {method} reads data; give --data.")
    env = RunEnv(data=data, train=train, device=device, ctx=ctx or DistContext(), distill=distill,
                 leaf_modules=tuple(leaf_modules), log=log, resume=resume, on_checkpoint=on_checkpoint)
    return found.fn(model, example, config, env)
