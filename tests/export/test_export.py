"""Export: a verified ONNX file at two batch sizes and on real data, atomic writing, exit 3 on a failed
verification (file kept only on request), static batch, onnxslim simplification, the dynamo exporter refused
cleanly when it cannot run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import dpruner
from dpruner.errors import InputError
from dpruner.export.api import export_model
from dpruner.export.verify import verify_onnx
from dpruner.zoo import resnet20
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")


def dp(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def pruned_resnet20():
    torch.manual_seed(0)
    model = resnet20().eval()
    dpruner.prune(model, torch.randn(1, 3, 32, 32), ratio=2.0)
    return model


def test_export_verifies_at_two_batch_sizes_with_a_dynamic_batch(pruned_resnet20, tmp_path):
    out = tmp_path / "r20.onnx"
    result = export_model(pruned_resnet20, (1, 3, 32, 32), out)
    assert result.written and out.is_file() and result.verification.passed
    v = result.verification
    assert v.batch_sizes == [1, 8] and v.samples == 9 and v.top1_agreement == 1.0 and v.max_abs_diff < 1e-4
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.info.opset == 17 and result.info.exporter == "torchscript"
    assert [p.name for p in tmp_path.iterdir()] == ["r20.onnx"]  # no temporary files left


def test_static_batch_and_simplify(pruned_resnet20, tmp_path):
    out = tmp_path / "s.onnx"
    result = export_model(pruned_resnet20, (2, 3, 32, 32), out, dynamic_batch=False, simplify=True)
    assert result.written and result.verification.batch_sizes == [2]
    assert result.info.simplified and result.info.simplifier.startswith("onnxslim")
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_a_wrong_file_fails_verification(pruned_resnet20, tmp_path):
    """Verification compares with the live model: perturb the model after exporting and it must notice."""
    out = tmp_path / "m.onnx"
    export_model(pruned_resnet20, (1, 3, 32, 32), out)
    other = resnet20().eval()  # different weights
    verification = verify_onnx(other, out, (1, 3, 32, 32))
    assert not verification.passed and verification.max_abs_diff > 1e-3


def test_failed_verification_discards_the_file_unless_kept(pruned_resnet20, tmp_path, monkeypatch):
    import dpruner.export.api as api

    real = api.verify_onnx

    def strict(*args, **kwargs):
        kwargs["atol"], kwargs["rtol"] = 0.0, 0.0  # any float difference fails
        result = real(*args, **kwargs)
        result.max_abs_diff, result.within = max(result.max_abs_diff, 1e-3), False
        return result

    monkeypatch.setattr(api, "verify_onnx", strict)
    gone = export_model(pruned_resnet20, (1, 3, 32, 32), tmp_path / "a.onnx")
    assert not gone.written and not (tmp_path / "a.onnx").exists() and list(tmp_path.iterdir()) == []
    kept = export_model(pruned_resnet20, (1, 3, 32, 32), tmp_path / "b.onnx", keep_on_failure=True)
    assert kept.written and (tmp_path / "b.onnx").exists()


def test_never_overwrites_an_input(tmp_path):
    with pytest.raises(InputError, match="Refusing to overwrite"):
        export_model(resnet20(), (1, 3, 32, 32), tmp_path / "m.pt", inputs=[tmp_path / "m.pt"])


def test_cli_exit_3_on_verification_failure_and_json(tmp_path):
    out = tmp_path / "v.onnx"
    proc = dp("export", VGG, "--onnx", str(out), "--atol", "0", "--rtol", "0", "--no-latency", "--json")
    doc = json.loads(proc.stdout)
    if doc["verification"]["max_abs_diff"] == 0.0:
        pytest.skip("ONNX Runtime matched PyTorch bit for bit on this machine: atol 0 cannot fail")
    assert proc.returncode == 3 and not out.exists() and "no file was written" in proc.stderr
    assert doc["verification"]["passed"] is False and doc["onnx"]["written"] is False
    kept = dp("export", VGG, "--onnx", str(out), "--atol", "0", "--rtol", "0", "--no-latency", "--keep-on-failure",
              "--json")
    assert kept.returncode == 3 and out.exists()


def test_cli_export_with_real_data_verification(tmp_path):
    out = tmp_path / "v.onnx"
    proc = dp("export", VGG, "--onnx", str(out), "--data", "digits", "--no-latency", "--json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads(proc.stdout)["verification"]
    assert v["real_data"] and v["samples"] == 9 + 359 and v["top1_agreement"] == 1.0


def test_static_batch_export_still_reports_latency_at_every_batch_size(tmp_path):
    out = tmp_path / "s.onnx"
    proc = dp("export", VGG, "--onnx", str(out), "--static-batch", "--batches", "1,4", "--threads", "1", "--json",
              "--markdown", str(tmp_path / "r.md"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["onnx"]["dynamic_batch"] is False and doc["after"]["file_bytes"]["onnx"] == out.stat().st_size
    assert sorted(doc["after"]["latency_ms"]["onnxruntime"]) == ["1", "4"]


def test_markdown_may_not_overwrite_the_onnx_file(tmp_path):
    out = tmp_path / "s.onnx"
    proc = dp("export", VGG, "--onnx", str(out), "--markdown", str(out), "--no-latency")
    assert proc.returncode == 2 and "Refusing to overwrite" in proc.stderr and not out.exists()


def _nan_checkpoint(tmp_path, factory: str) -> str:
    import dpruner
    from tests import hostile

    model = getattr(hostile, factory)()
    path = tmp_path / f"{factory}.pt"
    dpruner.save_checkpoint(path, model, arch=f"{ROOT / 'tests' / 'hostile.py'}:{factory}", input_shape=(1, 1, 8, 8))
    return str(path)


def test_nan_outputs_on_one_side_fail_verification(tmp_path):
    """NaN weights: PyTorch outputs NaN, ONNX Runtime's ReLU/MaxPool make them finite -> exit 3, nothing written
    (the old check dropped NaN differences and passed with max abs diff 0)."""
    from tests.cli.conftest import invoke

    model = _nan_checkpoint(tmp_path, "nan_relu")
    run = invoke("export", model, "--onnx", "n.onnx", "--no-latency", "--json", "--arch",
                 f"{ROOT / 'tests' / 'hostile.py'}:nan_relu", cwd=tmp_path)
    assert run.code == 3, run.stderr
    doc = json.loads(run.stdout)["verification"]
    assert doc["passed"] is False and doc["nonfinite_agree"] is False
    assert doc["nonfinite"]["torch"] > 0 and doc["nonfinite"]["onnxruntime"] == 0
    assert "PyTorch produces" in run.stderr and "non-finite" in run.stderr
    assert not (tmp_path / "n.onnx").exists()


def test_nan_outputs_on_both_sides_at_the_same_places_pass_and_are_reported(tmp_path):
    from tests.cli.conftest import invoke

    model = _nan_checkpoint(tmp_path, "all_nan")
    run = invoke("export", model, "--onnx", "n.onnx", "--no-latency", "--arch",
                 f"{ROOT / 'tests' / 'hostile.py'}:all_nan", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "Both runtimes produce the same 90 non-finite outputs" in run.stdout.replace("\n", " ")


def test_compare_outputs_rules():
    from dpruner.export.verify import Verification, compare_outputs

    def check(expected, got):
        result = Verification(atol=1e-4)
        compare_outputs(np.array(expected, dtype=np.float32), np.array(got, dtype=np.float32), result)
        return result

    assert check([1.0, np.nan], [1.0, np.nan]).passed  # same NaN, same place
    assert check([np.inf, 2.0], [np.inf, 2.0]).passed
    assert not check([np.inf, 2.0], [-np.inf, 2.0]).passed  # opposite infinities
    assert not check([np.nan, 2.0], [2.0, np.nan]).passed  # NaN at different places
    mixed = check([np.nan, 1.0], [0.5, 1.0])
    assert not mixed.passed and "PyTorch produces 1 non-finite" in mixed.failure()
    assert check([1.0, 2.0], [1.0, 2.00001]).passed and not check([1.0, 2.0], [1.0, 2.1]).passed


class SegNet(torch.nn.Module):
    """A segmentation-style model: a dict of a per-pixel class map and an auxiliary head, like torchvision's."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 5, 1)
        self.aux = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = torch.relu(self.body(x))
        return {"out": self.out(y), "aux": self.aux(y)}


def test_dict_outputs_are_named_exported_and_each_verified(tmp_path):
    import onnxruntime as ort

    model = SegNet().eval()
    result = export_model(model, (1, 3, 16, 16), tmp_path / "seg.onnx")
    assert result.written and result.verification.passed
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["out", "aux"]
    assert session.run(None, {"input": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 5, 16, 16)  # dynamic
    outputs = result.verification.to_json()["outputs"]
    assert [o["name"] for o in outputs] == ["out", "aux"] and outputs[0]["shape"] == [5, 16, 16]
    assert all(0.99 <= o["top1_agreement"] <= 1.0 for o in outputs)  # a fraction of pixels, not a count


def test_large_outputs_pass_by_the_relative_part_and_say_so(tmp_path):
    """Random-weight models with huge logits (inception_v3) round beyond 1e-4 in absolute terms."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(1e5)
    result = export_model(model, (1, 3, 4, 4), tmp_path / "big.onnx")
    doc = result.verification.to_json()
    if doc["max_abs_diff"] <= doc["atol"]:
        pytest.skip("ONNX Runtime matched PyTorch within the absolute bound here")
    assert doc["passed"] and doc["held"] == "abs+rel"
    strict = export_model(model, (1, 3, 4, 4), tmp_path / "big2.onnx", rtol=0.0)
    assert not strict.verification.passed and not strict.written


@pytest.mark.slow
def test_unpruned_random_inception_v3_verifies_by_the_relative_part(tmp_path):
    """Random-weight inception_v3 has logits near 1e12: an absolute-only check failed it (coverage audit)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True).eval()
    result = export_model(model, (1, 3, 299, 299), tmp_path / "inc.onnx")
    doc = result.verification.to_json()
    assert doc["passed"] and result.written, doc
    assert doc["held"] == "abs+rel" or doc["max_abs_diff"] <= doc["atol"]
