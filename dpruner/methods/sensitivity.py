"""Per-group sensitivity: prune each coupled channel group alone at 10..90% (lowest-scored channels first, no
fine-tuning), measure loss and top-1 on a fixed subset of held-out batches, and keep one curve per group. Groups,
not layers: channels tied by a residual add are one curve. `--allocation sensitivity` turns the curves into
per-group fractions (methods/oneshot.py); results are cached by model hash and settings so the next run reuses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from dpruner.errors import InputError

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CACHE_FORMAT = "dpruner_sensitivity"
CACHE_VERSION = 1


@dataclass
class GroupCurve:
    """One group's curve: at each measured level, the share of its channels removed and what the model scored."""

    group: int
    layers: list[str]
    channels: int
    fractions: list[float]  # removed share actually applied (floor(level * channels) / channels)
    accuracy: list[float]
    loss: list[float]


@dataclass
class Sensitivity:
    """All groups' curves plus the unpruned model's score on the same batches."""

    key: str
    criterion: str
    levels: list[float]
    batches: int
    samples: int
    recalibrate: int
    base_accuracy: float
    base_loss: float
    groups: list[GroupCurve] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    def to_json(self) -> dict:
        out = asdict(self)
        out["groups"] = [asdict(g) for g in self.groups]
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "Sensitivity":
        groups = [GroupCurve(**g) for g in doc["groups"]]
        fields = {k: doc[k] for k in ("key", "criterion", "levels", "batches", "samples", "recalibrate",
                                      "base_accuracy", "base_loss", "seconds")}
        return cls(**fields, groups=groups)

    def curves(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """group id -> (removed fractions from 0, predicted loss increase), the increase made non-decreasing (a
        noisy dip must not make a deeper cut look cheaper than a shallower one) and never below zero."""
        out = {}
        for g in self.groups:
            fractions = np.array([0.0, *g.fractions])
            increase = np.maximum.accumulate(np.array([0.0, *g.loss]) - self.base_loss)
            out[g.group] = (fractions, np.maximum(increase, 0.0))
        return out


def cache_dir() -> Path:
    """Where sensitivity results are cached: $DPRUNER_CACHE_DIR, else $XDG_CACHE_HOME/dpruner, else ~/.cache/dpruner."""
    if os.environ.get("DPRUNER_CACHE_DIR"):
        return Path(os.environ["DPRUNER_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dpruner"


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes and values) and class: the same weights hash the same."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model: nn.Module, settings: dict) -> str:
    """The model's hash combined with every setting that changes the curves (criterion, levels, data, ...)."""
    text = json.dumps({"model": model_hash(model), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_cached(key: str, index) -> Sensitivity | None:
    """The cached result for `key`, when there is one whose groups are still the graph's groups; else None (a
    damaged or stale cache file is ignored and overwritten, never an error)."""
    path = cache_dir() / "sensitivity" / f"{key}.json"
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != CACHE_FORMAT or doc.get("version") != CACHE_VERSION:
            return None
        result = Sensitivity.from_json(doc["sensitivity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    groups = {g.id: g for g in index.groups if g.prunable}
    if {g.group for g in result.groups} != set(groups) or any(
            groups[g.group].layers != g.layers or len(groups[g.group]) != g.channels for g in result.groups):
        return None
    result.cached = True
    return result


def save_cached(result: Sensitivity) -> Path | None:
    """Write the result to the cache (atomically); a cache that cannot be written is skipped, not an error."""
    from dpruner.io.atomic import atomic_write_bytes

    path = cache_dir() / "sensitivity" / f"{result.key}.json"
    doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "sensitivity": result.to_json()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, json.dumps(doc).encode())
    except (OSError, InputError):
        return None


def _take_batches(loader: Iterable, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dpruner.train.evaluate import _batches

    out = []
    for x, y in _batches(loader, "validation"):
        out.append((x, y))
        if len(out) >= batches:
            break
    return out


def _score(model: nn.Module, batches, device, ctx) -> tuple[float, float, int]:
    """(top-1, mean cross-entropy, samples) on the fixed batches, summed over ranks under torchrun."""
    from dpruner.train.distributed import DistContext
    from dpruner.train.evaluate import evaluate

    result = evaluate(model, batches, device, ctx=ctx or DistContext())
    return result.accuracy, result.loss, result.samples


def measure_sensitivity(model: nn.Module, example_input: torch.Tensor, data: Iterable, *, criterion: str = "l2",
                        levels: Iterable[float] = LEVELS, batches: int = 8, exclude: Iterable[str] = (),
                        leaf_modules: Iterable[type] = (), seed: int = 0, score_data: Iterable | None = None,
                        score_batches: int = 10, recalibrate: int = 2, data_key: str = "", use_cache: bool = True,
                        device="cpu", ctx=None, progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """Prune every prunable group alone at each of `levels` (the `criterion`'s lowest-scored channels first) and
    score each pruned copy on the first `batches` batches of `data` (held-out data: the validation split). The
    model is not changed. `data_key` names the data for the cache (e.g. the --data spec and split seed); with
    `use_cache`, a result for the same weights and settings is read back instead of measured again.
    With `recalibrate` > 0 and `score_data` given, every copy (the unpruned one too) first has its BatchNorm
    statistics re-estimated on that many batches of `score_data` (the training split), as the pruned model's will be
    by fine-tuning: a cut whose harm is mostly stale statistics then does not look worse than it is (on the CIFAR
    ResNet-20, taylor + sensitivity reached 36.8% one-shot without it and 53.3% with 2 batches).
    `progress(done, total)` is called after each measurement."""
    from dpruner.graph.summary import analyze_groups, nothing_prunable
    from dpruner.methods.api import score_groups
    from dpruner.surgery.plan import apply_plan, make_plan

    levels = sorted({float(v) for v in levels})
    if not levels or any(not 0 < v < 1 for v in levels):
        raise InputError("Sensitivity levels must lie strictly between 0 and 1.")
    if batches < 1:
        raise InputError("--sensitivity-batches must be a positive integer.")
    exclude, leaf_modules = tuple(exclude), tuple(leaf_modules)
    if score_data is None:
        recalibrate = 0  # nothing to recalibrate on
    was_training = model.training
    model.eval()
    try:
        graph, index = analyze_groups(model, example_input, exclude=exclude, leaf_modules=leaf_modules)
        if not any(g.prunable for g in index.groups):
            raise nothing_prunable(index)
        settings = {"criterion": criterion, "levels": levels, "batches": batches, "data": data_key, "seed": seed,
                    "exclude": sorted(exclude), "input": list(example_input.shape[1:]),
                    "score_batches": score_batches, "recalibrate": recalibrate, "version": CACHE_VERSION}
        key = cache_key(model, settings)
        if use_cache:
            cached = load_cached(key, index)
            if cached is not None:
                return cached
        start = time.perf_counter()
        held_out = _take_batches(data, batches)
        scores = score_groups(model, graph, index, criterion, seed, data=score_data, score_batches=score_batches,
                              device=device, ctx=ctx)
        calibration = _take_batches(score_data, recalibrate) if recalibrate else []

        def measure(candidate: nn.Module) -> tuple[float, float, int]:
            if calibration:
                from dpruner.train.evaluate import recalibrate_bn

                recalibrate_bn(candidate, calibration, batches=len(calibration), device=device)
            return _score(candidate, held_out, device, ctx)

        base_acc, base_loss, samples = measure(copy.deepcopy(model) if calibration else model)
        groups = [g for g in index.groups if g.prunable]
        total, done = len(groups) * len(levels), 0
        curves = []
        for group in groups:
            s = scores[group.id]
            n = len(s)
            order = np.lexsort((np.arange(n), s))  # ascending score, then position: deterministic
            fractions, accs, losses = [], [], []
            last = None
            for level in levels:
                k = min(math.floor(level * n + 1e-9), n - 1)
                if k == 0:
                    result = (base_acc, base_loss)
                elif last is not None and last[0] == k:
                    result = last[1]
                else:
                    gone = [group.channels[i] for i in order[:k]]
                    removed = np.zeros(len(index.roots), dtype=bool)
                    removed[np.searchsorted(index.roots, gone)] = True
                    pruned = apply_plan(copy.deepcopy(model), make_plan(graph, index, index.roots[removed]))
                    result = measure(pruned)[:2]
                    del pruned
                last = (k, result)
                fractions.append(k / n)
                accs.append(result[0])
                losses.append(result[1])
                done += 1
                if progress is not None:
                    progress(done, total)
            curves.append(GroupCurve(group.id, list(group.layers), n, fractions, accs, losses))
        result = Sensitivity(key=key, criterion=criterion, levels=levels, batches=batches, samples=samples,
                             recalibrate=recalibrate,
                             base_accuracy=base_acc, base_loss=base_loss, groups=curves,
                             seconds=round(time.perf_counter() - start, 2))
        if use_cache and (ctx is None or ctx.is_main):
            save_cached(result)
        return result
    finally:
        model.train(was_training)


def group_savings(index, cost, which: int) -> dict[int, float]:
    """Each prunable group's share of the target (MACs or params) saved by removing all its channels, alone (the
    linear cost weight of the sensitivity allocation)."""
    total = cost.estimate(np.zeros(len(index.roots), dtype=bool))[which]
    out = {}
    for g in index.groups:
        if g.prunable:
            removed = np.zeros(len(index.roots), dtype=bool)
            removed[np.searchsorted(index.roots, g.channels)] = True
            out[g.id] = max(total - cost.estimate(removed)[which], 0.0) / max(total, 1e-12)
    return out


def plot_curves(result: Sensitivity, path: str | os.PathLike, *, inputs: Iterable = ()) -> Path:
    """A PNG with one accuracy curve per group (matplotlib, the optional 'plot' extra), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot draws with matplotlib, which is not installed; pip install matplotlib "
                         "(or dpruner[plot]).") from None
    from dpruner.io.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(8, 5))
    for g in result.groups:
        label = g.layers[0] + (f" +{len(g.layers) - 1}" if len(g.layers) > 1 else "")
        ax.plot([0, *[100 * f for f in g.fractions]], [100 * result.base_accuracy, *[100 * a for a in g.accuracy]],
                marker=".", label=label)
    ax.set_xlabel("channels removed from the group (%)")
    ax.set_ylabel(f"top-1 on {result.samples} held-out samples (%)")
    ax.set_title(f"Sensitivity per channel group ({result.criterion})")
    if len(result.groups) <= 20:
        ax.legend(fontsize=6)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    try:
        return atomic_write(path, write, inputs=inputs)
    finally:
        plt.close(fig)
