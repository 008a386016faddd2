"""Dependency-graph mechanics on small synthetic models: each coupling rule, and what makes a group unprunable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpruner.graph.build import build_graph
from dpruner.graph.groups import channel_groups


def groups_of(model, shape=(1, 3, 8, 8), **kw):
    graph = build_graph(model.eval(), torch.randn(*shape), **kw)
    return graph, channel_groups(graph)


def group_with(index, layer):
    return [g for g in index.groups if any(k[0] == layer and k[1] == "out" for k in g.slots)]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.c2(F.relu(self.c1(x))))


def test_residual_add_merges_producers():
    graph, index = groups_of(Residual())
    (g,) = group_with(index, "stem")
    assert {"stem", "c2"} <= {k[0] for k in g.slots if k[1] == "out"} and g.prunable and len(g) == 8
    (inner,) = group_with(index, "c1")
    assert inner.prunable and {k[0] for k in inner.slots} == {"c1", "c2"}


def test_network_output_is_never_pruned():
    _, index = groups_of(Residual())
    (g,) = group_with(index, "head")
    assert not g.prunable and "network output" in g.reasons


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_maps_offsets_into_the_consumer():
    graph, index = groups_of(Concat())
    consumer = index.slot_classes[("c", "in", None)]
    a_out, b_out = index.slot_classes[("a", "out", None)], index.slot_classes[("b", "out", None)]
    assert consumer.tolist() == a_out.tolist() + b_out.tolist()


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.grouped(self.dw(self.pw(x))))


def test_depthwise_and_grouped_convs():
    graph, index = groups_of(Depthwise())
    pw, dw = index.slot_classes[("pw", "out", None)], index.slot_classes[("dw", "out", None)]
    assert pw.tolist() == dw.tolist()  # depthwise: channel i in == channel i out
    grouped_in = index.slot_classes[("grouped", "in", None)]
    # groups=2 couples each half (4 in + 4 out channels) into one channel class: whole groups go
    assert len(set(grouped_in[:4].tolist())) == 1 and len(set(grouped_in[4:].tolist())) == 1
    assert grouped_in[0] != grouped_in[4]


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 2), 1))


def test_flatten_into_linear_maps_blocks():
    graph, index = groups_of(FlattenHead())
    fc_in = index.slot_classes[("fc", "in", None)]
    conv_out = index.slot_classes[("conv", "out", None)]
    assert fc_in.tolist() == [c for c in conv_out.tolist() for _ in range(4)]


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)  # channel shuffle
        return self.b(y)


def test_channel_shuffle_is_unprunable_with_a_reason():
    _, index = groups_of(Shuffle())
    (g,) = group_with(index, "a")
    assert not g.prunable
    assert any("channel" in r for r in g.reasons)


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.out(y * torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True))))))


def test_squeeze_excitation_couples_the_scale_producer():
    graph, index = groups_of(SE())
    assert index.slot_classes[("conv", "out", None)].tolist() == index.slot_classes[("fc2", "out", None)].tolist()


def test_option_a_pad_maps_zero_channels():
    from dpruner.zoo import resnet20

    graph, index = groups_of(resnet20(), (1, 3, 32, 32))
    (site,) = [s for s in graph.pads.values() if s.owner == "layer2.0.shortcut"]
    assert len(site.before) == len(site.after) == 8 and site.pair == 2
    stage2 = index.slot_classes[("layer2.0.bn2", "norm", None)]
    stage1 = index.slot_classes[("layer1.2.bn2", "norm", None)]
    assert stage2[8:24].tolist() == stage1.tolist()  # the padded copy of stage 1 sits in the middle of stage 2
    assert not set(stage2[:8].tolist()) & set(stage1.tolist())


def test_unknown_function_makes_its_inputs_unprunable():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    graph, index = groups_of(Weird())
    (g,) = group_with(index, "a")
    assert not g.prunable and any("cumsum" in r and r.startswith("cumsum") for r in g.reasons)


def test_a_channel_count_sizing_a_view_of_as_many_channels_follows_them_and_other_uses_pin():
    class Reads(nn.Module):
        def __init__(self, use: str):
            super().__init__()
            self.use = use
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            if self.use == "view":
                return self.b(y.mean((2, 3)).view(n, c))  # c sizes the view of c channels: follows a pruned width
            return self.b(y.mean((2, 3)) * c)  # c as a number: the width is baked into the output

    _, index = groups_of(Reads("view"))
    (g,) = group_with(index, "a")
    assert g.prunable
    _, index = groups_of(Reads("scale"))
    (g,) = group_with(index, "a")
    assert not g.prunable and any("channel count" in r for r in g.reasons)


def test_train_only_branch_is_coupled():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.main = nn.Conv2d(4, 2, 1)
            self.aux = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return (self.main(y), self.aux(y)) if self.training else self.main(y)

    graph, _ = groups_of(Aux())
    assert ("aux", "in", None) in graph.slots  # seen by the train-mode trace


def test_leaf_module_without_rule_is_opaque():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.block = Block()
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.block(self.a(x)))

    _, index = groups_of(Net(), leaf_modules=(Block,))
    (g,) = group_with(index, "a")
    assert not g.prunable and any("Block has no pruning rule" in r for r in g.reasons)


def test_conv_transpose_and_groupnorm_prune_and_run():
    from dpruner.methods.api import prune

    class UpNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.gn = nn.GroupNorm(4, 16)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.up_g = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2)
            self.out = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.out(self.up_g(F.relu(self.up(self.gn(self.down(x))))))

    model = UpNet().eval()
    x = torch.randn(2, 3, 8, 8)
    result = prune(model, x, sparsity=0.5)
    assert model(x).shape == (2, 3, 8, 8)
    assert model.up.out_channels == 4 and model.gn.num_groups == 2 and model.up_g.groups == 1
    assert result.after["params"] < result.before["params"]
