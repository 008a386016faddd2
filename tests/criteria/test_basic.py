"""The data-free criteria: what each one ranks lowest, on hand-built views and on a real torchvision model."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dpruner.criteria import basic
from dpruner.errors import InputError
from dpruner.graph.groups import Group
from dpruner.graph.summary import analyze_groups
from dpruner.criteria.views import GroupTensors, group_tensors


def _view(filters, norms=(), n=None, seed=0) -> GroupTensors:
    n = n if n is not None else filters[0].shape[0]
    group = Group(id=0, channels=list(range(n)), slots=[], prunable=True)
    return GroupTensors(group, filters=list(filters), norms=list(norms),
                        generator=torch.Generator().manual_seed(seed))


def test_l1_and_l2_rank_a_zero_filter_lowest_and_follow_the_norm():
    w = torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 0.0], [2.0, 2.0]])
    l1 = basic.l1(_view([w]))
    l2 = basic.l2(_view([w]))
    assert l1.argmin() == 1 and l2.argmin() == 1
    # L1 sums |w| (2, 0, 3, 4); L2 takes the Euclidean norm (1.41, 0, 3, 2.83): the two disagree on channels 2 and 3.
    assert l1[3] > l1[2] and l2[2] > l2[3]


def test_coupled_layers_count_equally_whatever_their_scale():
    """A layer 1000x larger must not decide the ranking alone: each layer is divided by its own mean first."""
    a = torch.tensor([[1.0], [2.0], [3.0]])
    b = torch.tensor([[3.0], [2.0], [1.0]]) * 1000
    scores = basic.l1(_view([a, b]))
    assert torch.allclose(scores, torch.ones(3))


def test_fpgm_ranks_the_filter_at_the_geometric_median_lowest():
    # Four filters on the corners of a square and one at its centre: the centre is closest to all the others.
    w = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, 0.0], [1.0, -1.0], [-1.0, -1.0]]) + 5.0
    scores = basic.fpgm(_view([w]))
    assert scores.argmin() == 2
    # The centre has the largest norm of none of them, so a norm criterion would keep it: FPGM is not a norm.
    assert basic.l2(_view([w])).argmin() != 2


def test_bn_uses_the_norm_scale_and_falls_back_to_l2_without_one():
    w = torch.tensor([[1.0], [2.0], [3.0]])
    gamma = torch.tensor([0.5, 0.1, 0.9])
    assert basic.bn(_view([w], norms=[gamma])).argmin() == 1
    assert torch.equal(basic.bn(_view([w])), basic.l2(_view([w])))


def test_random_is_seeded_and_sized_by_the_group():
    w = torch.ones(6, 3)
    first = basic.random(_view([w], seed=7))
    assert first.shape == (6,)
    assert torch.equal(first, basic.random(_view([w], seed=7)))
    assert not torch.equal(first, basic.random(_view([w], seed=8)))


def test_get_criterion_is_case_insensitive_and_names_the_choices_when_unknown():
    assert basic.get_criterion("FPGM").score is basic.fpgm
    with pytest.raises(InputError, match="Unknown method 'taylorish'.*bn, fpgm, l1, l2, random"):
        basic.get_criterion("taylorish")


@pytest.fixture(scope="module")
def resnet():
    """A torchvision ResNet-18 with one dead filter (layer2.0.conv1 #5) and one dead BN channel (layer2.0.bn1 #9)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        model.layer2[0].conv1.weight[5].zero_()
        model.layer2[0].bn1.weight[9] = 0.0
    graph, index = analyze_groups(model, torch.randn(1, 3, 32, 32))
    return model, graph, index


def _group_of(index, layer: str, role: str = "out"):
    return next(g for g in index.groups if (layer, role) in [tuple(s[:2]) for s in g.slots])


@pytest.mark.parametrize("method", ["l1", "l2", "fpgm", "bn", "random"])
def test_every_criterion_scores_a_residual_group_and_a_plain_one(resnet, method):
    """The layer1 residual stream (the stem conv and every layer1 block's conv2 produce it, coupled by the adds) and
    one block-internal group: one finite, non-negative score per channel."""
    model, graph, index = resnet
    criterion = basic.get_criterion(method)
    for group in (_group_of(index, "layer1.0.conv2"), _group_of(index, "layer2.0.conv1")):
        view = group_tensors(model, graph, index, group, torch.Generator().manual_seed(0))
        s = criterion(view)
        assert s.shape == (len(group),) and (s >= 0).all() and torch.isfinite(s).all()
    residual = _group_of(index, "layer1.0.conv2")
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(residual.layers)


def test_a_dead_filter_in_a_real_model_gets_the_lowest_l1_and_bn_score(resnet):
    model, graph, index = resnet
    group = _group_of(index, "layer2.0.conv1")
    view = group_tensors(model, graph, index, group)
    l1, bn = basic.l1(view), basic.bn(view)
    assert (l1 == 0).sum() == 1 and (bn == 0).sum() == 1
    assert l1.argmin() != bn.argmin()  # two different channels: filter 5 and BN channel 9
