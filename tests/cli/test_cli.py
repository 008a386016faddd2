"""The CLI: help without torch, analyze table and JSON, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from dpruner.cli.app import app
from tests.conftest import ROOT, SAMPLE_MODELS, TinyNet

runner = CliRunner()
VGG = str(SAMPLE_MODELS / "digits_vgg.pt")
RESNET = str(SAMPLE_MODELS / "digits_resnet.pt")


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_only_working_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "analyze" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from dpruner.cli.app import app; app(['--help'], standalone_mode=False); " \
           "sys.exit(3 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, "importing the CLI pulled in torch"


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "dpruner", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("dpruner ")


@pytest.mark.parametrize("path", [VGG, RESNET])
def test_analyze_sample_model_table(path):
    result = run("analyze", path)
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "Most redundant" in result.output
    assert "features.0" in result.output or "stem.0" in result.output


def test_analyze_json_is_the_only_thing_on_stdout():
    proc = subprocess.run([sys.executable, "-m", "dpruner", "analyze", RESNET, "--json"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == 1 and doc["model"]["input_shape"] == [1, 1, 8, 8]
    assert doc["source"]["format"] == "dpruner" and doc["source"]["arch"] == "dpruner.zoo:digits_resnet"
    names = [layer["name"] for layer in doc["layers"]]
    assert names[0] == "stem.0" and names[-1] == "fc"
    assert doc["model"]["macs"] == sum(layer["macs"] for layer in doc["layers"]) + doc["model"]["other_macs"]


def test_analyze_torchvision_arch_with_input_shape(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    result = run("analyze", str(tmp_path / "r18.pt"), "--arch", "torchvision:resnet18", "--num-classes", "10",
                 "--input-shape", "3,64,64", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["input_shape"] == [1, 3, 64, 64]
    assert doc["layers"][-1]["name"] == "fc" and doc["layers"][-1]["out_channels"] == 10


def _one_line_error(result, code: int = 2, contains: str = ""):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert contains in lines[0]


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(TinyNet().state_dict(), path)
    return path


def test_error_missing_file():
    _one_line_error(run("analyze", "/no/such/model.pt"), contains="No such file")


def test_error_state_dict_without_arch(weights):
    _one_line_error(run("analyze", str(weights)), contains="--arch")


def test_error_wrong_arch(weights):
    _one_line_error(run("analyze", str(weights), "--arch", "torchvision:resnet18", "--input-shape", "3,32,32"),
                    contains="do not fit torchvision:resnet18")


def test_error_bad_input_shape(weights):
    arch = f"{ROOT / 'tests' / 'conftest.py'}:tiny_net"
    _one_line_error(run("analyze", str(weights), "--arch", arch, "--input-shape", "7,7"), contains="C,H,W")
    _one_line_error(run("analyze", str(weights), "--arch", arch, "--input-shape", "3,7,7"),
                    contains="cannot run on input shape 3,7,7")


def test_error_truncated(tmp_path):
    data = open(VGG, "rb").read()
    (tmp_path / "t.pt").write_bytes(data[:5000])
    _one_line_error(run("analyze", str(tmp_path / "t.pt")), contains="truncated or corrupt")


def test_error_pickled_module_refused_then_trusted(tmp_path):
    model = TinyNet()
    torch.save(model, tmp_path / "whole.pt")
    _one_line_error(run("analyze", str(tmp_path / "whole.pt")), contains="--trust-checkpoint")
    ok = run("analyze", str(tmp_path / "whole.pt"), "--trust-checkpoint", "--input-shape", "1,7,7", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["source"]["format"] == "pickled-module"


def test_debug_env_shows_the_traceback():
    proc = subprocess.run([sys.executable, "-m", "dpruner", "analyze", "/no/such.pt"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "DPRUNER_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: No such file" in proc.stderr


def test_usage_error_exit_code():
    assert run("analyze").exit_code == 2
    assert run("analyze", VGG, "--num-classes", "0").exit_code == 2


# ---- prune ---------------------------------------------------------------------------------------------------------


def test_prune_then_analyze_without_arguments(tmp_path):
    out = tmp_path / "small.pt"
    result = run("prune", RESNET, "--ratio", "3x", "--target", "params", "--method", "fpgm", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == 2 and doc["target_met"] and abs(doc["ratio"]["params"] / 3 - 1) <= 0.05
    assert doc["output"] == str(out) and doc["method"] == "one-shot" and doc["criterion"] == "fpgm"
    again = run("analyze", str(out), "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["model"]["params"] == doc["after"]["params"]


def test_prune_table_output(tmp_path):
    result = run("prune", VGG, "--ratio", "2x", "-o", str(tmp_path / "s.pt"))
    assert result.exit_code == 0 and "ratio" in result.output and "MACS" in result.output


def test_prune_twice_gives_identical_files(tmp_path):
    outputs = []
    for name in ("a.pt", "b.pt"):
        assert run("prune", VGG, "--ratio", "2x", "--method", "random", "--seed", "7", "-o",
                   str(tmp_path / name)).exit_code == 0
        outputs.append(torch.load(tmp_path / name, weights_only=True)["plan"])
    assert json.dumps(outputs[0], sort_keys=True) == json.dumps(outputs[1], sort_keys=True)


def test_prune_refuses_to_overwrite_input(tmp_path):
    copy = tmp_path / "in.pt"
    copy.write_bytes(open(VGG, "rb").read())
    _one_line_error(run("prune", str(copy), "--ratio", "2x", "-o", str(copy)), contains="Refusing to overwrite")


def test_prune_bad_options(tmp_path):
    out = str(tmp_path / "o.pt")
    _one_line_error(run("prune", VGG, "--ratio", "half", "-o", out), contains="--ratio")
    _one_line_error(run("prune", VGG, "--ratio", "2x", "--method", "magic", "-o", out), contains="Unknown method")
    _one_line_error(run("prune", VGG, "-o", out), contains="exactly one")


def test_prune_unreachable_ratio_exits_1(tmp_path):
    out = tmp_path / "o.pt"
    result = run("prune", VGG, "--ratio", "500x", "-o", str(out))
    assert result.exit_code == 1 and "not reached" in result.stderr and "of 500x" in result.stderr and out.exists()


def test_prune_overshot_ratio_says_so(tmp_path):
    # the digits ResNet's 16-channel layers keep 16 or nothing with --round-to 16: 2x lands well past the 5% window
    out = tmp_path / "o.pt"
    result = run("prune", str(SAMPLE_MODELS / "digits_resnet.pt"), "--ratio", "2x", "--round-to", "16", "-o", str(out))
    assert result.exit_code == 1 and out.exists()
    assert "overshot" in result.stderr and "for 2x" in result.stderr and "--round-to" in result.stderr


def test_prune_torchvision_state_dict(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    out = tmp_path / "r18_small.pt"
    result = run("prune", str(tmp_path / "r18.pt"), "--arch", "torchvision:resnet18", "--num-classes", "10",
                 "--input-shape", "3,64,64", "--ratio", "2x", "--round-to", "8", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["target_met"] and doc["arch"] == "torchvision:resnet18"
    from dpruner.io import load_checkpoint

    loaded = load_checkpoint(out)
    assert loaded.num_classes == 10 and loaded.input_shape == (1, 3, 64, 64)
    assert all(m.out_channels % 8 == 0 for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d))


def test_prune_with_leaf_module(tmp_path):
    out = tmp_path / "leaf.pt"
    result = run("prune", RESNET, "--sparsity", "0.3", "--leaf", "dpruner.zoo.digits:BasicBlock", "-o", str(out),
                 "--json")
    # every block is opaque, so nothing is left to prune: one sentence that names the leaf as the reason, exit 2
    _one_line_error(result, contains="BasicBlock has no pruning rule")
    assert "Nothing in the model can be pruned" in result.output and not out.exists()
    bad = run("prune", RESNET, "--sparsity", "0.3", "--leaf", "dpruner.zoo.digits:nothing", "-o", str(out))
    _one_line_error(bad, contains="no callable named 'nothing'")
