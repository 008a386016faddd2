"""Engine coverage: constructs beyond plain torch.nn layers (functional norms inside module subclasses, layer scale,
ops whose channel counts are constants in the forward code, 3-D convolutions and pooling).

Each construct is pruned with `dpruner.prune` (which also runs the engine's own check that the pruned model runs),
and the pruned model must equal the original with the removed channels zeroed: the plan names what each layer keeps,
so the reference copy gets exact zeros in every producing row, norm entry and coupled parameter the plan removes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.graph.build import build_graph
from dpruner.graph.groups import channel_groups
from tests.graph.test_exactness import _randomize_bn


# ---- helpers -----------------------------------------------------------------------------------------------------


def _randomize(model: nn.Module) -> None:
    """Non-trivial norm statistics, affine terms and per-channel parameters, so a misplaced channel shows."""
    _randomize_bn(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] in ("gamma", "scale", "layer_scale"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def _zero_by_plan(model: nn.Module, plan: dict) -> None:
    """Zero what the plan removes: producing rows and biases ('out'), norm weights and biases ('norm'), and the
    removed entries of coupled parameters. Input columns stay: they read channels that are now exact zeros."""
    with torch.no_grad():
        for name, roles in plan["modules"].items():
            m = model.get_submodule(name)
            for role, kept in roles.items():
                if role == "in":
                    continue
                size = m.weight.shape[0] if role == "out" else (
                    m.weight.shape[0] if getattr(m, "weight", None) is not None else m.running_mean.shape[0])
                gone = torch.tensor(sorted(set(range(size)) - set(kept)), dtype=torch.long)
                if not len(gone):
                    continue
                for attr in ("weight", "bias"):
                    tensor = getattr(m, attr, None)
                    if tensor is not None:
                        tensor[gone] = 0
        for target, spec in plan["params"].items():
            tensor = model.get_parameter(target) if target in dict(model.named_parameters()) else \
                model.get_buffer(target)
            gone = sorted(set(range(tensor.shape[spec["dim"]])) - set(spec["keep"]))
            tensor.index_fill_(spec["dim"], torch.tensor(gone, dtype=torch.long), 0)


def prune_exact(model: nn.Module, x: torch.Tensor, *, atol: float = 1e-5, **kw) -> dpruner.PruneResult:
    """Prune `model` in place with dpruner.prune and check it against the zeroed original."""
    torch.manual_seed(0)
    model.eval()
    _randomize(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        original = reference(x)
    kw.setdefault("sparsity", 0.3) if "ratio" not in kw else None
    result = dpruner.prune(model, x, **kw)
    assert result.plan["modules"], "nothing was pruned"
    _zero_by_plan(reference, result.plan)
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert actual.shape == original.shape
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)
    return result


def groups_of(model: nn.Module, x: torch.Tensor):
    graph = build_graph(model.eval(), x)
    return graph, channel_groups(graph)


def group_with(index, layer: str, role: str = "out"):
    (g,) = [g for g in index.groups if any(k[0] == layer and k[1] == role for k in g.slots)]
    return g


# ---- 3-D convolutions, norms and pooling ---------------------------------------------------------------------------


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(8)
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(8)
        self.avg = nn.AvgPool3d((1, 2, 2))
        self.conv3 = nn.Conv3d(8, 12, 1)
        self.head_pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = self.pool(F.relu(self.bn1(self.conv1(x))))
        y = self.avg(F.relu(self.bn2(self.conv2(y)) + y))
        y = F.max_pool3d(self.conv3(y), (1, 1, 2))
        return self.fc(self.head_pool(y).flatten(1))


def test_conv3d_batchnorm3d_and_3d_pooling_prune_exactly():
    model = Net3d()
    result = prune_exact(model, torch.randn(2, 3, 4, 8, 8))
    assert model.conv1.out_channels == model.bn1.num_features == model.conv2.out_channels < 8
    assert model.conv3.out_channels < 12 and model.fc.in_features == model.conv3.out_channels
    assert not [u for u in result.unprunable if "conv3" in u["layers"]]


def test_a_pooling_op_over_the_channel_dim_pins_it():
    """MaxPool1d over the last dim of a Linear's (N, L, C) output pools the channels: they cannot be pruned."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 6)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(nn.functional.max_pool1d(self.a(x), 2))

    _, index = groups_of(Net(), torch.randn(2, 4, 8))
    g = group_with(index, "a")
    assert not g.prunable and any("max_pool1d" in r and "channel dim" in r for r in g.reasons)


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18"])
def test_torchvision_video_resnets_prune_to_half_the_macs(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models.video, name)().eval()
    x = torch.randn(1, 3, 8, 56, 56)
    result = dpruner.prune(model, x, ratio=2.0)
    assert result.target_met and 1.9 <= result.ratio["macs"] <= 2.11, result.ratio
    with torch.no_grad():
        assert model(x).shape == (1, 400)
    # every layer's channels are prunable except the classifier's outputs
    assert [u["reasons"] for u in result.unprunable] == [["network output"]], result.unprunable


# ---- leaf-ness of module subclasses --------------------------------------------------------------------------------


class PlainConv(nn.Conv2d):
    """A subclass that only changes construction (as torchvision's Conv3DSimple): a leaf with the conv rule."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1, bias=False)


def test_a_subclass_that_keeps_its_base_forward_is_a_leaf_with_the_base_rule():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = PlainConv(3, 8)
            self.b = PlainConv(8, 4)

        def forward(self, x):
            return self.b(F.relu(self.a(x))).mean((2, 3))

    model = Net()
    graph, index = groups_of(model, torch.randn(1, 3, 8, 8))
    assert ("a", "out", None) in graph.slots and group_with(index, "a").prunable
    prune_exact(model, torch.randn(2, 3, 8, 8))
    assert model.a.out_channels < 8 and type(model.a) is PlainConv
