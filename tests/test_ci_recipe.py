"""The CI recipe in docs/ci.md, run end to end on the sample model: the dpruner commands are taken from the
workflow text itself, so the documentation cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import ROOT, SAMPLE_MODELS


def workflow_commands() -> list[str]:
    text = (ROOT / "docs" / "ci.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip().startswith("dpruner ")]


def workflow_gates() -> str:
    text = (ROOT / "docs" / "ci.md").read_text()
    return re.search(r'^\s*GATES: "(.*)"$', text, re.M).group(1)


def run_recipe(tmp_path: Path, tolerance: str, extra: str = "", gates: str | None = None
               ) -> list[subprocess.CompletedProcess]:
    gates = workflow_gates() if gates is None else gates
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MODEL": str(SAMPLE_MODELS / "digits_vgg.pt"), "DPRUNER_ARCH": extra, "DATA": "digits",
           "TOLERANCE": tolerance, "BUDGET": "3", "GATES": gates, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "out").mkdir()
    results = []
    for command in workflow_commands():
        proc = subprocess.run(["bash", "-c", f"dpruner() {{ '{sys.executable}' -m dpruner \"$@\"; }}; {command}"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
        results.append(proc)
        if proc.returncode:
            break
    return results


def test_workflow_has_the_two_commands():
    commands = workflow_commands()
    assert [c.split()[1] for c in commands] == ["prune", "export"]


def test_recipe_end_to_end_on_the_sample_model(tmp_path):
    prune, export = run_recipe(tmp_path, "1%")
    assert prune.returncode == 0, prune.stderr
    assert export.returncode == 0, export.stderr
    out = tmp_path / "out"
    doc = json.loads((out / "prune.json").read_text())
    assert doc["after"]["accuracy"] >= doc["before"]["accuracy"] - 0.01 - 1e-9 and doc["ratio"]["macs"] > 1
    report = json.loads((out / "export.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["real_data"]
    assert report["ratios"]["macs"] > 1 and report["before"]["params"] > report["after"]["params"]
    assert (out / "small.onnx").is_file()
    markdown = (out / "report.md").read_text()
    assert "| MACs |" in markdown and "verification passed" in markdown
    assert [g["passed"] for g in report["gates"]] == [True, True] and "gates passed" in markdown
    assert ET.parse(out / "gates.xml").getroot().find("testsuite").get("tests") == "2"


def test_recipe_fails_the_job_when_a_gate_fails(tmp_path):
    prune, export = run_recipe(tmp_path, "1%", gates="--require macs>=1000")
    assert prune.returncode == 0 and export.returncode == 1
    assert "error: gate failed: macs>=1000 fails" in export.stderr
    assert (tmp_path / "out" / "small.onnx").is_file()  # uploaded with the report for a look at what failed
    failure = ET.parse(tmp_path / "out" / "gates.xml").getroot().find("testsuite/testcase/failure")
    assert "macs is" in failure.get("message")


def test_recipe_fails_the_job_when_the_tolerance_cannot_be_met(tmp_path):
    """A tolerance so small that one lost validation image breaks it, and an LR (passed through the workflow's
    DPRUNER_ARCH variable, which the prune command splices in) high enough that fine-tuning cannot hold it."""
    results = run_recipe(tmp_path, "0.0001", extra="--lr 0.3 --penalty 0")
    prune = results[0]
    doc = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert doc["target_met"] is False and doc["output"] is None
    assert prune.returncode == 1 and len(results) == 1  # the job stops here
    assert not (tmp_path / "out" / "small.pt").exists()
