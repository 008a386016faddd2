"""PCA widths (seed 001): a group keeps the smallest width whose principal components explain the asked share of
its activations' variance; survivors are chosen by the criterion (geometric median for --method pca-gm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.criteria.stats import collect_stats
from dpruner.errors import InputError
from dpruner.graph.summary import analyze_groups
from dpruner.methods.oneshot import pca_width


class RankK(nn.Module):
    """conv1's 8 output channels are mixtures of `k` independent ones, so its output has rank k."""

    def __init__(self, k: int = 3, width: int = 8, width2: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width2, 3, padding=1)
        self.fc = nn.Linear(width2, 4)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            mix = torch.randn(width, k, generator=gen)
            basis = torch.randn(k, 3 * 3 * 3, generator=gen)
            self.conv1.weight.copy_((mix @ basis).reshape(width, 3, 3, 3))

    def forward(self, x):
        return self.fc(F.relu(self.conv2(self.conv1(x))).mean((2, 3)))


def _data(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(n)]


def test_width_rule():
    cumulative = np.array([0.6, 0.9, 0.99, 1.0])
    assert [pca_width(cumulative, e) for e in (0.5, 0.6, 0.61, 0.95, 0.99, 0.999, 1.0)] == [1, 1, 2, 3, 3, 4, 4]


def test_a_layer_whose_output_has_rank_k_gets_width_k():
    model = RankK(k=3).eval()
    graph, index = analyze_groups(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in index.groups if ("conv1", "out", None) in g.slots)
    spectrum = collect_stats(model, graph, index, _data(), needs=["spectrum"], batches=3)[group.id]["spectrum"]
    assert spectrum[2] == pytest.approx(1.0, abs=1e-9) and spectrum[1] < 0.999
    assert pca_width(spectrum.numpy(), 0.999) == 3
    result = dpruner.prune(model, torch.randn(1, 3, 8, 8), method="pca-gm", pca_energy=0.999, data=_data())
    assert model.conv1.out_channels == 3 and result.method == "pca-gm"
    assert result.requested["pca_energy"] == 0.999


def test_pca_allocation_reaches_a_ratio_by_bisection_over_the_energy():
    model = RankK(k=20, width=48, width2=64).eval()
    x = torch.randn(1, 3, 8, 8)
    result = dpruner.prune(model, x, ratio=1.5, allocation="pca", method="l2", data=_data())
    assert result.target_met and result.ratio["macs"] == pytest.approx(1.5, rel=0.05)


def test_pca_needs_data_and_refuses_sparsity():
    with pytest.raises(InputError, match="give --data"):
        dpruner.prune(RankK(), torch.randn(1, 3, 8, 8), method="pca-gm", ratio=2.0)
    with pytest.raises(InputError, match="not --sparsity"):
        dpruner.prune(RankK(), torch.randn(1, 3, 8, 8), allocation="pca", sparsity=0.5, data=_data())
    with pytest.raises(InputError, match="--pca-energy sets widths by PCA"):
        dpruner.prune(RankK(), torch.randn(1, 3, 8, 8), pca_energy=0.9, data=_data())
