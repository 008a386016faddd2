"""`dpruner export --int8`: ONNX Runtime static quantization of the pruned model on the digits sample, checked
against the float model by predictions; a quantization that loses accuracy exits 3 and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from dpruner.cli.app import app
from dpruner.errors import InputError
from dpruner.export import int8 as int8_module
from dpruner.export.int8 import parse_drop
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")


def dp(*args):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    small = tmp_path_factory.mktemp("int8") / "small.pt"
    assert dp("prune", VGG, "--ratio", "2x", "-o", str(small)).returncode == 0
    return small


def test_int8_export_keeps_accuracy_and_reports_three_models(pruned, tmp_path):
    out, md = tmp_path / "q.onnx", tmp_path / "r.md"
    proc = dp("export", str(pruned), "--onnx", str(out), "--int8", "--data", "digits", "--baseline", VGG,
              "--batches", "1", "--threads", "1", "--markdown", str(md), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check = doc["int8"]["check"]
    assert check["passed"] and check["split"] == "test" and check["samples"] > 300
    assert check["float_accuracy"] - check["int8_accuracy"] <= 0.01 and check["top1_agreement"] >= 0.97
    assert doc["int8"]["settings"]["format"] == "QDQ" and doc["int8"]["settings"]["calib_batches"] == 8
    # the written file is the int8 one: QuantizeLinear/DequantizeLinear nodes and int8 weight initializers
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    sizes = doc["int8"]["model"]["file_bytes"]
    assert sizes["onnx"] == out.stat().st_size and sizes["onnx"] * 3 < doc["after"]["file_bytes"]["onnx"]
    assert doc["int8"]["ratios_vs_before"]["file_bytes"]["onnx"] > 5  # 2x fewer params, 4x fewer bytes each
    assert set(doc["int8"]["model"]["latency_ms"]) == {"onnxruntime"}
    text = md.read_text()
    assert "| after int8 |" in text and "INT8 (QDQ" in text and "check passed" in text


def test_a_quantization_that_loses_accuracy_exits_3_and_writes_nothing(pruned, tmp_path, monkeypatch):
    real = int8_module.quantize_onnx

    def miscalibrated(float_path, int8_path, calib):  # activation ranges 1000x too wide: most values round to 0
        return real(float_path, int8_path, [x * 1000 for x in calib])

    monkeypatch.setattr(int8_module, "quantize_onnx", miscalibrated)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(app, ["export", str(pruned), "--onnx", str(out), "--int8", "--data", "digits",
                                      "--no-latency", "--json"])
    assert result.exit_code == 3, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "the int8 model's top-1 on the test split is" in result.output
    doc = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert doc["int8"]["check"]["passed"] is False and doc["onnx"]["written"] is False


def test_usage_errors(pruned, tmp_path):
    no_data = dp("export", str(pruned), "--onnx", str(tmp_path / "q.onnx"), "--int8", "--no-latency")
    assert no_data.returncode == 2 and "--data" in no_data.stderr
    no_onnx = dp("export", str(pruned), "--torch", str(tmp_path / "q.pt2"), "--int8", "--data", "digits")
    assert no_onnx.returncode == 2 and "--onnx" in no_onnx.stderr
    assert parse_drop("1%") == pytest.approx(0.01) and parse_drop("0") == 0 and parse_drop("0.5pt") == 0.005
    for bad in ("-1%", "lots", "100%"):
        with pytest.raises(InputError):
            parse_drop(bad)
    assert np.isclose(parse_drop("2"), 0.02)
