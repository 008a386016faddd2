"""The one collection step for data-driven criteria: run a few training batches through the model and gather, per
channel of every prunable group, the statistics the criteria declare they need (see Criterion.needs).

Where: at the output of each norm layer the group holds (Molchanov et al. 2019 put their gates after BatchNorm), or
of its producing layers when it has none. What, per channel c of a group, summed over its member positions:
  taylor      (sum over the group's members and the sample's positions of z * dL/dz)^2, averaged over samples: the
              squared first-order change of the loss if the channel were zeroed everywhere at once, as removal does
              (Molchanov et al., CVPR 2019). Members are summed before squaring: a residual channel's members can
              cancel, and squaring each alone scored ResNet-56's stream 6 points worse after pruning (mean of 10
              draws of 10 batches, 51.4% vs 45.1%). Squared per sample, not per minibatch (Fisher-style): over the
              same draws the paper's per-minibatch square ranked no better (43.6%);
  activation  mean of max(z, 0) over samples and positions: the signal a following ReLU passes (APoZ-style;
              mean |z| ranked worse than random on the CIFAR ResNets);
  spectrum    the cumulative shares of variance explained by the principal components of the channels' activations
              (each position of each sample is one observation; the covariance is accumulated in float64), for the
              PCA width rule of seed 001 (methods.oneshot.pca_width).
Sums are in float64 (exact under AMP), summed over ranks under torchrun, then divided by the sample count.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpruner.graph.build import DependencyGraph
from dpruner.graph.groups import ChannelIndex

STATISTICS = ("taylor", "activation", "spectrum")
MAX_ROWS = 8192  # observations per probe and batch kept for the covariance (a seeded subsample beyond that)


def _probes(graph: DependencyGraph, index: ChannelIndex) -> dict[str, list[tuple[int, np.ndarray]]]:
    """module name -> [(group id, channel rank of each of the module's output positions, -1 if not the group's)]."""
    probes: dict[str, list[tuple[int, np.ndarray]]] = {}
    for group in index.groups:
        if not group.prunable:
            continue
        roles = [k for k in group.slots if graph.slots[k].role == "norm"] or \
            [k for k in group.slots if graph.slots[k].role == "out"]
        rank = np.full(len(index.roots), -1, dtype=np.int64)
        rank[index.roots.searchsorted(group.channels)] = np.arange(len(group.channels))
        for key in roles:
            probes.setdefault(key[0], []).append((group.id, rank[index.slot_classes[key]]))
    return probes


def channel_dim(module: nn.Module, z: torch.Tensor, width: int) -> int:
    """The dim of `module`'s output `z` that holds its `width` channel positions: the last for Linear and a
    LayerNorm that runs nn.LayerNorm's own forward (channels-last), dim 1 for convolutions and the other norms. A
    LayerNorm subclass with a forward of its own (torchvision's LayerNorm2d permutes (N, C, H, W) inside) is told
    by the shape: dim 1 when it holds the width, else the last."""
    if z.dim() < 2 or isinstance(module, nn.Linear):
        return z.dim() - 1
    if isinstance(module, nn.LayerNorm):
        if type(module).forward is nn.LayerNorm.forward or z.shape[1] != width:
            return z.dim() - 1
    return 1


def collect_stats(model: nn.Module, graph: DependencyGraph, index: ChannelIndex, loader: Iterable, *,
                  needs: Iterable[str], batches: int = 10, device: torch.device | str = "cpu",
                  ctx=None) -> dict[int, dict[str, torch.Tensor]]:
    """{group id: {statistic: per-channel tensor}} for the statistics in `needs` (a subset of STATISTICS), from
    at most `batches` batches of `loader` ((inputs, labels) pairs). The model's parameters and mode are restored
    (gradients are computed, nothing is stepped; BatchNorm runs in eval mode so its statistics do not move)."""
    from dpruner.train.distributed import DistContext, sum_across
    from dpruner.train.evaluate import _batches

    wanted = set(needs)
    needs = [stat for stat in STATISTICS if stat in wanted]  # a fixed order: every rank all-reduces the same tensors
    # in the same sequence (iterating a set of strings would follow each process's own hash seed)
    ctx = ctx if ctx is not None else DistContext()
    device = torch.device(device)
    sizes = {g.id: len(g.channels) for g in index.groups if g.prunable}
    probes = {name: [(gid, torch.as_tensor(np.nonzero(rank >= 0)[0], device=device),
                      torch.as_tensor(rank[rank >= 0], device=device), len(rank)) for gid, rank in members]
              for name, members in _probes(graph, index).items()}  # (group, own positions, their channels, width)
    if not needs or not probes:
        return {gid: {} for gid in sizes}
    per_sample = [stat for stat in needs if stat != "spectrum"]
    sums = {gid: {stat: torch.zeros(n, dtype=torch.float64, device=device) for stat in per_sample}
            for gid, n in sizes.items()}
    moments = {gid: [torch.zeros(n, n, dtype=torch.float64, device=device),
                     torch.zeros(n, dtype=torch.float64, device=device),
                     torch.zeros((), dtype=torch.float64, device=device)]
               for gid, n in sizes.items()} if "spectrum" in needs else {}
    generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval().to(device)
    seen = 0
    saved: list[tuple[str, torch.Tensor]] = []
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.retain_grad()
                saved.append((name, output))
        return fn

    for name in probes:
        handles.append(graph.modules[name].register_forward_hook(hook(name)))
    requires = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for i, (x, y) in enumerate(_batches(loader, "train")):
            if i >= batches:
                break
            x, y = x.to(device), y.to(device)
            saved.clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), y, reduction="sum")
                if "taylor" in needs:
                    loss.backward()
            seen += len(y)
            first_order: dict[int, torch.Tensor] = {}  # group -> (B, channels): z * dL/dz summed over its members
            for name, z in saved:
                n_pos = probes[name][0][3]
                axis = channel_dim(graph.modules[name], z, n_pos)
                zz = z.detach().double().movedim(axis, -1).reshape(z.shape[0], -1, n_pos)  # (B, positions, C)
                per = {}
                if "taylor" in needs and z.grad is not None:
                    g = z.grad.double().movedim(axis, -1).reshape(z.shape[0], -1, n_pos)
                    per["taylor"] = (zz * g).sum(1)  # (B, C): first-order change per sample
                if "activation" in needs:
                    per["activation"] = zz.clamp_min(0).mean(1)
                rows = zz.reshape(-1, n_pos) if "spectrum" in needs else None
                if rows is not None and len(rows) > MAX_ROWS:
                    rows = rows[torch.randperm(len(rows), generator=generator)[:MAX_ROWS].to(device)]
                for gid, mine, target, _ in probes[name]:
                    for stat, values in per.items():
                        v = values[:, mine]
                        if stat == "taylor":
                            if gid not in first_order:
                                first_order[gid] = v.new_zeros(len(v), sizes[gid])
                            first_order[gid].index_add_(1, target, v)
                        else:
                            sums[gid][stat].index_add_(0, target, v.sum(0))
                    if rows is not None:  # positions of one channel are summed into it
                        obs = rows.new_zeros(len(rows), sizes[gid]).index_add_(1, target, rows[:, mine])
                        moments[gid][0] += obs.T @ obs
                        moments[gid][1] += obs.sum(0)
                        moments[gid][2] += len(obs)
            for gid, u in first_order.items():
                sums[gid]["taylor"] += (u ** 2).sum(0)
    finally:
        for handle in handles:
            handle.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    total = sum_across([float(seen)], ctx, device)[0]
    if ctx.enabled:  # in the same order on every rank: sums, then moments
        import torch.distributed as dist

        for tensor in [t for stats in sums.values() for t in stats.values()] + \
                [t for parts in moments.values() for t in parts]:
            dist.all_reduce(tensor)
    out = {gid: {stat: (value / max(total, 1.0)).float().cpu() for stat, value in stats.items()}
           for gid, stats in sums.items()}
    for gid, (xx, x, n) in moments.items():
        out[gid]["spectrum"] = _cumulative_spectrum(xx, x, float(n))
    return out

def _cumulative_spectrum(xx: torch.Tensor, x: torch.Tensor, n: float) -> torch.Tensor:
    """Cumulative shares of the covariance's eigenvalues, largest first (float64; all ones for a constant signal)."""
    if n < 2:
        return torch.ones(len(x), dtype=torch.float64)
    mean = x / n
    cov = (xx - n * torch.outer(mean, mean)) / (n - 1)
    values = torch.linalg.eigvalsh(cov.cpu()).flip(0).clamp_min(0)
    total = values.sum()
    if total <= 0:
        return torch.ones(len(x), dtype=torch.float64)
    return (values.cumsum(0) / total).clamp_max(1.0)
