"""The method registry (methods/run.py): how --method/--criterion resolve, and run()'s one result shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dpruner
from dpruner.data.loaders import load_data
from dpruner.errors import InputError
from dpruner.methods.run import METHODS, MethodResult, OneShotConfig, resolve, run
from dpruner.methods.tolerance import ToleranceConfig
from dpruner.train.config import TrainConfig
from tests.conftest import SAMPLE_MODELS


@pytest.mark.parametrize("method, criterion, tolerance, expected", [
    (None, None, False, ("one-shot", "l2")),
    (None, None, True, ("tolerance", "l1")),  # Play-and-Prune scores by L1
    ("l1", None, False, ("one-shot", "l1")),  # a criterion in --method: the old spelling still works
    ("fpgm", "fpgm", False, ("one-shot", "fpgm")),
    ("taylor", None, True, ("tolerance", "taylor")),
    (None, "taylor", True, ("tolerance", "taylor")),
    ("pca-gm", None, False, ("pca-gm", "fpgm")),  # PCA widths, geometric-median survivors
    ("one-shot", "bn", False, ("one-shot", "bn")),
])
def test_resolve(method, criterion, tolerance, expected):
    assert resolve(method, criterion, tolerance=tolerance) == expected


@pytest.mark.parametrize("method, criterion, tolerance, message", [
    ("l1", "fpgm", False, "give the criterion once"),
    ("tolerance", None, False, "give --tolerance"),
    ("one-shot", None, True, "not to a --tolerance"),
    ("pca-gm", "l1", False, "use --allocation pca"),
    (None, "pca-gm", False, "pca-gm is a method"),
    ("bogus", None, False, "Unknown method 'bogus'; choose one of one-shot"),
    (None, "bogus", False, "bogus"),
    (None, "", False, "Unknown"),  # an empty value is not the default
    ("", None, False, "Unknown method ''"),
])
def test_resolve_refuses_with_one_sentence(method, criterion, tolerance, message):
    with pytest.raises(InputError, match=message):
        resolve(method, criterion, tolerance=tolerance)


def test_every_method_declares_what_it_needs():
    for method in METHODS.values():
        assert method.goals and method.summary and method.how
        assert method.needs <= {"data", "training"}
    assert METHODS["tolerance"].needs == {"data", "training"} and not METHODS["one-shot"].needs


def test_one_shot_is_dpruner_prune_with_one_result_shape():
    """run('one-shot') cuts exactly what dpruner.prune cuts, leaves its input alone, and returns plain JSON."""
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    example = torch.randn(1, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run("one-shot", model, example, OneShotConfig(ratio=2.0, criterion="fpgm"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    direct = dpruner.prune(model, example, ratio=2.0, method="fpgm")  # (prunes `model` in place)
    assert isinstance(result, MethodResult) and result.plans == [direct.plan]
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["method"] == "one-shot" and doc["criterion"] == "fpgm" and doc["target_met"] is True
    assert doc["ratio"]["macs"] >= 2.0 and doc["history"] == [] and doc["epochs_used"] == 0.0
    assert "accuracy" not in doc["after"]  # no data: nothing measured


def test_run_checks_config_type_and_needs():
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    with pytest.raises(TypeError, match="takes a ToleranceConfig"):
        run("tolerance", model, torch.randn(1, 1, 8, 8), OneShotConfig(ratio=2.0))
    with pytest.raises(InputError, match="reads data"):
        run("pca-gm", model, torch.randn(1, 1, 8, 8), OneShotConfig(ratio=2.0))
    with pytest.raises(InputError, match="training configuration"):
        run("tolerance", model, torch.randn(1, 1, 8, 8), ToleranceConfig(tolerance=0.01),
            data=load_data("digits", batch_size=128))


def test_one_shot_with_data_fine_tunes_and_measures_both_splits():
    data = load_data("digits", batch_size=128, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    result = run("one-shot", model, torch.randn(1, 1, 8, 8), OneShotConfig(ratio=2.0, criterion="taylor"),
                 data=data, train=TrainConfig(epochs=1, lr=0.01))
    assert result.epochs_used == pytest.approx(1.0)
    for side in (result.before, result.after):
        assert 0.0 < side["accuracy"] <= 1.0 and 0.0 < side["test_accuracy"] <= 1.0
    assert result.after["accuracy"] > 0.5  # digits: one epoch brings a 2x-pruned VGG well above chance (0.1)


def test_soft_pruning_zeroes_lets_channels_regrow_and_ends_removed():
    """--soft (FPGM's schedule): between intervals only the filters are zeroed, so gradient reaches them through
    the norm (beta > 0 passes the ReLU) and they regrow; a run ends at the planned ratio."""
    from torch import nn

    from dpruner.criteria.views import channel_parameters
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.soft import lowest, zero_channels
    from dpruner.train.loop import fit
    from tests.methods.test_spp import Bundle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].bias.fill_(0.5)
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    group = next(g for g in index.groups if g.prunable)
    flags = lowest(index, {group.id: np.arange(8.0)}, {group.id: 3})
    zero_channels(model, graph, index, flags, final=False)
    filters = [(t, d, i) for t, d, i in channel_parameters(model, graph, index, flags) if t is model[0].weight]
    assert float(filters[0][0].detach().index_select(0, filters[0][2]).abs().sum()) == 0
    assert float(model[1].bias.detach()[torch.tensor([0, 1, 2])].abs().min()) > 0  # the norm keeps beta
    fit(model, Bundle(), TrainConfig(epochs=1, lr=0.1, quiet=True, distill_alpha=0))
    assert float(filters[0][0].detach().index_select(0, filters[0][2]).abs().sum()) > 0  # regrown
    zero_channels(model, graph, index, flags)  # the final round: the norm's affine too
    assert float(model[1].bias.detach()[torch.tensor([0, 1, 2])].abs().sum()) == 0

    data = load_data("digits", batch_size=128, val_from="test")
    example = torch.randn(1, 1, 8, 8)
    result = run("one-shot", dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), example,
                 OneShotConfig(ratio=2.0, criterion="fpgm", soft=True, soft_every=0.25), data=data,
                 train=TrainConfig(epochs=1, lr=0.01, quiet=True))
    assert result.details["soft"]["rounds"] >= 4 and result.ratio["macs"] == pytest.approx(2.0, rel=0.05)
    assert result.after["accuracy"] > 0.5
    # the last 20% of the budget fine-tunes the removed model (the final round zeroes the norms' beta too)
    assert result.details["soft"]["final_epochs"] == pytest.approx(0.2, abs=0.1)
    assert result.epochs_used == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match="--soft"):
        run("one-shot", dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), example,
            OneShotConfig(ratio=2.0, criterion="taylor", soft=True), data=data, train=TrainConfig(epochs=1))


def test_soft_removal_is_exact():
    """What soft fine-tuning leaves zeroed, removal drops without changing outputs."""
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.api import score_groups
    from dpruner.methods.soft import lowest, zero_channels
    from dpruner.surgery.plan import apply_plan, make_plan

    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt").eval()
    x = torch.randn(5, 1, 8, 8)
    graph, index = analyze_groups(model, x[:1])
    scores = score_groups(model, graph, index, "fpgm")
    flags = lowest(index, scores, {g.id: len(g.channels) // 2 for g in index.groups if g.prunable})
    zero_channels(model, graph, index, flags)
    with torch.no_grad():
        zeroed = model(x)
    apply_plan(model, make_plan(graph, index, index.roots[flags]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed, atol=1e-5, rtol=1e-5)
