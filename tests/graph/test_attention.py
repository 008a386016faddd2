"""Attention: whole heads are removed (q, k, v rows and the output projection's columns together, `num_heads` and
the attention width rewritten in the module), the embedding width is pruned through the class token and the
position embedding, and sizes read from a shape (`B, N, C = x.shape; x.reshape(B, N, C)`) follow a pruned width."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.graph.build import build_graph
from dpruner.graph.groups import channel_groups
from dpruner.surgery.plan import PlanError, apply_plan, make_plan, validate_plan


class Attention(nn.Module):
    """Multi-head self-attention written like timm's (sizes read from attributes)."""

    def __init__(self, dim: int = 24, num_heads: int = 3, fused: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class TinyViT(nn.Module):
    def __init__(self, fused: bool = True, dim: int = 24, heads: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


def _heads_group(index):
    return next(g for g in index.groups if ("attn.qkv", "out", None) in g.slots)


@pytest.mark.parametrize("fused", [True, False])
def test_heads_are_one_prunable_group_with_one_channel_per_head(fused):
    graph = build_graph(TinyViT(fused).eval(), torch.randn(1, 3, 16, 16))
    index = channel_groups(graph)
    heads = _heads_group(index)
    assert heads.prunable and len(heads) == 3 and set(heads.layers) >= {"attn.qkv", "attn.proj"}
    assert {k[:2] for k in graph.attrs} == {("attn", "num_heads"), ("attn", "attn_dim")}
    stream = next(g for g in index.groups if ("patch", "out", None) in g.slots)
    assert stream.prunable  # the embedding width: class token and position embedding are sliced with it


@pytest.mark.parametrize("fused", [True, False])
def test_removing_a_head_equals_zeroing_it(fused):
    """Zero head 1's q, k and v rows: its attention output is zero, so removing it (and the projection's columns
    for it) must leave the network's output unchanged."""
    torch.manual_seed(0)
    model = TinyViT(fused).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = build_graph(model, x)
    index = channel_groups(graph)
    heads = _heads_group(index)
    removed = heads.channels[1:2]
    d = model.attn.head_dim
    with torch.no_grad():
        for part in range(3):
            rows = slice(part * model.attn.attn_dim + d, part * model.attn.attn_dim + 2 * d)
            model.attn.qkv.weight[rows] = 0
            model.attn.qkv.bias[rows] = 0
        expected = model(x)
    plan = make_plan(graph, index, removed)
    assert sorted((a["attr"], a["old"], a["new"]) for a in plan["attrs"]) == [("attn_dim", 24, 16),
                                                                           ("num_heads", 3, 2)]
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.attn.num_heads == 2 and pruned.attn.qkv.out_features == 48 and pruned.attn.proj.in_features == 16
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)


def test_a_plan_with_attributes_replays_on_a_fresh_model_and_is_checked():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(1, 3, 16, 16)
    result = dpruner.prune(model, x, sparsity=0.4)
    assert result.plan["attrs"] and model.attn.num_heads < 3
    fresh = apply_plan(TinyViT().eval(), result.plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    tampered = copy.deepcopy(result.plan)
    tampered["attrs"][0]["old"] = 7
    with pytest.raises(PlanError, match=r"attrs\[0\]: attn\.\w+ is \d+, not the plan's 7"):
        validate_plan(tampered, TinyViT())
    tampered["attrs"][0] = {"owner": "attn", "attr": "__class__", "old": 1, "new": 1}
    with pytest.raises(PlanError, match="names a module attribute the model does not have"):
        validate_plan(tampered, TinyViT())


class LiteralHeads(nn.Module):
    """Heads written as a literal 3 in the code: the attribute num_heads == 3 must not be trusted for it."""

    def __init__(self):
        super().__init__()
        self.num_heads = 3
        self.qkv = nn.Linear(24, 72)
        self.proj = nn.Linear(24, 24)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


def test_a_literal_that_merely_equals_an_attribute_is_not_rewritten():
    graph = build_graph(LiteralHeads().eval(), torch.randn(1, 5, 24))
    index = channel_groups(graph)
    assert not graph.attrs
    qkv = next(g for g in index.groups if ("qkv", "out", None) in g.slots)
    assert not qkv.prunable and "splits or mixes the channel dim" in qkv.reasons[0]


class ShapeSized(nn.Module):
    """`C` read from a shape and used to size a view of a tensor as wide: it follows the pruned width."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        B, C, H, W = y.shape
        z = self.b(y).view(B, C, H * W).mean(-1)
        return self.fc(z)


class ShapeArithmetic(ShapeSized):
    def forward(self, x):
        y = self.a(x)
        B, C, H, W = y.shape
        return self.fc(self.b(y).view(B, C // 2, 2 * H * W).mean(-1).repeat(1, 2))


def test_a_channel_count_read_from_a_shape_follows_the_pruned_width():
    model = ShapeSized().eval()
    x = torch.randn(1, 3, 4, 4)
    index = channel_groups(build_graph(model, x))
    for layer in ("a", "b"):
        assert next(g for g in index.groups if (layer, "out", None) in g.slots).prunable
    dpruner.prune(model, x, sparsity=0.5)
    assert model.a.out_channels == 4 and model.b.out_channels == 4 and model(x).shape == (1, 2)


def test_arithmetic_on_a_channel_count_pins_the_channels():
    index = channel_groups(build_graph(ShapeArithmetic().eval(), torch.randn(1, 3, 4, 4)))
    group = next(g for g in index.groups if ("a", "out", None) in g.slots)
    assert not group.prunable and any("channel count read from a shape" in r for r in group.reasons)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_transformers_prune_heads_width_and_mlp(name):
    timm = pytest.importorskip("timm", reason="timm (a test dependency) is not installed")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    result = dpruner.prune(model, x, ratio=2.0)
    assert result.target_met and result.prunable_macs_share == pytest.approx(1.0, abs=0.02)
    heads = [a for a in result.plan.get("attrs", []) if a["attr"] == "num_heads"]
    assert heads and all(a["new"] < a["old"] for a in heads)  # whole heads went, not only MLP width
    kept = {g["layers"][0]: g["kept"] / g["channels"] for g in result.groups}
    assert min(kept.values()) > 0.3  # balanced: no group cut to a sliver (the MLP alone used to go to 23%)
    with torch.no_grad():
        assert model(x).shape == (1, 10)


class MixedConv(nn.Module):
    """timm's MixedConv2d: the input is split by sizes the module holds, each piece gets its own kernel size."""

    def __init__(self, channels: int = 12):
        super().__init__()
        self.splits = [8, 4]
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(4, 4, 5, padding=2, groups=4)])

    def forward(self, x):
        pieces = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, pieces)], 1)


class MixNetBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.mixed = MixedConv()
        self.out = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        return self.out(F.relu(self.mixed(F.relu(self.bn(self.pw(x)))))).mean((2, 3))


def test_split_sizes_held_by_the_module_are_rewritten_and_pruning_is_exact():
    from tests.graph.test_exactness import check_exact

    graph = build_graph(MixNetBlock().eval(), torch.randn(1, 3, 8, 8))
    assert {(k[0], k[1], k[2]) for k in graph.attrs} == {("mixed", "splits", 0), ("mixed", "splits", 1)}
    check_exact(MixNetBlock(), torch.randn(2, 3, 8, 8), sparsity=0.5)
    model = MixNetBlock().eval()
    result = dpruner.prune(model, torch.randn(1, 3, 8, 8), sparsity=0.5)
    kept = [conv.out_channels for conv in model.mixed.convs]
    assert model.mixed.splits == kept and isinstance(model.mixed.splits, list) and kept[0] < 8 and kept[1] < 4
    assert [a["index"] for a in result.plan["attrs"]] == [0, 1]
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 6)


class LiteralSplit(MixedConv):
    def forward(self, x):
        pieces = torch.split(x, [8, 4], 1)  # the same sizes, written in the code: they cannot follow
        return torch.cat([conv(p) for conv, p in zip(self.convs, pieces)], 1)


def test_literal_split_sizes_still_pin_the_input():
    model = MixNetBlock().eval()
    model.mixed = LiteralSplit()
    index = channel_groups(build_graph(model, torch.randn(1, 3, 8, 8)))
    group = next(g for g in index.groups if ("pw", "out", None) in g.slots)
    assert not group.prunable and any("torch.split with fixed sizes [8, 4]" in r for r in group.reasons)
