"""`--data` specs: every accepted form, and one-sentence errors (exit code 2) for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpruner.data.spec import DataError, DataSpec, parse_data_spec
from dpruner.errors import EXIT_BAD_INPUT, InputError


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message.rstrip(".") and "\n" not in message


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "imagefolder"])
def test_rooted_forms(kind, tmp_path):
    spec = parse_data_spec(f"{kind}:{tmp_path}")
    assert spec == DataSpec(kind, tmp_path) and str(spec) == f"{kind}:{tmp_path}"


def test_digits_and_case_and_whitespace():
    assert parse_data_spec(" digits ") == DataSpec("digits", None)
    assert parse_data_spec("DIGITS").kind == "digits"


def test_python_form(tmp_path):
    file = tmp_path / "my data.py"
    file.write_text("def loaders(): pass\n")
    spec = parse_data_spec(f"python:{file}:loaders")
    assert (spec.kind, spec.root, spec.file, spec.function) == ("python", None, file, "loaders")


def test_cifar_root_may_be_missing_only_when_downloading(tmp_path):
    missing = tmp_path / "cifar"
    assert parse_data_spec(f"cifar10:{missing}", download=True).root == missing
    with pytest.raises(DataError, match="--download"):
        parse_data_spec(f"cifar10:{missing}")
    with pytest.raises(DataError, match="does not exist"):
        parse_data_spec(f"imagefolder:{missing}", download=True)


@pytest.mark.parametrize("text, match", [
    ("mnist:/data", "Unknown data set"),
    ("", "Unknown data set"),
    ("cifar10", "needs a folder"),
    ("imagefolder:", "needs a folder"),
    ("digits:/data", "takes no path"),
    ("python:loaders.py", "Malformed python"),
    ("python:loaders.py:", "Malformed python"),
    ("python:/no/such/file.py:fn", "does not exist"),
    ("imagefolder:/no/such/folder", "does not exist"),
])
def test_errors_are_one_sentence_with_exit_code_2(text, match):
    with pytest.raises(DataError, match=match) as info:
        parse_data_spec(text)
    assert isinstance(info.value, InputError) and info.value.exit_code == EXIT_BAD_INPUT == 2
    assert one_sentence(str(info.value)), str(info.value)


def test_unknown_kind_lists_accepted_forms():
    with pytest.raises(DataError) as info:
        parse_data_spec("mnist:/data")
    for form in ("cifar10:ROOT", "cifar100:ROOT", "imagefolder:ROOT", "digits", "python:FILE.py:FN"):
        assert form in str(info.value)


def test_root_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match="is a file"):
        parse_data_spec(f"imagefolder:{tmp_path / 'f'}")


def test_spec_and_package_do_not_import_torch():
    code = "import sys, dpruner.data, dpruner.data.spec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
