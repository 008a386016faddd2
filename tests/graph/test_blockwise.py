"""Models whose own forward torch.fx cannot follow (a detector looping over images, a wrapper checking the input
size in Python): their largest traceable blocks are traced one by one with the inputs they received in a real
forward pass, pruned inside, and their inputs and outputs keep their channels."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.errors import EngineError
from dpruner.graph.check import Expected, check_pruned, expected_outputs
from dpruner.graph.summary import analyze_groups
from tests.graph.test_exactness import check_exact


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, stride=2)

    def forward(self, x):
        c2 = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return {"p2": c2, "p3": self.conv3(c2)}  # a dict of feature maps, like an FPN's


class Head(nn.Module):
    """Takes a list of feature maps and loops over it, like torchvision's RetinaNet heads."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                   nn.ReLU())
        self.cls = nn.Conv2d(16, 3, 1)

    def forward(self, features: list[torch.Tensor]):
        out = []
        for f in features:
            n, _, h, w = f.shape
            out.append(self.cls(self.tower(f)).view(n, 3, h * w))
        return torch.cat(out, dim=2)


class ToyDetector(nn.Module):
    """Python over the images and data-dependent filtering: torch.fx stops in this forward itself."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = Head()

    def forward(self, images):
        results = []
        for img in images:
            feats = self.backbone(img[None])
            logits = self.head(list(feats.values()))[0]
            scores, labels = logits.max(0)
            keep = scores > 0
            results.append({"scores": scores[keep], "labels": labels[keep]})
        return results


def test_a_detector_like_model_is_traced_block_by_block():
    graph, index = analyze_groups(ToyDetector().eval(), torch.randn(1, 3, 16, 16))
    assert graph.scopes == ["backbone", "head"]
    assert re.search(r"ToyDetector's own forward is untraceable at test_blockwise.py:\d+ `for img in images:`",
                     graph.opaque[""])
    reasons = {r for g in index.groups if not g.prunable for r in g.reasons}
    assert any("output of backbone" in r for r in reasons) and any("input of head" in r for r in reasons)


def test_blocks_are_pruned_inside_and_keep_their_boundaries():
    model = ToyDetector().eval()
    x = torch.randn(1, 3, 16, 16)
    result = dpruner.prune(model, x, sparsity=0.5)
    assert model.backbone.conv1.out_channels == 8 and model.head.tower[0].out_channels == 8
    assert model.head.tower[2].out_channels == 8
    # the channels crossing the untraced forward keep their width
    assert model.backbone.conv2.out_channels == 16 and model.backbone.conv3.out_channels == 16
    assert model.head.tower[0].in_channels == 16 and model.head.cls.out_channels == 3
    assert result.opaque[0]["module"] == "" and not result.opaque[0]["whole"]
    out = model(x)
    assert isinstance(out, list) and set(out[0]) == {"scores", "labels"}


def test_blockwise_pruning_is_exact():
    """The pruned detector equals the unpruned one with the removed channels zeroed (rows kept by the
    data-dependent filter included)."""
    check_exact(ToyDetector(), torch.randn(2, 3, 16, 16))


class Fussy(nn.Module):
    """A block fx stops in (Python control flow on values) holding traceable blocks."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 8, 3, padding=1))

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x) + x
        return self.inner(x)


class WithFussy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Fussy()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(F.relu(self.stem(x))).mean((2, 3)))


def test_an_opaque_block_is_split_into_its_traceable_blocks():
    model = WithFussy().eval()
    x = torch.randn(1, 3, 8, 8)
    result = dpruner.prune(model, x, sparsity=0.5)
    assert model.block.inner[0].out_channels == 8  # inside the opaque block: pruned
    assert model.stem.out_channels == 8 and model.block.inner[3].out_channels == 8  # its boundary: kept
    opaque = {o["module"]: o for o in result.opaque}
    assert "Fussy's own forward is untraceable" in opaque["block"]["reason"] and not opaque["block"]["whole"]
    assert model(x).shape == (1, 4)


def test_opaque_block_split_is_exact():
    check_exact(WithFussy(), torch.randn(2, 3, 8, 8))


def test_the_check_of_a_blockwise_model_frees_only_the_first_dim():
    model = ToyDetector().eval()
    x = torch.randn(1, 3, 16, 16)
    expected = expected_outputs(model, x, ["backbone", "head"])
    assert set(expected.blocks) == {"backbone", "head"}
    check_pruned(copy.deepcopy(model), x, expected)
    fewer_rows = Expected(expected.root, {**expected.blocks, "head": (7, 3, 80)})
    check_pruned(copy.deepcopy(model), x, fewer_rows)  # dim 0 may change, the others not:
    with pytest.raises(EngineError, match="block 'head' returns outputs of shape"):
        check_pruned(copy.deepcopy(model), x, Expected(expected.root, {**expected.blocks, "head": (1, 4, 80)}))
