"""`dpruner export --torch FILE.pt2`: a torch.export program with a dynamic batch, verified after loading it back,
that runs where neither dpruner nor the model's code can be imported."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import torch
import torchvision

import dpruner
from dpruner.export import api
from dpruner.export.api import export_torch_program
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")


def dp(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_pruned_torchvision_model_round_trips_without_dpruner_or_torchvision(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    dpruner.prune(model, torch.randn(1, 3, 64, 64), ratio=2.0)
    path = tmp_path / "small.pt2"
    result = export_torch_program(model, (1, 3, 64, 64), path)
    assert result.written and result.verification.passed and result.info.dynamic_batch
    assert result.verification.batch_sizes == [1, 8] and result.verification.runtime == "torch.export"
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    # A fresh interpreter in an empty folder where `import dpruner` and `import torchvision` fail: only torch loads
    # and runs the program, at a batch size it was not traced with.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dpruner"] = None
        sys.modules["torchvision"] = None
        try:
            import dpruner
        except ImportError:
            pass
        else:
            raise SystemExit("dpruner was importable")
        import torch
        program = torch.export.load({str(path)!r}).module()
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        with torch.no_grad():
            y = program(io["x"])
        print(float((y - io["y"]).abs().max()), tuple(y.shape))
    """)
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    diff, shape = proc.stdout.split(" ", 1)
    assert float(diff) <= 1e-4 and shape.strip() == "(5, 10)"


def test_a_program_that_differs_from_the_model_is_not_written(tmp_path, monkeypatch):
    model = torchvision.models.resnet18(num_classes=10).eval()
    real = api.export_program

    def wrong(m, *args, **kwargs):  # exports a model whose last layer is off by 1
        other = copy.deepcopy(m)
        with torch.no_grad():
            other.fc.bias += 1.0
        return real(other, *args, **kwargs)

    monkeypatch.setattr(api, "export_program", wrong)
    result = export_torch_program(model, (1, 3, 32, 32), tmp_path / "bad.pt2")
    assert not result.verification.passed and not result.written and not (tmp_path / "bad.pt2").exists()
    assert result.verification.failure().startswith("the exported program's outputs differ from PyTorch's")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind either


def test_cli_writes_onnx_and_pt2_side_by_side_and_reports_both(tmp_path):
    small = tmp_path / "small.pt"
    assert dp("prune", VGG, "--ratio", "2x", "-o", str(small)).returncode == 0
    proc = dp("export", str(small), "--torch", str(tmp_path / "s.pt2"), "--onnx", str(tmp_path / "s.onnx"),
              "--data", "digits", "--no-latency", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    program = doc["torch_export"]
    assert program["written"] and program["dynamic_batch"] and program["verification"]["passed"]
    assert program["verification"]["real_data"] and program["file_bytes"] == (tmp_path / "s.pt2").stat().st_size
    assert doc["verification"]["passed"] and (tmp_path / "s.onnx").is_file()
    only = dp("export", str(small), "--torch", str(tmp_path / "t.pt2"), "--no-latency", "--json")
    assert only.returncode == 0, only.stderr
    assert json.loads(only.stdout)["onnx"] is None and (tmp_path / "t.pt2").is_file()
    neither = dp("export", str(small), "--no-latency")
    assert neither.returncode == 2 and "--onnx" in neither.stderr and "--torch" in neither.stderr
    same = dp("export", str(small), "--torch", str(small), "--no-latency")
    assert same.returncode == 2 and small.stat().st_size > 0
