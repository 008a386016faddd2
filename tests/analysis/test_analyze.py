"""analyze() on small models: rows, totals, shapes, mode restoration, JSON schema."""

from __future__ import annotations

import json

import torch
from torch import nn

from dpruner.analysis import analyze
from tests.metrics.test_macs import BN1, CONV1, CONV2, FC


def test_tiny_net_rows_and_totals(tiny):
    result = analyze(tiny, (1, 1, 7, 7))
    assert [(r.name, r.type) for r in result.layers] == [
        ("conv1", "Conv2d"), ("bn1", "BatchNorm2d"), ("conv2", "Conv2d"), ("fc", "Linear")]
    assert [r.macs for r in result.layers] == [CONV1, BN1, CONV2, FC]
    assert result.macs == sum(r.macs for r in result.layers) + result.other_macs
    assert result.other_macs == 0
    conv2 = result.layers[2]
    assert (conv2.in_channels, conv2.out_channels, conv2.groups, conv2.kernel, conv2.params) == (4, 6, 1, [3, 3], 216)
    assert conv2.output_shape == [1, 6, 3, 3] and conv2.calls == 1
    assert set(conv2.redundancy) == {"l1", "gm", "pca"}
    assert set(result.layers[1].redundancy) == {"gamma"}


def test_training_mode_is_restored(tiny):
    tiny.train()
    analyze(tiny, (1, 1, 7, 7))
    assert tiny.training and tiny.bn1.training


def test_shared_module_counts_calls_and_macs():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    result = analyze(Twice(), (1, 3, 4, 4))
    assert result.layers[0].calls == 2 and result.layers[0].macs == 2 * 3 * 3 * 16


def test_json_document_schema(tiny):
    doc = analyze(tiny, (1, 1, 7, 7), source={"path": "x.pt"}).to_json()
    doc = json.loads(json.dumps(doc))  # serialisable as is
    assert doc["schema"] == 1
    assert set(doc["model"]) >= {"params", "macs", "input_shape"}
    assert doc["model"]["input_shape"] == [1, 1, 7, 7]
    for layer in doc["layers"]:
        assert set(layer) >= {"name", "type", "in_channels", "out_channels", "params", "macs", "redundancy"}
    assert "pca.kNN" in doc["definitions"]


def test_most_redundant_ranks_a_low_rank_layer_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with torch.no_grad():  # layer 2's 16 filters span only 2 directions
        model[2].weight.copy_((torch.randn(16, 2) @ torch.randn(2, 16 * 9)).reshape(16, 16, 3, 3))
    result = analyze(model, (1, 3, 8, 8))
    assert result.most_redundant[0]["name"] == "2"
