"""dpruner.prune on the sample models and small nets: targets, allocations, options, determinism, errors."""

from __future__ import annotations

import json

import pytest
import torch

from dpruner.errors import InputError
from dpruner.io import load_checkpoint
from dpruner.methods.api import parse_ratio, prune
from tests.conftest import SAMPLE_MODELS


def sample(name="digits_resnet"):
    loaded = load_checkpoint(SAMPLE_MODELS / f"{name}.pt")
    return loaded.model, torch.randn(*loaded.input_shape)


@pytest.mark.parametrize("method", ["l1", "l2", "fpgm", "bn", "random"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_ratio_is_reached_within_five_percent(method, allocation):
    model, x = sample()
    result = prune(model, x, ratio=2.0, method=method, allocation=allocation)
    assert result.target_met and 1.9 <= result.ratio["macs"] <= 2.1
    assert model(x).shape == (1, 10)


def test_params_target_on_vgg():
    model, x = sample("digits_vgg")
    result = prune(model, x, ratio=3.0, target="params", method="fpgm")
    assert result.target_met and abs(result.ratio["params"] / 3.0 - 1) <= 0.05


def test_sparsity_removes_that_share_of_each_group():
    model, x = sample()
    result = prune(model, x, sparsity=0.5)
    for g in result.groups:
        assert g["kept"] == g["channels"] - int(0.5 * g["channels"])


def test_round_to_and_exclude():
    model, x = sample()
    result = prune(model, x, sparsity=0.3, round_to=8, exclude=("layer1.0.*",))
    assert all(g["kept"] % 8 == 0 for g in result.groups if g["kept"] < g["channels"])
    assert model.layer1[0].conv1.out_channels == 32  # protected
    assert any("protected by --exclude" in r for u in result.unprunable for r in u["reasons"])


def test_same_call_gives_identical_plans():
    plans = []
    for _ in range(2):
        model, x = sample()
        plans.append(json.dumps(prune(model, x, ratio=2.0, method="random", seed=3).plan, sort_keys=True))
    assert plans[0] == plans[1]


def test_unreachable_ratio_is_reported_not_hidden():
    model, x = sample()
    result = prune(model, x, ratio=1000.0)
    assert not result.target_met and result.ratio["macs"] < 1000


def test_model_is_pruned_in_place_and_mode_restored():
    model, x = sample()
    model.train()
    conv = model.layer1[0].conv1
    prune(model, x, ratio=2.0)
    assert model.layer1[0].conv1 is conv and conv.out_channels < 32 and model.training


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"), ({"ratio": 2.0, "sparsity": 0.1}, "exactly one"), ({"ratio": 0.5}, "greater than 1"),
    ({"sparsity": 1.5}, "between 0 and 1"), ({"ratio": 2.0, "target": "flops"}, "--target"),
    ({"ratio": 2.0, "method": "magic"}, "Unknown method"), ({"ratio": 2.0, "allocation": "x"}, "Unknown allocation"),
])
def test_bad_arguments(kwargs, match):
    model, x = sample()
    with pytest.raises(InputError, match=match):
        prune(model, x, **kwargs)


def test_parse_ratio():
    assert parse_ratio("2x") == 2.0 and parse_ratio("1.5X") == 1.5 and parse_ratio(" 3 ") == 3.0
    for bad in ("x", "0.5x", "1", "two"):
        with pytest.raises(InputError):
            parse_ratio(bad)


def test_prunable_macs_share_says_how_much_of_the_model_pruning_can_reach():
    from tests.hostile import split_net

    vgg = load_checkpoint(SAMPLE_MODELS / "digits_vgg.pt").model
    assert prune(vgg, torch.randn(1, 1, 8, 8), sparsity=0.3).prunable_macs_share == pytest.approx(1.0)
    # torch.split with fixed sizes pins conv's outputs: a and b can lose outputs, conv cannot
    partial = prune(split_net(), torch.randn(1, 1, 8, 8), sparsity=0.3).prunable_macs_share
    assert 0 < partial < 1
