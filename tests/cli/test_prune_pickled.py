"""A trusted pickle of a whole model (no architecture spec) is pruned and written back as the same kind of pickle,
so the program that wrote it (Ultralytics, a training script saving {'model': ..., 'ema': ..., 'optimizer': ...})
loads the pruned model with its own loader."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.cli.conftest import invoke

torchvision = pytest.importorskip("torchvision")


def _container(tmp_path, half: bool = False):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    ema = copy.deepcopy(model)
    if half:
        model, ema = model.half(), ema.half()
    path = tmp_path / "run.pt"
    torch.save({"model": model, "ema": ema, "optimizer": {"state": {0: torch.zeros(3)}}, "epoch": 7}, path)
    return path


def test_a_trusted_training_pickle_is_pruned_in_its_own_container(tmp_path):
    path = _container(tmp_path)
    out = tmp_path / "small.pt"
    run = invoke("prune", path, "--trust-checkpoint", "--input-shape", "3,64,64", "--ratio", "2x", "-o", out)
    assert run.code == 0, run.stderr
    saved = torch.load(out, weights_only=False)
    assert set(saved) == {"model", "ema", "optimizer", "epoch", "dpruner"}
    assert saved["epoch"] == 7 and saved["optimizer"] is None  # optimizer state no longer fits the shapes
    assert saved["model"].conv1.out_channels < 64 and saved["ema"].conv1.out_channels < 64
    assert saved["dpruner"]["input_shape"] == [1, 3, 64, 64] and saved["dpruner"]["plan"]
    with torch.no_grad():
        assert saved["model"](torch.randn(2, 3, 64, 64)).shape == (2, 4)
    again = invoke("analyze", out, "--trust-checkpoint", "--json")  # the input shape is read back from 'dpruner'
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["model"]["input_shape"] == [1, 3, 64, 64]
    untrusted = invoke("prune", out, "--input-shape", "3,64,64", "--ratio", "2x", "-o", tmp_path / "x.pt")
    assert untrusted.code == 2 and "--trust-checkpoint" in untrusted.one_error_line()


def test_a_half_precision_pickle_is_pruned_in_float_and_written_back_in_half(tmp_path):
    path = _container(tmp_path, half=True)
    out = tmp_path / "small.pt"
    run = invoke("prune", path, "--trust-checkpoint", "--input-shape", "3,64,64", "--ratio", "2x", "-o", out)
    assert run.code == 0, run.stderr
    saved = torch.load(out, weights_only=False)
    assert saved["model"].conv1.weight.dtype == torch.float16


@pytest.mark.slow
def test_an_ultralytics_checkpoint_loads_back_in_ultralytics(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics (a bench dependency, "
                                                                "bench/requirements-nodeps.txt) is absent")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False)
    path = tmp_path / "yolov8n.pt"
    torch.save({"model": model.half(), "train_args": {}, "epoch": -1}, path)
    out = tmp_path / "small.pt"
    run = invoke("prune", path, "--trust-checkpoint", "--input-shape", "3,320,320", "--ratio", "2x", "-o", out)
    assert run.code == 0, run.stderr
    pruned, ckpt = tasks.load_checkpoint(str(out))  # Ultralytics' own loader
    assert "dpruner" in ckpt and sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(
        p.numel() for p in model.parameters())
    with torch.no_grad():
        y = pruned.float().eval()(torch.randn(1, 3, 320, 320))
    assert y[0].shape == (1, 84, 2100)  # the Detect head's outputs are unchanged
