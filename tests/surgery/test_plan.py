"""Plans are data: JSON-able, replayable on a fresh model through the checkpoint, and exportable to ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpruner.io import load_checkpoint, save_checkpoint
from dpruner.methods.api import prune
from dpruner.surgery.plan import apply_plan

torchvision = pytest.importorskip("torchvision")


def onnx_matches(model, x, tmp_path, atol=1e-4):
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    actual = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=1e-3)


def test_plan_is_json_and_replays(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    result = prune(model, x, ratio=2.0)
    plan = json.loads(json.dumps(result.plan))
    fresh = apply_plan(torchvision.models.resnet18(num_classes=10).eval(), plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_pruned_checkpoint_round_trip_with_weights_only(tmp_path):
    from dpruner.zoo import resnet20

    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    result = prune(model, x, ratio=2.0, method="fpgm")
    path = save_checkpoint(tmp_path / "p.pt", model, arch="dpruner.zoo:resnet20", input_shape=(1, 3, 32, 32),
                           plan=[result.plan])
    torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # option-A pads were rewritten: the shortcut became a traced module with the new widths
    assert type(loaded.model.layer2[0].shortcut).__name__.endswith("Pruned")
    onnx_matches(loaded.model, x, tmp_path)


def test_pruning_twice_stacks_plans(tmp_path):
    model = torchvision.models.mobilenet_v2(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    plans = [prune(model, x, ratio=1.5).plan]
    plans.append(prune(model, x, ratio=1.5).plan)
    path = save_checkpoint(tmp_path / "p.pt", model, arch="torchvision:mobilenet_v2", num_classes=5, plan=plans)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).model(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "resnet50", "densenet121", "mobilenet_v2",
                                  "efficientnet_b0", "convnext_tiny", "regnet_y_800mf", "googlenet"])
def test_pruned_torchvision_models_export_to_onnx(name, tmp_path):
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 224 if name.startswith("vgg") else 96  # the legacy exporter needs VGG's 7x7 pool to divide its input
    x = torch.randn(2, 3, size, size)
    prune(model, x, ratio=1.5)
    onnx_matches(model, x, tmp_path)
