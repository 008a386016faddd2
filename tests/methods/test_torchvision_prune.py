"""prune --ratio 1.5x on every torchvision classification model: it runs, keeps its output shape, and either
reaches the ratio or reports which groups could not be pruned and why."""

from __future__ import annotations

import pytest
import torch

from tests.analysis.test_torchvision_models import MODELS, skip_if_too_large

torchvision = pytest.importorskip("torchvision")

from dpruner.io.arch import build_model  # noqa: E402
from dpruner.methods.api import prune  # noqa: E402


def input_size(name: str) -> int:
    if name.startswith(("vit_", "swin_", "maxvit_")):
        return 224
    if name.startswith("inception"):
        return 299  # its auxiliary head (train mode) needs the native size
    return 64  # conv nets: the same graph as at 224, a fraction of the time


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_prune_torchvision_model(name):
    skip_if_too_large(name)
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}").eval()
    size = input_size(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected_shape = model(x).shape
    result = prune(model, x, ratio=1.5)
    with torch.no_grad():
        assert model(x).shape == expected_shape
    model.train()
    model(torch.randn(2, 3, size, size))  # the train-mode graph (e.g. auxiliary heads) still works
    assert result.target_met or result.unprunable
    assert result.target_met, f"{name}: reached {result.ratio['macs']:.2f}x; unprunable: {result.unprunable[:3]}"
