"""Per-group sensitivity: one curve per coupled group (a residual stream is one curve), the Lagrangian allocation
that spends the cut where the curves say it costs least, and the cache keyed by model hash and settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.errors import InputError
from dpruner.methods.oneshot import Allocation, _sensitivity_cut
from dpruner.methods.sensitivity import cache_dir, measure_sensitivity, model_hash


class HalfDead(nn.Module):
    """conv_a's channels 4..31 have small filters and conv_b ignores them (zero weights): removing them (the first
    28 an l1 cut takes) changes nothing. Every conv_b channel feeds the classifier."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_a = nn.Conv2d(3, 32, 3, padding=1)
        self.conv_b = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.conv_a.weight.copy_(torch.randn(32, 3, 3, 3, generator=gen))
            self.conv_a.weight[4:] *= 0.01
            self.conv_b.weight.copy_(torch.randn(16, 32, 3, 3, generator=gen))
            self.conv_b.weight[:, 4:] = 0
            self.fc.weight.copy_(torch.randn(4, 16, generator=gen))
            for layer in (self.conv_a, self.conv_b, self.fc):  # every instance identical
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))

    def forward(self, x):
        return self.fc(F.relu(self.conv_b(F.relu(self.conv_a(x)))).mean((2, 3)))


class Residual(nn.Module):
    """stem -> two residual blocks on one 8-channel stream -> classifier: the stream is one group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.a2(F.relu(self.a1(x))))
        x = F.relu(x + self.b2(F.relu(self.b1(x))))
        return self.fc(x.mean((2, 3)))


def _labelled(model: nn.Module, n: int = 4, seed: int = 1):
    """Random images labelled by the model itself: the unpruned model scores 100%, so any damage shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = []
        for _ in range(n):
            x = torch.randn(16, 3, 8, 8, generator=gen)
            out.append((x, model(x).argmax(1)))
    return out


def test_one_curve_per_group_the_stream_included_and_the_model_untouched():
    torch.manual_seed(0)
    model = Residual().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scan = measure_sensitivity(model, torch.randn(1, 3, 8, 8), _labelled(model), criterion="l1", batches=4,
                               use_cache=False)
    assert sorted(g.layers[0] for g in scan.groups) == ["a1", "b1", "stem"]
    stream = next(g for g in scan.groups if g.layers[0] == "stem")
    assert {"a2", "b2", "fc"} <= set(stream.layers)  # the residual stream is one curve
    assert scan.base_accuracy == 1.0 and scan.samples == 64
    for g in scan.groups:
        assert g.fractions == sorted(g.fractions) and len(g.accuracy) == len(scan.levels) == 9
        assert all(0 <= f < 1 for f in g.fractions) and g.fractions[-1] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_harmless_cut_costs_nothing_and_the_allocation_spends_the_budget_there():
    model = HalfDead().eval()
    data = _labelled(model)
    scan = measure_sensitivity(model, torch.randn(1, 3, 8, 8), data, criterion="l1", batches=4, use_cache=False)
    by_layer = {g.layers[0]: g for g in scan.groups}
    harmless, vital = by_layer["conv_a"], by_layer["conv_b"]
    curve = dict(zip(harmless.fractions, harmless.loss))
    assert curve[28 / 32] == pytest.approx(scan.base_loss, abs=1e-6)  # 28 dead channels of 32: no change
    assert vital.loss[-1] > scan.base_loss + 0.05  # cutting into conv_b hurts
    pruned = dpruner.prune(HalfDead().eval(), torch.randn(1, 3, 8, 8), ratio=1.8, method="l1",
                           allocation="sensitivity", sensitivity=scan)
    uniform = dpruner.prune(HalfDead().eval(), torch.randn(1, 3, 8, 8), ratio=1.8, method="l1")
    assert pruned.target_met and pruned.model.conv_b.out_channels == 16  # the whole cut lands on conv_a
    assert 4 <= pruned.model.conv_a.out_channels < 32
    assert uniform.model.conv_b.out_channels < 16  # uniform cuts the vital group too
    with torch.no_grad():
        x = torch.cat([x for x, _ in data])
        assert torch.allclose(pruned.model(x), model(x), atol=1e-5)  # the sensitivity plan changed nothing
    assert pruned.sensitivity["cached"] is False and pruned.allocation == "sensitivity"


def test_the_cut_minimises_increase_minus_lambda_times_saving():
    curves = {0: (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.1, 1.0]))}
    alloc = Allocation("sensitivity", max_fraction=0.99, curves=curves, savings={0: 0.5})
    # lambda = level / (1 - level); objective = increase - lambda * fraction * 0.5
    assert _sensitivity_cut(10, alloc, 0, 0.0) == 0  # lambda 0: no cut is free
    assert _sensitivity_cut(10, alloc, 0, 0.5) == 5  # lambda 1: [0, -0.15, 0.5] -> half
    assert _sensitivity_cut(10, alloc, 0, 0.9) == 10  # lambda 9: [0, -2.15, -3.5] -> all (capped later)
    assert _sensitivity_cut(10, alloc, 1, 0.9) == 0  # a group without a curve keeps everything


def test_curves_are_made_monotone_so_a_noisy_dip_never_attracts_a_deeper_cut():
    model = HalfDead().eval()
    scan = measure_sensitivity(model, torch.randn(1, 3, 8, 8), _labelled(model), criterion="l1", batches=2,
                               use_cache=False)
    scan.groups[0].loss = [scan.base_loss + d for d in (0.5, 0.1, 0.6, 0.2, 0.7, 0.7, 0.8, 0.9, 1.0)]
    _, increase = scan.curves()[scan.groups[0].group]
    assert list(increase[:4]) == pytest.approx([0.0, 0.5, 0.5, 0.6])


def test_results_are_cached_by_model_hash_and_settings():
    model = HalfDead().eval()
    data = _labelled(model)
    example = torch.randn(1, 3, 8, 8)
    first = measure_sensitivity(model, example, data, criterion="l1", batches=2, data_key="d")
    files = list((cache_dir() / "sensitivity").glob("*.json"))
    assert not first.cached and [f.stem for f in files] == [first.key]
    again = measure_sensitivity(model, example, data, criterion="l1", batches=2, data_key="d")
    assert again.cached and again.to_json() | {"cached": False} == first.to_json()
    other_criterion = measure_sensitivity(model, example, data, criterion="l2", batches=2, data_key="d")
    other_data = measure_sensitivity(model, example, data, criterion="l1", batches=2, data_key="e")
    assert not other_criterion.cached and not other_data.cached and other_data.key != first.key
    changed = HalfDead().eval()
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    assert model_hash(changed) != model_hash(model)
    assert not measure_sensitivity(changed, example, data, criterion="l1", batches=2, data_key="d").cached
    files[0].write_text("{not json")  # a damaged cache file is measured again and rewritten, never an error
    rescued = measure_sensitivity(model, example, data, criterion="l1", batches=2, data_key="d")
    assert not rescued.cached and json.loads(files[0].read_text())["sensitivity"]["key"] == first.key


def test_prune_measures_on_held_out_data_and_refuses_what_it_cannot_do():
    model = HalfDead().eval()
    data = _labelled(model)
    with pytest.raises(InputError, match="held-out data"):
        dpruner.prune(HalfDead().eval(), torch.randn(1, 3, 8, 8), ratio=2.0, allocation="sensitivity")
    with pytest.raises(InputError, match="not --sparsity"):
        dpruner.prune(HalfDead().eval(), torch.randn(1, 3, 8, 8), sparsity=0.5, allocation="sensitivity",
                      val_data=data)
    result = dpruner.prune(model, torch.randn(1, 3, 8, 8), ratio=1.8, method="l1", allocation="sensitivity",
                           val_data=data, sensitivity_batches=2, data_key="k")
    assert result.target_met and result.sensitivity["samples"] == 32
    again = dpruner.prune(HalfDead().eval(), torch.randn(1, 3, 8, 8), ratio=1.8, method="l1",
                          allocation="sensitivity", val_data=data, sensitivity_batches=2, data_key="k")
    assert again.sensitivity["cached"] and again.plan == result.plan


def test_levels_and_batches_are_checked():
    model = HalfDead().eval()
    with pytest.raises(InputError, match="between 0 and 1"):
        measure_sensitivity(model, torch.randn(1, 3, 8, 8), _labelled(model), levels=(0.5, 1.0))
    with pytest.raises(InputError, match="positive"):
        measure_sensitivity(model, torch.randn(1, 3, 8, 8), _labelled(model), batches=0)
