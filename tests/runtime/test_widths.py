"""`--round-to auto`: the multiple chosen for each runtime, precision and CPU feature set (features injected, so
the rule is tested for machines this one is not), and the CLI recording its choice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpruner.errors import InputError
from dpruner.runtime.widths import auto_round_to, cpu_features, parse_round_to
from tests.conftest import ROOT, SAMPLE_MODELS

SKYLAKE_SP = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})
HASWELL = frozenset({"sse4_2", "avx", "avx2", "fma"})
GRAVITON = frozenset({"fp", "asimd", "sve"})


@pytest.mark.parametrize("runtime, precision, features, machine, expected", [
    ("onnxruntime", "float32", SKYLAKE_SP, "x86_64", 16),
    ("onnxruntime", "float32", HASWELL, "x86_64", 8),
    ("torch", "float32", SKYLAKE_SP, "x86_64", 16),
    ("torch", "float32", HASWELL, "x86_64", 8),
    ("onnxruntime", "float32", GRAVITON, "aarch64", 8),
    ("onnxruntime", "int8", HASWELL, "x86_64", 16),
    ("onnxruntime", "int8", SKYLAKE_SP, "x86_64", 16),
    ("cuda", "float16", frozenset(), "x86_64", 8),
    ("cuda", "bfloat16", frozenset(), "x86_64", 8),
    ("cuda", "int8", frozenset(), "x86_64", 16),
    ("cuda", "float32", frozenset(), "x86_64", 4),
])
def test_the_multiple_follows_the_runtime_precision_and_cpu(runtime, precision, features, machine, expected):
    choice = auto_round_to(runtime=runtime, precision=precision, features=features, machine=machine)
    assert choice.multiple == expected and choice.reason


def test_the_reason_names_the_rule():
    assert "AVX-512F" in auto_round_to(features=SKYLAKE_SP, machine="x86_64").reason
    assert "not measured" in auto_round_to(features=GRAVITON, machine="aarch64").reason


def test_impossible_combinations_and_bad_values_are_input_errors():
    with pytest.raises(InputError, match="float32 or int8"):
        auto_round_to(runtime="onnxruntime", precision="float16", features=HASWELL)
    with pytest.raises(InputError, match="--runtime"):
        auto_round_to(runtime="tpu")
    assert parse_round_to("auto") == "auto" and parse_round_to("8") == 8 and parse_round_to(4) == 4
    for bad in ("0", "-8", "eight", "8.5"):
        with pytest.raises(InputError):
            parse_round_to(bad)


def test_this_machine_reports_its_flags():
    features = cpu_features()
    assert isinstance(features, frozenset)
    if "avx512f" in features:  # the rule then picks 16 here, as docs/benchmarks.md measured on such a CPU
        assert auto_round_to().multiple == 16


def test_cli_prunes_to_the_auto_multiple_and_says_which(tmp_path):
    out = tmp_path / "r.pt"
    proc = subprocess.run([sys.executable, "-m", "dpruner", "prune", str(SAMPLE_MODELS / "digits_resnet.pt"),
                           "--ratio", "1.5x", "--round-to", "auto", "--runtime", "cuda", "--precision", "float16",
                           "-o", str(out), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["round_to"]["multiple"] == 8 and doc["round_to"]["runtime"] == "cuda"
    assert "--round-to auto: 8" in proc.stderr
    import dpruner

    before = {n: m.out_channels for n, m in dpruner.load_model(SAMPLE_MODELS / "digits_resnet.pt").named_modules()
              if hasattr(m, "out_channels")}
    after = {n: m.out_channels for n, m in dpruner.load_model(out).named_modules() if hasattr(m, "out_channels")}
    changed = {n: w for n, w in after.items() if w != before[n]}
    assert changed and all(w % 8 == 0 for w in changed.values()), changed
