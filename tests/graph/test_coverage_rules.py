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
    if "ratio" not in kw:
        kw.setdefault("sparsity", 0.3)
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


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
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


# ---- norms written as function calls inside module subclasses -----------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d (timm/layers/norm_act.py), its forward copied: F.batch_norm on the module's own
    buffers and parameters, then an activation module."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class GroupNormAct(nn.GroupNorm):
    """A GroupNorm subclass calling F.group_norm with its own num_groups (as timm's GroupNormAct)."""

    def __init__(self, num_groups, num_channels):
        super().__init__(num_groups, num_channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm as in timm and ConvNeXt: permute channels last, F.layer_norm, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = BatchNormAct2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn = GroupNormAct(4, 16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.gn(self.conv2(y)) + y
        return self.fc(self.conv3(y).mean((2, 3)))


def test_a_norm_subclass_with_its_own_forward_is_traced_and_its_functional_norm_pruned():
    model = NormActNet()
    graph, index = groups_of(model, torch.randn(1, 3, 8, 8))
    assert not graph.unsupported, graph.unsupported
    assert ("bn1", "norm", None) in graph.slots and ("gn", "norm", None) in graph.slots
    assert ("bn1.act", "norm", None) not in graph.slots  # the activation inside is a plain leaf
    assert group_with(index, "conv1").prunable and group_with(index, "conv1") is group_with(index, "conv2")
    prune_exact(model, torch.randn(2, 3, 8, 8), sparsity=0.5)
    assert model.bn1.num_features == model.bn1.running_mean.numel() == model.conv1.out_channels < 16
    assert model.gn.num_channels == model.conv1.out_channels and model.gn.num_groups < 4  # whole groups went
    model.train()
    model(torch.randn(2, 3, 8, 8))  # train mode: F.batch_norm updates the pruned running statistics


def test_the_bn_criterion_reads_a_traced_batchnorm_subclass():
    result = dpruner.prune(NormActNet().eval(), torch.randn(1, 3, 8, 8), sparsity=0.25, method="bn")
    assert "bn1" in result.plan["modules"]


class LayerNorm2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = LayerNorm2d(16)
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.conv2(self.norm(self.conv1(x))).mean((2, 3))


def test_channels_first_layernorm_subclass_prunes_its_weight_and_normalized_shape():
    """A LayerNorm over the channels is not exact under zeroing (the removed channels count in its statistics), so
    the pruned model is compared with the original computed on the kept channels only."""
    model = LayerNorm2dNet().eval()
    _randomize(model)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    result = dpruner.prune(model, x, sparsity=0.25)
    kept = torch.tensor(result.plan["modules"]["conv1"]["out"])
    assert result.plan["modules"]["norm"] == {"norm": kept.tolist()}
    assert model.norm.normalized_shape == (len(kept),) and model.conv1.out_channels == len(kept) == 12
    with torch.no_grad():
        y = original.conv1(x)[:, kept].permute(0, 2, 3, 1)
        y = F.layer_norm(y, (len(kept),), original.norm.weight[kept], original.norm.bias[kept]).permute(0, 3, 1, 2)
        expected = F.conv2d(y, original.conv2.weight[:, kept], original.conv2.bias).mean((2, 3))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_a_norm_subclass_without_parameters_is_resized_through_the_module_calling_it():
    """elementwise_affine=False: no parameter names the module, the module whose forward calls F.layer_norm does."""
    model = LayerNorm2dNet()
    model.norm = LayerNorm2d(16, elementwise_affine=False)
    graph, index = groups_of(model, torch.randn(1, 3, 8, 8))
    assert ("norm", "norm", None) in graph.slots and group_with(index, "conv1").prunable
    dpruner.prune(model, torch.randn(1, 3, 8, 8), sparsity=0.25)
    assert model.norm.normalized_shape == (12,) and model(torch.randn(1, 3, 8, 8)).shape == (1, 4)


class FunctionalNorms(nn.Module):
    """Norms as plain function calls on parameters of a plain module (no norm module to resize)."""

    def __init__(self, fixed: str):
        super().__init__()
        self.fixed = fixed
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        if self.fixed == "batch_norm":
            y = F.batch_norm(y, self.mean, self.var, self.w, self.b, False)
        elif self.fixed == "instance_norm":
            y = F.instance_norm(y, weight=self.w, bias=self.b)
        elif self.fixed == "group_norm":
            y = F.group_norm(y, 2, self.w, self.b)
        else:
            y = F.layer_norm(y.permute(0, 2, 3, 1), (8,), self.w, self.b).permute(0, 3, 1, 2)
        return self.conv2(y).mean((2, 3))


@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_functional_norm_on_plain_parameters_slices_them_with_the_channel(fn):
    model = FunctionalNorms(fn)
    graph, index = groups_of(model, torch.randn(1, 3, 4, 4))
    params = {k[2] for k in graph.slots if k[1] == "param"}
    assert params == ({"w", "b", "mean", "var"} if fn == "batch_norm" else {"w", "b"})
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.5)
    assert model.w.shape == model.b.shape == (4,) and model.conv1.out_channels == 4
    if fn == "batch_norm":
        assert model.mean.shape == model.var.shape == (4,)


@pytest.mark.parametrize("fn, words", [("group_norm", "group_norm with a fixed number of groups (2)"),
                                       ("layer_norm", "layer_norm with a fixed normalized_shape [8]")])
def test_functional_norm_with_a_size_in_the_code_pins_the_channels(fn, words):
    _, index = groups_of(FunctionalNorms(fn), torch.randn(1, 3, 4, 4))
    g = group_with(index, "conv1")
    assert not g.prunable and any(words in r for r in g.reasons), g.reasons


# ---- layer scale ---------------------------------------------------------------------------------------------------


class LayerScale2d(nn.Module):
    """timm's LayerScale2d: gamma of shape [C] viewed as (1, C, 1, 1)."""

    def __init__(self, dim, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        gamma = self.gamma.view(1, -1, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma


class LayerScale(nn.Module):
    """timm's LayerScale (channels last): x * gamma with gamma of shape [C]."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class ScaledBlocks(nn.Module):
    """Layer scale in every form: a (C, 1, 1) parameter (ConvNeXt), [C] viewed or indexed to (1, C, 1, 1), in
    place, and channels last after a permute."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(16, 16, 3, padding=1) for _ in range(4))
        self.layer_scale = nn.Parameter(torch.ones(16, 1, 1))
        self.ls2 = LayerScale2d(16)
        self.ls3 = LayerScale2d(16, inplace=True)
        self.gamma = nn.Parameter(torch.ones(16))
        self.fc = nn.Linear(16, 16)
        self.ls4 = LayerScale(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.layer_scale * self.c1(x)
        x = x + self.ls2(self.c2(x))
        x = x + self.ls3(self.c3(x))
        x = x + self.c4(x) * self.gamma[:, None, None]
        y = x.permute(0, 2, 3, 1)
        y = y + self.ls4(self.fc(y))
        return self.head(y.mean((1, 2)))


def test_layer_scale_parameters_are_pruned_with_their_channels():
    model = ScaledBlocks()
    graph, index = groups_of(model, torch.randn(1, 3, 4, 4))
    assert not graph.unsupported, graph.unsupported
    params = {(k[0], k[2]): s.dim for k, s in graph.slots.items() if k[1] == "param"}
    assert params == {("", "layer_scale"): 0, ("ls2", "gamma"): 0, ("ls3", "gamma"): 0, ("", "gamma"): 0,
                      ("ls4", "gamma"): 0}
    stream = group_with(index, "stem")
    assert stream.prunable and {"c1", "c2", "c3", "c4", "fc"} <= set(stream.layers)
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.25)
    assert model.layer_scale.shape == (12, 1, 1)
    assert model.ls2.gamma.shape == model.ls3.gamma.shape == model.gamma.shape == model.ls4.gamma.shape == (12,)


def test_a_parameter_viewed_to_a_literal_width_pins_the_channels():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.gamma = nn.Parameter(torch.ones(8))
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.conv(x) * self.gamma.view(1, 8, 1, 1))

    graph, index = groups_of(Fixed(), torch.randn(1, 3, 4, 4))
    g = group_with(index, "conv")
    assert not g.prunable and not any(k[1] == "param" for k in graph.slots)


# ---- channel counts that are constants of the forward code ---------------------------------------------------------


def _groups(index, layer: str) -> list:
    return [g for g in index.groups if any(k[0] == layer and k[1] == "out" for k in g.slots)]


def _reasons(index, layer: str) -> list[str]:
    return [r for g in _groups(index, layer) for r in g.reasons]


class Splits(nn.Module):
    """One way of cutting the channel dim per `how`."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(2, 4, 1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "split_list":
            p, q = torch.split(y, [2, 6], dim=1)
            z = torch.cat([self.a(p), self.b(q)], 1)
        elif self.how == "split_method":
            p, q = y.split([2, 6], 1)
            z = torch.cat([self.a(p), self.b(q)], 1)
        elif self.how == "split_size":
            p, q = y.split(4, dim=1)
            z = torch.cat([self.c(p), self.c(q)], 1)
        elif self.how == "tensor_split_indices":
            p, q = torch.tensor_split(y, [2], dim=1)
            z = torch.cat([self.a(p), self.b(q)], 1)
        else:
            raise ValueError(self.how)
        return self.out(z).mean((2, 3))


@pytest.mark.parametrize("how, words", [
    ("split_list", "split: torch.split with fixed sizes [2, 6]"),
    ("split_method", "split: torch.split with fixed sizes [2, 6]"),
    ("split_size", "split: torch.split with fixed sizes 4"),
    ("tensor_split_indices", "tensor_split: tensor_split at fixed positions [2]"),
])
def test_split_with_fixed_sizes_pins_its_input_naming_the_node(how, words):
    model = Splits(how)
    _, index = groups_of(model, torch.randn(1, 3, 4, 4))
    assert not any(g.prunable for g in _groups(index, "conv")) and words in _reasons(index, "conv"), \
        _reasons(index, "conv")
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.5)  # the layers after the split still prune
    assert model.conv.out_channels == 8 and model.out.in_channels < 8


class Chunks(nn.Module):
    """A gated unit: value and gate are the two halves of one conv's output (x.chunk / torch.chunk /
    tensor_split into sections), so pruning must remove the same positions from both."""

    def __init__(self, how: str, width: int = 16):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.proj = nn.Conv2d(width // 2, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "method":
            value, gate = y.chunk(2, dim=1)
        elif self.how == "function":
            value, gate = torch.chunk(y, 2, 1)
        elif self.how == "tensor_split":
            value, gate = torch.tensor_split(y, 2, dim=1)
        else:
            value, gate = y.split(y.shape[1] // 2, dim=1)  # reads the channel count: pinned by the shape read
        return self.fc(self.proj(value * torch.sigmoid(gate)).mean((2, 3)))


@pytest.mark.parametrize("how", ["method", "function", "tensor_split"])
def test_chunk_into_equal_pieces_couples_their_positions(how):
    model = Chunks(how)
    graph, index = groups_of(model, torch.randn(1, 3, 4, 4))
    conv = index.slot_classes[("conv", "out", None)]
    assert conv[:8].tolist() == conv[8:].tolist()  # position j of the value is removed with position j of the gate
    assert group_with(index, "conv").prunable
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.5)
    assert model.conv.out_channels == 2 * model.proj.in_channels == 8


def test_chunk_into_unequal_pieces_pins_and_a_computed_split_size_pins():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 7, 1)
            self.a = nn.Conv2d(4, 2, 1)
            self.b = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            p, q = self.conv(x).chunk(2, dim=1)
            return (self.a(p) + self.b(q)).mean((2, 3))

    _, index = groups_of(Odd(), torch.randn(1, 3, 4, 4))
    assert "chunk: x.chunk(2) into unequal pieces [4, 3]" in _reasons(index, "conv")
    _, index = groups_of(Chunks("computed"), torch.randn(1, 3, 4, 4))
    assert not group_with(index, "conv").prunable and any("channel count" in r for r in _reasons(index, "conv"))


class Slices(nn.Module):
    """GhostNet's `out[:, :self.oup]` after a concat, a slice from a fixed start, one counted from the end and one
    that covers the whole dim."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(12, 12, 1)
        self.d = nn.Conv2d(8, 4, 1)
        self.e = nn.Conv2d(12, 4, 1)
        self.f = nn.Conv2d(4, 12, 1)
        self.g = nn.Conv2d(12, 4, 1)
        self.h = nn.Conv2d(12, 12, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)[:, :12]  # b's last 4 channels are computed and dropped
        y = self.c(y)
        z = self.d(y[:, 4:])  # c's first 4 channels fix where the window starts
        w = self.e(self.h(y)[:, -12:])  # counted from the end, the whole dim: no constraint
        v = self.g(self.f(z + w)[:, :64])  # a bound beyond the dim: the whole dim
        return (z + w + v).mean((2, 3))


def test_slices_with_literal_bounds_pin_exactly_the_channels_they_fix():
    model = Slices()
    graph, index = groups_of(model, torch.randn(1, 3, 4, 4))
    b_out = index.slot_classes[("b", "out", None)]
    reasons = index.blocked
    assert all(int(index.roots[c]) in reasons for c in b_out[:4])  # inside [:12]: pinned
    assert not any(int(index.roots[c]) in reasons for c in b_out[4:])  # dropped by the slice: free
    c_out = index.slot_classes[("c", "out", None)]
    assert all("slice [4:] of the channel dim with fixed bounds" in " ".join(reasons[int(index.roots[k])])
               for k in c_out[:4])
    assert not any(int(index.roots[k]) in reasons for k in c_out[4:])
    f_out = index.slot_classes[("f", "out", None)]
    assert not any(int(index.roots[k]) in reasons for k in f_out)
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.5)
    assert model.b.out_channels < 8 and model.d.in_channels < 8 and model.f.out_channels < 12


class Views(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 16, 3)
        self.out = nn.Conv2d(8, 3, 1)
        self.scale = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        n = x.shape[0]
        if self.how == "view_literal":
            return self.out(y.view(n, 8, 4, 4)).mean((2, 3))
        if self.how == "reshape_literal":
            return self.out(torch.reshape(y, (n, 8, 16)).unsqueeze(-1)).mean((2, 3))
        if self.how == "flatten_literal":
            return self.fc(y.reshape(n, 128))
        if self.how == "flatten_free":
            return self.fc(y.view(n, -1))
        if self.how == "view_free":
            return self.out(y.view(n, -1, 4, 4)).mean((2, 3))
        s = self.scale(x).mean((2, 3), keepdim=True)
        if self.how == "expand_literal":
            return self.out(y * s.expand(n, 8, 4, 4)).mean((2, 3))
        if self.how == "expand_free":
            return self.out(y + s.expand(-1, -1, 4, 4)).mean((2, 3))
        if self.how == "expand_as":
            return self.out(y * s.expand_as(y)).mean((2, 3))
        raise ValueError(self.how)


@pytest.mark.parametrize("how, words", [
    ("view_literal", "view gives the channel dim a fixed size 8"),
    ("reshape_literal", "reshape gives the channel dim a fixed size 8"),
    ("flatten_literal", "reshape gives the channel dim a fixed size 128"),
    ("expand_literal", "expand gives the channel dim a fixed size 8"),
])
def test_a_literal_channel_size_in_view_reshape_or_expand_pins_naming_the_node(how, words):
    _, index = groups_of(Views(how), torch.randn(1, 3, 4, 4))
    assert not group_with(index, "conv").prunable
    assert any(words in r for r in _reasons(index, "conv")), _reasons(index, "conv")


@pytest.mark.parametrize("how", ["flatten_free", "view_free", "expand_free", "expand_as"])
def test_a_channel_size_left_to_minus_one_follows_the_pruning(how):
    model = Views(how)
    _, index = groups_of(model, torch.randn(1, 3, 4, 4))
    assert group_with(index, "conv").prunable, _reasons(index, "conv")
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.5)
    assert model.conv.out_channels == 4


def test_a_resized_layers_own_parameter_read_in_the_forward_keeps_its_width():
    """`x * self.bn.weight[:, None, None]` would be sliced by BatchNorm's resizer and again as a coupled parameter:
    the channels of both keep their width instead of breaking the model."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(3, 8, 1)
            self.out = nn.Conv2d(8, 2, 1)
            self.o2 = nn.Conv2d(8, 2, 1)
            self.side = nn.Conv2d(3, 4, 1)
            self.o3 = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.out(self.bn(self.conv(x))) + self.o2(self.c2(x) * self.bn.weight[:, None, None])
            return (y + self.o3(self.side(x))).mean((2, 3))

    model = Net()
    _, index = groups_of(model, torch.randn(1, 3, 4, 4))
    for layer in ("conv", "c2"):
        assert "bn.weight: a parameter of a layer that is resized, read directly in the forward" in \
            _reasons(index, layer)
    prune_exact(model, torch.randn(2, 3, 4, 4), sparsity=0.5)
    assert model.bn.num_features == 8 and model.side.out_channels == 2


class Wobbly(nn.Module):
    """A block with data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # depends on the data
            return self.conv(x)
        return self.conv(-x)


class WithWobbly(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 8, 1)
        self.block = Wobbly()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.mid(torch.relu(self.stem(x))))).mean((2, 3))


def test_an_untraceable_block_is_kept_whole_and_the_rest_is_pruned():
    model = WithWobbly().eval()
    x = torch.randn(1, 3, 8, 8)
    result = dpruner.prune(model, x, sparsity=0.5)
    assert [o["module"] for o in result.opaque] == ["block"]
    assert "Wobbly is opaque: torch.fx stopped at test_coverage_rules.py" in result.opaque[0]["reason"]
    assert "x.sum() > 0" in result.opaque[0]["reason"]
    assert model.stem.out_channels == 8 and model.mid.out_channels == 8  # stem pruned; block's channels kept
    assert model.block.conv.in_channels == 8 and model(x).shape == (1, 4)


class WobblyRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return self.conv(x * 2)


def test_an_untraceable_root_forward_is_one_sentence_naming_the_line():
    """WobblyRoot holds one lone layer: tracing it alone could prune nothing, so there is no block-by-block
    fallback (see tests/graph/test_blockwise.py for models where there is)."""
    from dpruner.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"WobblyRoot's own forward in eval mode at test_coverage_rules.py:\d+ `if x.mean\(\) > 0:`"):
        dpruner.prune(WobblyRoot(), torch.randn(1, 3, 8, 8), sparsity=0.5)


class C2fLike(nn.Module):
    """Ultralytics' C2f: `list(x.chunk(2, 1))` and a growing list, which plain torch.fx cannot iterate."""

    def __init__(self, c: int = 8, n: int = 2):
        super().__init__()
        self.cv1 = nn.Conv2d(c, 2 * c, 1)
        self.m = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * c, c, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class VarargsRoot(nn.Module):
    """A root whose forward takes (x, *args, **kwargs), as Ultralytics' DetectionModel's does."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = C2fLike()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, *args, **kwargs):
        return self.head(self.block(torch.relu(self.stem(x)))).mean((2, 3))


def test_c2f_blocks_and_varargs_roots_trace_and_prune_exactly():
    model = VarargsRoot().eval()
    x = torch.randn(1, 3, 8, 8)
    result = prune_exact(model, x, sparsity=0.5)
    assert result.opaque == [] and result.prunable_macs_share > 0.9
    assert model.block.cv1.out_channels < 16 and model.block.m[0].out_channels < 8
