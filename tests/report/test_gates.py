"""CI gates (`--require`): parsing, the value each metric reads from a report, pass/fail, JUnit XML, and the exit
codes of `dpruner report` and `dpruner export` when a gate fails."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from dpruner.errors import InputError
from dpruner.report.compare import ModelFacts, build_report
from dpruner.report.gates import check_measurable, evaluate_gates, junit_xml, parse_gate
from dpruner.report.latency import Latency
from dpruner.report.render import markdown
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")


def doc():
    """A report where the pruned model has half the MACs, is 1.25x faster in ONNX Runtime at batch 1 (1.6x at 8),
    2x faster in torch, and lost 1.5 points of test accuracy."""
    def lat(ms):
        return Latency(1, ms, ms * 1.1, 40, 2)

    before = ModelFacts("a.pt", 400, 200, 4000, 3000,
                        {"onnxruntime": {1: lat(10.0), 8: lat(40.0)}, "torch": {1: lat(12.0)}},
                        {"val": 0.90, "test": 0.92})
    after = ModelFacts("b.pt", 100, 100, 1000, 1500,
                       {"onnxruntime": {1: lat(8.0), 8: lat(25.0)}, "torch": {1: lat(6.0)}},
                       {"val": 0.89, "test": 0.905})
    return build_report(after, before, threads=2)


def results_for(*texts):
    return {r.gate.text: r for r in evaluate_gates(doc(), [parse_gate(t) for t in texts])}


def test_each_metric_reads_the_report_value_it_names():
    r = results_for("macs>=2", "params>=4x", "size>=4", "onnx_size>=2x", "speedup>=1.25", "speedup.torch>=2",
                    "speedup.onnxruntime.8>=1.6", "efficiency<=0.63", "latency<=8ms", "accuracy>=90.5",
                    "accuracy_drop<=1.5pt", "accuracy_drop.val<=1%")
    assert all(x.passed for x in r.values()), [x.reason for x in r.values() if not x.passed]
    assert r["speedup>=1.25"].value == pytest.approx(1.25) and r["speedup>=1.25"].where == "onnxruntime batch 1"
    assert r["speedup.onnxruntime.8>=1.6"].value == pytest.approx(1.6)
    assert r["accuracy_drop<=1.5pt"].value == pytest.approx(1.5) and r["accuracy_drop<=1.5pt"].where == "test split"
    assert r["accuracy_drop.val<=1%"].value == pytest.approx(1.0)
    assert r["latency<=8ms"].value == pytest.approx(8.0)


def test_a_gate_that_does_not_hold_fails_with_its_reason():
    r = results_for("speedup>=1.3", "accuracy_drop<=1pt", "macs>2")
    assert not any(x.passed for x in r.values())
    assert r["speedup>=1.3"].reason == ("speedup>=1.3 fails: speedup is 1.25x (onnxruntime batch 1), required >= "
                                        "1.3x.")
    assert "1.50 pt" in r["accuracy_drop<=1pt"].reason


def test_a_missing_measurement_fails_rather_than_passing():
    report = doc()
    report["after"]["accuracy"] = None
    (result,) = evaluate_gates(report, [parse_gate("accuracy_drop<=1pt")])
    assert not result.passed and result.value is None and "not measured" in result.reason


@pytest.mark.parametrize("text", ["speed>=1.3", "speedup=>1.3", "speedup>=fast", "speedup>=1.3pt",
                                  "accuracy_drop<=1ms", "macs.torch>=2", "speedup.gpu>=1", "speedup>=nan",
                                  "accuracy.holdout>=90", ""])
def test_malformed_gates_are_input_errors(text):
    with pytest.raises(InputError):
        parse_gate(text)


def test_gates_the_run_would_not_measure_are_refused_up_front():
    accuracy, speed, macs = parse_gate("accuracy>=90"), parse_gate("speedup>=1.2"), parse_gate("macs>=2")
    with pytest.raises(InputError, match="--data"):
        check_measurable([accuracy], data=False, latency=True, before=True, batches=(1,))
    with pytest.raises(InputError, match="--no-latency"):
        check_measurable([speed], data=True, latency=False, before=True, batches=(1,))
    with pytest.raises(InputError, match="--baseline"):
        check_measurable([macs], data=True, latency=True, before=False, batches=(1,))
    with pytest.raises(InputError, match="batch 8"):
        check_measurable([parse_gate("speedup.torch.8>=1")], data=False, latency=True, before=True, batches=(1,))
    check_measurable([accuracy], data=True, latency=False, before=False, batches=(1,))  # no ratio needed


def test_junit_has_one_case_per_gate_and_a_failure_for_each_failed_one():
    results = evaluate_gates(doc(), [parse_gate("macs>=2"), parse_gate("speedup>=1.3")])
    root = ET.fromstring(junit_xml(results))
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["macs>=2", "speedup>=1.3"]
    assert cases[0].find("failure") is None and "speedup is 1.25x" in cases[1].find("failure").get("message")


def test_markdown_marks_failed_gates():
    report = doc()
    report["gates"] = [r.to_json() for r in evaluate_gates(report, [parse_gate("macs>=2"),
                                                                     parse_gate("speedup>=1.3")])]
    text = markdown(report, "t")
    assert "**1 of 2 gates FAILED**" in text and "| `speedup>=1.3` | 1.25 (onnxruntime batch 1) | **FAIL** |" in text
    assert "| `macs>=2` | 2 (before / after) | pass |" in text


def dp(*args):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    small = tmp_path_factory.mktemp("gates") / "small.pt"
    assert dp("prune", VGG, "--ratio", "2x", "-o", str(small)).returncode == 0
    return small


def test_report_exits_1_with_one_line_when_a_gate_fails_and_0_when_all_hold(pruned, tmp_path):
    junit, md = tmp_path / "gates.xml", tmp_path / "r.md"
    ok = dp("report", VGG, str(pruned), "--no-latency", "--require", "macs>=1.9", "--require", "params>=1.5x",
            "--json", "--junit", str(junit))
    assert ok.returncode == 0, ok.stderr
    assert [g["passed"] for g in json.loads(ok.stdout)["gates"]] == [True, True]
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    bad = dp("report", VGG, str(pruned), "--no-latency", "--require", "macs>=1.9", "--require", "macs>=100",
             "--junit", str(junit), "--markdown", str(md))
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gate failed: macs>=100 fails: macs is")
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
    assert "**FAIL**" in md.read_text()


def test_export_gates_and_usage_errors(pruned, tmp_path):
    onnx = tmp_path / "s.onnx"
    bad = dp("export", str(pruned), "--onnx", str(onnx), "--baseline", VGG, "--no-latency",
             "--require", "macs>=100", "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["gates"][0]["passed"] is False
    assert onnx.exists()  # the export itself passed verification: the gate judges the model, not the file
    usage = dp("export", str(pruned), "--onnx", str(tmp_path / "t.onnx"), "--no-latency", "--require", "macs>=2")
    assert usage.returncode == 2 and "--baseline" in usage.stderr and not (tmp_path / "t.onnx").exists()
    junk = dp("report", VGG, str(pruned), "--require", "speedy>=2")
    assert junk.returncode == 2 and "unknown metric 'speedy'" in junk.stderr
