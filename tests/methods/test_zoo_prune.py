"""Models whose own forward torch.fx cannot follow, from the zoos users bring: torchvision's detectors (a Python
loop over the images, anchor matching, NMS), segmentation-models-pytorch's FPN/DeepLabV3+/PSPNet (an input-size
check in Python) and Ultralytics YOLO (a layer list walked in Python). Each prunes to 2x MACs through the
block-by-block fallback, and its outputs keep their structure (a detector's number of boxes depends on the
weights, so only the first dim of its tensors may change). Slow: ~1.5 min on 2 cores."""

from __future__ import annotations

import pytest
import torch

import dpruner
from dpruner.graph.check import _loose, output_signature

torchvision = pytest.importorskip("torchvision")

DETECTORS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn",
             "fcos_resnet50_fpn"]


def _prunes_to_half(model, x, loose: bool):
    with torch.no_grad():
        before = output_signature(model(x))
    result = dpruner.prune(model, x, ratio=2.0)
    assert result.target_met and result.ratio["macs"] == pytest.approx(2.0, rel=0.05)
    assert result.opaque and result.opaque[0]["module"] == "" and not result.opaque[0]["whole"]
    with torch.no_grad():
        after = output_signature(model(x))
    assert (_loose(after) == _loose(before)) if loose else after == before
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS)
def test_torchvision_detectors_prune_to_half_the_macs(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5).eval()
    result = _prunes_to_half(model, torch.randn(1, 3, 320, 320), loose=True)
    assert result.prunable_macs_share > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["FPN", "DeepLabV3Plus", "PSPNet"])
def test_smp_models_with_an_input_check_prune_to_half_the_macs(arch):
    smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation-models-pytorch (a bench "
                                                                   "dependency, bench/requirements.txt) is absent")
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name="resnet34", encoder_weights=None, classes=2).eval()
    _prunes_to_half(model, torch.randn(1, 3, 256, 256), loose=False)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_yolo_prunes_to_half_the_macs(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics (a bench dependency, "
                                                                "bench/requirements-nodeps.txt) is absent")
    torch.manual_seed(0)
    model = tasks.DetectionModel(cfg, verbose=False).eval()
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        before = output_signature(model(x))
    result = dpruner.prune(model, x, ratio=2.0)
    assert result.target_met and result.ratio["macs"] == pytest.approx(2.0, rel=0.05)
    head = f"model.{len(model.model) - 1}"  # the Detect head: its forward stops fx, its conv towers are traced
    assert [(o["module"], o["whole"]) for o in result.opaque] == [(head, False)]
    assert result.opaque[0]["reason"].startswith("Detect's own forward is untraceable")
    with torch.no_grad():
        assert output_signature(model(x)) == before  # the head's outputs: same structure and shapes
