"""The data-free redundancy measures on filter matrices whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpruner.analysis.redundancy import (
    bn_gamma_stats,
    filter_matrix,
    filter_measures,
    geometric_median,
    gm_redundancy,
    l1_stats,
    pca_energy,
)


def test_l1_stats():
    filters = torch.tensor([[1.0, -1.0], [0.0, 0.01], [3.0, 1.0], [2.0, 0.0]])
    stats = l1_stats(filters)
    assert stats["min"] == pytest.approx(0.01) and stats["max"] == pytest.approx(4.0)
    assert stats["median"] == pytest.approx(2.0)  # torch's lower median of [0.01, 2, 2, 4]
    assert stats["low_share"] == 0.25  # 0.01 < 1% of 4


def test_geometric_median_of_collinear_points_is_the_median():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert geometric_median(points).tolist() == pytest.approx([1.0, 0.0], abs=1e-3)


def test_geometric_median_is_rotation_equivariant():
    torch.manual_seed(0)
    points = torch.randn(20, 5)
    q, _ = torch.linalg.qr(torch.randn(5, 5))
    assert torch.allclose(geometric_median(points @ q.T).float(), geometric_median(points).float() @ q.T, atol=1e-4)


def test_gm_redundancy_counts_the_coinciding_majority():
    torch.manual_seed(0)
    base = torch.randn(1, 16)
    filters = torch.cat([base.repeat(6, 1) + 1e-4 * torch.randn(6, 16), torch.randn(4, 16) * 3])
    assert gm_redundancy(filters)["near_share"] == pytest.approx(0.6)


def test_gm_redundancy_of_random_filters_is_low():
    torch.manual_seed(0)
    assert gm_redundancy(torch.randn(64, 288))["near_share"] == 0.0


def test_pca_energy_of_a_low_rank_matrix():
    torch.manual_seed(0)
    filters = torch.randn(32, 2) @ torch.randn(2, 50)  # rank 2 (rank <= 2 after centring too)
    pca = pca_energy(filters)
    assert pca["filters"] == 32 and pca["k99"] <= 2 and pca["k90"] >= 1


def test_pca_energy_matches_svd():
    torch.manual_seed(0)
    filters = torch.randn(40, 30) * torch.linspace(3, 0.1, 30)  # anisotropic: needs a real spectrum
    s = torch.linalg.svdvals(filters - filters.mean(0)).double() ** 2
    cum = s.cumsum(0) / s.sum()
    expected = {f"k{lvl}": int((cum < lvl / 100).sum()) + 1 for lvl in (90, 95, 99)}
    assert {k: v for k, v in pca_energy(filters).items() if k.startswith("k")} == expected
    assert pca_energy(filters)["rank_bound"] == 30


def test_filter_matrix_conv_transpose_groups():
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight (4, 3, 3, 3)
    with torch.no_grad():
        for j in range(6):  # output channel j of group g is weight[g*2:(g+1)*2, j % 3]
            g = j // 3
            layer.weight[g * 2 : (g + 1) * 2, j % 3] = j
    rows = filter_matrix(layer)
    assert rows.shape == (6, 2 * 9)
    assert [float(r.unique()) for r in rows] == [0, 1, 2, 3, 4, 5]


def test_filter_matrix_conv_and_linear():
    assert filter_matrix(nn.Conv2d(8, 16, 3, groups=4)).shape == (16, 2 * 9)
    assert filter_matrix(nn.Linear(10, 3)).shape == (3, 10)


def test_bn_gamma():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.001, 0.5]))
    stats = bn_gamma_stats(bn)
    assert (stats["min"], stats["max"], stats["low_share"]) == (pytest.approx(0.001), 2.0, 0.25)
    assert bn_gamma_stats(nn.BatchNorm2d(4, affine=False)) == {}


def test_large_layers_skip_the_expensive_measures_unless_asked():
    layer = nn.Linear(300, 200)
    assert "pca" not in filter_measures(layer, max_cost=1e3) and "skipped" in filter_measures(layer, max_cost=1e3)
    assert "pca" in filter_measures(layer, max_cost=None)


def test_pca_survives_extreme_weights():
    """Finite but huge weights (a bit-flipped checkpoint, found by the property test) overflow the float32 Gram
    matrix: PCA falls back to float64, or reports that it could not converge, instead of crashing analyze."""
    import torch

    from dpruner.analysis.redundancy import pca_energy

    filters = torch.randn(8, 27)
    filters[3, 5] = 3e38
    out = pca_energy(filters)
    assert out["filters"] == 8 and ("k90" in out or "error" in out)
    assert out.get("k90", 1) >= 1
