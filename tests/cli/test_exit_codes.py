"""The exit-code table in docs/exit-codes.md is the one the code uses, and every command maps a bad input to 2
with nothing on stdout. Codes 1 and 3 are exercised in test_training_cli.py, test_cli.py and
tests/export/test_export.py."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dpruner import errors
from tests.conftest import ROOT


def test_documented_codes_match_the_constants():
    text = (ROOT / "docs" / "exit-codes.md").read_text()
    documented = [int(code) for code in re.findall(r"^\| (\d+) \|", text, re.M)]
    assert documented == [errors.EXIT_OK, errors.EXIT_TARGET_NOT_MET, errors.EXIT_BAD_INPUT,
                          errors.EXIT_VERIFICATION_FAILED, errors.EXIT_INTERNAL]
    assert errors.TargetNotMetError.exit_code == 1 and errors.VerificationError.exit_code == 3
    assert errors.DprunerError.exit_code == 2


@pytest.mark.parametrize("command", [
    ["analyze", "missing.pt", "--json"],
    ["prune", "missing.pt", "--ratio", "2x", "-o", "o.pt", "--json"],
    ["evaluate", "missing.pt", "--data", "digits", "--json"],
    ["finetune", "missing.pt", "--data", "digits", "-o", "o.pt", "--json"],
    ["export", "missing.pt", "--onnx", "o.onnx", "--json"],
    ["report", "missing.pt", "other.pt", "--json"],
])
def test_every_command_exits_2_on_a_missing_file_with_empty_stdout(command, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpruner", *command], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_every_error_class_is_documented_with_an_example():
    """Each DprunerError subclass dpruner defines appears in docs/exit-codes.md's table of error classes."""
    import importlib
    import pkgutil

    import dpruner

    for info in pkgutil.walk_packages(dpruner.__path__, "dpruner."):
        if not info.name.startswith("dpruner.cli"):
            importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    text = (ROOT / "docs" / "exit-codes.md").read_text()
    table = text.split("## Error classes", 1)[1]
    missing = [c.__name__ for c in subclasses(errors.DprunerError) if c.__module__.startswith("dpruner")
               and f"`{c.__name__}`" not in table]
    assert not missing, f"document these in docs/exit-codes.md: {missing}"
