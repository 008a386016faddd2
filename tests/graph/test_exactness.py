"""Removing channels whose weights are zero must not change the network's outputs (within 1e-5).

For each model: build the plan a criterion would choose, zero exactly the weights that feed the removed channels
(producer rows, bias, BN gamma and beta), prune, and compare outputs with the zeroed but unpruned model. Removed
channels then carry exact zeros everywhere, so a correct graph and surgery leave the function unchanged; a wrong
coupling (a consumer reading the wrong column, a missed residual, a misaligned concat) shows up as a difference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpruner.graph.build import build_graph
from dpruner.graph.groups import channel_groups
from dpruner.methods.api import score_groups
from dpruner.methods.oneshot import Allocation, select
from dpruner.surgery.plan import apply_plan, make_plan

torchvision = pytest.importorskip("torchvision")


class ConcatDwSE(nn.Module):
    """A block with concat, a depthwise conv, squeeze-excitation and a residual add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se1 = nn.Conv2d(16, 4, 1)
        self.se2 = nn.Conv2d(4, 16, 1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = self.dw(y)
        scale = torch.sigmoid(self.se2(F.relu(self.se1(z.mean((2, 3), keepdim=True)))))
        z = self.proj(z * scale) + y
        return self.head(F.adaptive_avg_pool2d(z, 4).flatten(1))


def _zero_removed(model: nn.Module, graph, index, removed_roots) -> None:
    """Zero every producer row / norm entry that belongs to a removed channel."""
    removed = set(int(r) for r in removed_roots)
    with torch.no_grad():
        for key, slot in graph.slots.items():
            if slot.role not in ("out", "norm"):
                continue
            positions = [i for i, c in enumerate(index.slot_classes[key]) if int(index.roots[c]) in removed]
            if not positions:
                continue
            m = graph.modules[slot.module]
            idx = torch.tensor(positions)
            if slot.role == "out":
                m.weight[idx] = 0  # (out, ...) rows: the models here have no transposed convs
                if m.bias is not None:
                    m.bias[idx] = 0
            else:
                for name in ("weight", "bias"):
                    if getattr(m, name, None) is not None:
                        getattr(m, name)[idx] = 0


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so a misplaced channel changes the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def check_exact(model: nn.Module, x: torch.Tensor, sparsity: float = 0.4) -> None:
    torch.manual_seed(0)
    model.eval()
    _randomize_bn(model)
    graph = build_graph(model, x)
    index = channel_groups(graph)
    scores = score_groups(model, graph, index, "random", seed=1)
    removed = index.roots[select(index, scores, Allocation(), sparsity)]
    assert len(removed) > 0
    _zero_removed(model, graph, index, removed)
    with torch.no_grad():
        expected = model(x)
    pruned = apply_plan(copy.deepcopy(model), make_plan(graph, index, removed))
    with torch.no_grad():
        actual = pruned(x)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "resnet50", "densenet121", "mobilenet_v2"])
def test_torchvision_exactness(name):
    check_exact(torchvision.models.get_model(name, weights=None), torch.randn(2, 3, 64, 64))


def test_concat_depthwise_se_exactness():
    check_exact(ConcatDwSE(), torch.randn(2, 3, 8, 8))


def test_cifar_option_a_resnet_exactness():
    from dpruner.zoo import resnet20

    check_exact(resnet20(), torch.randn(2, 3, 32, 32))
