"""Models beyond torchvision classification from the shell: video (Conv3d, C,T,H,W shapes) and timm entry points."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import invoke


def test_video_model_prunes_and_exports_with_a_c_t_h_w_shape(tmp_path):
    import torchvision

    torch.save(torchvision.models.video.r3d_18(num_classes=5).state_dict(), tmp_path / "r3d.pt")
    run = invoke("prune", "r3d.pt", "--arch", "torchvision:r3d_18", "--num-classes", "5", "--input-shape", "3,4,32,32",
                 "--ratio", "2x", "-o", "small.pt", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["input_shape"] == [1, 3, 4, 32, 32] and doc["ratio"]["macs"] == pytest.approx(2.0, rel=0.05)
    exported = invoke("export", "small.pt", "--onnx", "small.onnx", "--no-latency", "--json", cwd=tmp_path)
    assert exported.code == 0, exported.stderr  # the shape comes from the checkpoint
    assert json.loads(exported.stdout)["verification"]["passed"]
    bad = invoke("analyze", "r3d.pt", "--arch", "torchvision:r3d_18", "--num-classes", "5", "--input-shape", "3,4,32",
                 cwd=tmp_path)
    assert bad.code == 2 and "C,T,H,W" in bad.one_error_line()


def test_timm_arch_prunes_with_its_documented_input_size(tmp_path):
    timm = pytest.importorskip("timm", reason="timm (a test dependency) is not installed")
    torch.save(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).state_dict(), tmp_path / "e.pt")
    run = invoke("prune", "e.pt", "--arch", "timm:efficientnet_b0", "--num-classes", "10", "--ratio", "2x", "-o",
                 "small.pt", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["input_shape"] == [1, 3, 224, 224] and "timm default" in run.stderr
    assert doc["ratio"]["macs"] == pytest.approx(2.0, rel=0.05)  # BatchNormAct2d's functional norms are pruned
