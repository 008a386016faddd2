"""Reports: latency timing, ratios (speedup / MACs reduction), Markdown, and the versioned JSON of `dpruner report`
and `dpruner export --baseline`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from dpruner.report.compare import ModelFacts, ratios
from dpruner.report.latency import Latency, time_fn
from dpruner.report.render import markdown, rows
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")


def test_time_fn_runs_until_stable_and_reports_the_count():
    median, p90, runs = time_fn(lambda: time.sleep(0.002), round_runs=10, min_seconds=0.05)
    assert 1.5 <= median <= 10 and p90 >= median and runs >= 20 and runs % 10 == 0


def facts(macs, ms, params=100):
    return ModelFacts("m", params, macs, 1000, 900, {"onnxruntime": {1: Latency(1, ms, ms * 1.1, 50, 2)}},
                      {"test": 0.9})


def test_speedup_per_macs_is_speedup_over_macs_reduction():
    r = ratios(facts(200, 10.0), facts(100, 8.0, params=50))
    assert r["macs"] == 2.0 and r["params"] == 2.0
    assert r["speedup"]["onnxruntime"]["1"] == pytest.approx(1.25)
    assert r["speedup_per_macs"]["onnxruntime"]["1"] == pytest.approx(0.625)
    assert r["accuracy_delta"]["test"] == 0.0


def test_markdown_is_a_table_with_every_quantity():
    doc = {"environment": {"threads": 2, "torch": "t", "onnxruntime": "o", "machine": "x"}, "onnx": None,
           "verification": None, "before": facts(200, 10.0).to_json(), "after": facts(100, 8.0, 50).to_json(),
           "ratios": ratios(facts(200, 10.0), facts(100, 8.0, 50))}
    text = markdown(doc, "t")
    assert "| | before | after | ratio |" in text and "| MACs | 200 | 100 | 2.00x |" in text
    assert "1.25x (0.62 of MACs)" in text or "1.25x (0.63 of MACs)" in text
    assert len(rows(doc)) == 4 + 1 + 1  # sizes, one latency row, one accuracy row


def dp(*args):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def check_side(side: dict, batches=("1", "4")):
    assert {"params", "macs", "file_bytes", "latency_ms"} <= set(side)
    assert side["file_bytes"]["pt"] > 0 and side["file_bytes"]["onnx"] > 0
    for runtime in ("torch", "onnxruntime"):
        assert sorted(side["latency_ms"][runtime]) == sorted(batches)
        for lat in side["latency_ms"][runtime].values():
            assert lat["median"] > 0 and lat["p90"] >= lat["median"] and lat["runs"] >= 20


def test_report_command_json(tmp_path):
    small = tmp_path / "small.pt"
    assert dp("prune", VGG, "--ratio", "2x", "-o", str(small)).returncode == 0
    proc = dp("report", VGG, str(small), "--json", "--batches", "1,4", "--threads", "1",
              "--markdown", str(tmp_path / "r.md"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == 1 and doc["environment"]["threads"] == 1
    check_side(doc["before"])
    check_side(doc["after"])
    assert doc["ratios"]["macs"] == pytest.approx(2.0, rel=0.05)
    assert set(doc["ratios"]["speedup_per_macs"]) == {"torch", "onnxruntime"}
    assert (tmp_path / "r.md").read_text().startswith("### ")


def test_export_with_baseline_json_schema(tmp_path):
    small = tmp_path / "small.pt"
    assert dp("prune", VGG, "--ratio", "2x", "-o", str(small)).returncode == 0
    proc = dp("export", str(small), "--onnx", str(tmp_path / "s.onnx"), "--baseline", VGG, "--json",
              "--batches", "1,4", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"schema", "onnx", "verification", "before", "after", "ratios"}
    assert doc["onnx"]["opset"] == 17 and doc["onnx"]["exporter"] == "torchscript" and doc["onnx"]["written"]
    assert doc["after"]["file_bytes"]["onnx"] == (tmp_path / "s.onnx").stat().st_size
    check_side(doc["before"])
    check_side(doc["after"])


def test_memory_probe_reports_forward_memory_that_grows_with_the_batch():
    from dpruner.report.memory import forward_peak_bytes
    from dpruner.zoo import resnet20

    model = resnet20().eval()
    small = forward_peak_bytes("torch", model, None, (1, 3, 32, 32), 1, 1)
    large = forward_peak_bytes("torch", model, None, (1, 3, 32, 32), 256, 1)
    # batch 256 holds at least one 256x16x32x32 float activation (16 MiB) at a time
    assert large > 16 * 2**20 > small >= 0


def test_memory_probe_child_never_imports_modules_from_the_working_folder(tmp_path, monkeypatch):
    """A numpy.py / json.py planted where dpruner runs must not execute in the probe's child process."""
    from dpruner.report.memory import forward_peak_bytes
    from dpruner.zoo import resnet20

    marker = tmp_path / "PLANTED_RAN"
    for name in ("numpy", "json", "torch", "onnxruntime"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}\\n')\nraise SystemExit(9)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # isolated mode ignores it too
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m dpruner` would have it; the child drops it
    peak = forward_peak_bytes("torch", resnet20().eval(), None, (1, 3, 32, 32), 1, 1)
    assert not marker.exists(), marker.read_text()
    assert peak is not None and peak >= 0
