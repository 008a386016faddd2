"""The method registry (methods/run.py): how --method/--criterion resolve, and run()'s one result shape."""

from __future__ import annotations

import json

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
