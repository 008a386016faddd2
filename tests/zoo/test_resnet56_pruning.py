"""The pretrained CIFAR ResNet-56 with option-A (F.pad) shortcuts, pruned for real (Torch-Pruning 1.6.1 breaks it)."""

from __future__ import annotations

import pytest
import torch

from dpruner.io import load_checkpoint, save_checkpoint
from dpruner.methods.api import prune
from tests.conftest import shared_data
from tests.graph.test_exactness import _zero_removed
from tests.surgery.test_plan import onnx_matches


@pytest.mark.data
def test_real_resnet56_prunes_exactly_and_round_trips(tmp_path):
    path = shared_data("cifar-resnet/resnet56-4bfd9763.th")
    model = load_checkpoint(path, arch="dpruner.zoo:resnet56").model
    x = torch.randn(4, 3, 32, 32)
    result = prune(model, x, ratio=2.0, method="l1")
    assert result.target_met and abs(result.ratio["macs"] / 2 - 1) <= 0.05
    # every stage's width shrank, padding included
    assert model.layer3[0].conv2.out_channels < 64 and model.layer2[0].conv2.out_channels < 32
    saved = save_checkpoint(tmp_path / "r56.pt", model, arch="dpruner.zoo:resnet56", input_shape=(1, 3, 32, 32),
                            plan=[result.plan])
    reloaded = load_checkpoint(saved).model
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    onnx_matches(reloaded, x, tmp_path)


@pytest.mark.data
def test_real_resnet56_removing_zeroed_channels_is_exact():
    from dpruner.graph.build import build_graph
    from dpruner.graph.groups import channel_groups
    from dpruner.methods.api import score_groups
    from dpruner.methods.oneshot import Allocation, select
    from dpruner.surgery.plan import apply_plan, make_plan

    model = load_checkpoint(shared_data("cifar-resnet/resnet56-4bfd9763.th"), arch="dpruner.zoo:resnet56").model
    x = torch.randn(4, 3, 32, 32)
    graph = build_graph(model, x)
    index = channel_groups(graph)
    removed = index.roots[select(index, score_groups(model, graph, index, "l2"), Allocation(), 0.4)]
    _zero_removed(model, graph, index, removed)
    with torch.no_grad():
        expected = model(x)
        actual = apply_plan(model, make_plan(graph, index, removed))(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
