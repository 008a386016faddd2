"""Regression tests for the hostile-input audit (issue 13): every case a user can cause is exit 2 with one sentence
naming the input at fault, nothing is written on failure, and an engine fault is exit 70 naming the node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import invoke
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")
HOSTILE = str(ROOT / "tests" / "hostile.py")


@pytest.fixture
def ok_weights(tmp_path) -> str:
    from tests.hostile import ok

    path = tmp_path / "ok.pt"
    torch.save(ok().state_dict(), path)
    return str(path)


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- absurd numbers and wrong exit codes ----------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["prune", VGG, "--ratio", "inf", "-o", "o.pt"], "--ratio"),
    (["prune", VGG, "--ratio", "nan", "-o", "o.pt"], "--ratio"),
    (["prune", VGG, "--data", "digits", "--tolerance", "1%", "--budget-epochs", "nan", "-o", "o.pt"], "--budget-epochs"),
    (["prune", VGG, "--data", "digits", "--tolerance", "1%", "--budget-epochs", "inf", "-o", "o.pt"], "--budget-epochs"),
    (["prune", VGG, "--data", "digits", "--tolerance", "1%", "--step-epochs", "nan", "-o", "o.pt"], "--step-epochs"),
    (["prune", VGG, "--data", "digits", "--tolerance", "1%", "--penalty", "nan", "-o", "o.pt"], "--penalty"),
    (["prune", VGG, "--data", "digits", "--tolerance", "nan", "-o", "o.pt"], "--tolerance"),
    (["prune", VGG, "--data", "digits", "--tolerance", "1%", "--lr", "inf", "-o", "o.pt"], "--lr"),
    (["finetune", VGG, "--data", "digits", "--epochs", "nan", "-o", "o.pt"], "--epochs"),
    (["finetune", VGG, "--data", "digits", "--epochs", "inf", "-o", "o.pt"], "--epochs"),
    (["finetune", VGG, "--data", "digits", "--epochs", "1e300", "-o", "o.pt"], "--epochs"),
    (["finetune", VGG, "--data", "digits", "--seed", "1e23", "-o", "o.pt"], "--seed"),
    (["finetune", VGG, "--data", "digits", "--seed", "99999999999999999999", "-o", "o.pt"], "--seed"),
    (["export", VGG, "--onnx", "o.onnx", "--atol", "-1"], "--atol"),
    (["export", VGG, "--onnx", "o.onnx", "--atol", "nan"], "--atol"),
    (["export", VGG, "--onnx", "o.onnx", "--opset", "999"], "--opset"),
    (["report", VGG, VGG, "--batches", "100000000"], "--batches"),
    (["report", VGG, VGG, "--batches", "99999999999999999999999"], "--batches"),
    (["analyze", VGG, "--input-shape", "99999999999999999999,8,8"], "input"),
    (["analyze", VGG, "--input-shape", "1,20000,20000"], "input"),
])
def test_absurd_numbers_are_exit_2_and_write_nothing(args, words, tmp_path):
    run = invoke(*args, cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert words in run.one_error_line()
    assert files(tmp_path) == set()


# ---- output paths ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, words", [
    ("", "directory"),  # Typer turns '' into '.'
    ("no/such/folder/o.pt", "does not exist"),
    ("x" * 300 + ".pt", "File name too long"),
    ("/".join(["d"] * 2100) + "/o.pt", "too long"),
    (".", "directory"),
])
def test_unusable_output_paths_are_exit_2(output, words, tmp_path):
    run = invoke("prune", VGG, "--ratio", "2x", "-o", output, cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert words in run.one_error_line()
    assert files(tmp_path) == set()


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("options, words", [("size=64k", "No space left"), ("ro", "not writable")])
def test_full_or_read_only_disk_is_exit_2_and_leaves_no_temporary(options, words, tmp_path):
    """A real small or read-only file system where this machine allows mounting one (root in CI)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, options):
        pytest.skip("cannot mount a tmpfs here (needs root); test_write_failures_injected covers the logic")
    try:
        run = invoke("prune", VGG, "--ratio", "2x", "-o", str(disk / "o.pt"), cwd=tmp_path)
        assert run.code == 2, run.stderr
        assert words in run.one_error_line()
        assert not list(disk.iterdir())
    finally:
        # lazily: the failed writer's file may still be open in this process until its traceback is collected
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(30, "Read-only file system"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")])
def test_write_failures_injected(error, tmp_path, monkeypatch):
    """torch.save failing the way the system makes it fail: one sentence, no temporary file left."""
    import dpruner.io.atomic as atomic

    if isinstance(error, RuntimeError):
        monkeypatch.setattr(atomic, "_free_bytes", lambda path: 0)  # the disk is full

    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    run = invoke("prune", VGG, "--ratio", "2x", "-o", "o.pt", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "Cannot write 'o.pt'" in run.one_error_line()
    assert files(tmp_path) == set()


# ---- models and user code that misbehave -----------------------------------------------------------------------

@pytest.mark.parametrize("factory, words", [
    ("raises", "ValueError: boom"),
    ("exits", "sys.exit(3)"),
    ("factory_exits", "sys.exit(4)"),
])
@pytest.mark.parametrize("command", [
    ["analyze"], ["prune", "--ratio", "2x", "-o", "o.pt"], ["evaluate", "--data", "digits"],
    ["export", "--onnx", "o.onnx", "--no-latency"],
])
def test_misbehaving_model_code_is_exit_2_naming_it(factory, words, command, ok_weights, tmp_path):
    run = invoke(command[0], ok_weights, *command[1:], "--arch", f"{HOSTILE}:{factory}", "--input-shape", "1,8,8",
                 cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert words in run.one_error_line()
    assert files(tmp_path) == {"ok.pt"}


@pytest.mark.parametrize("command", [["evaluate", "--data", "digits"],
                                     ["finetune", "--data", "digits", "--epochs", "0.1", "-o", "o.pt"]])
def test_a_model_returning_a_tuple_cannot_be_trained_or_evaluated(command, ok_weights, tmp_path):
    run = invoke(command[0], ok_weights, *command[1:], "--arch", f"{HOSTILE}:tuple_out", "--input-shape", "1,8,8",
                 cwd=tmp_path)
    assert run.code == 2 and "returns a tuple" in run.one_error_line()


def test_a_model_returning_a_tuple_still_prunes_and_exports(ok_weights, tmp_path):
    assert invoke("prune", ok_weights, "--arch", f"{HOSTILE}:tuple_out", "--input-shape", "1,8,8", "--sparsity", "0.3",
                  "-o", "p.pt", cwd=tmp_path).code == 0
    run = invoke("export", "p.pt", "--onnx", "p.onnx", "--no-latency", "--arch", f"{HOSTILE}:tuple_out", "--json",
                 cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["verification"]["passed"]


@pytest.mark.parametrize("loader, words", [
    ("float_labels", "Labels of the"),
    ("int_inputs", "Inputs of the"),
    ("empty_val", "no batches"),
    ("labels_too_high", "every label must be in [0, 10)"),
    ("exits_while_loading", "sys.exit(5)"),
    ("exits_when_called", "sys.exit(6)"),
])
def test_python_loaders_that_misbehave_are_exit_2(loader, words, ok_weights, tmp_path):
    run = invoke("finetune", ok_weights, "--arch", f"{HOSTILE}:ok", "--input-shape", "1,8,8", "--data",
                 f"python:{HOSTILE}:{loader}", "--epochs", "1", "-o", "o.pt", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert words in run.one_error_line()
    assert files(tmp_path) == {"ok.pt"}


def test_truncated_jpeg_met_during_training_names_the_file(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.jpg")
    broken = root / "train" / "b" / "5.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG: the header survives, the data does not
    from tests.hostile import ok_rgb

    torch.save(ok_rgb(num_classes=2).state_dict(), tmp_path / "m.pt")
    run = invoke("finetune", "m.pt", "--arch", f"{HOSTILE}:ok_rgb", "--num-classes", "2", "--input-shape", "3,8,8",
                 "--data", f"imagefolder:{root}", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--epochs", "1",
                 "--batch-size", "4", "-o", "o.pt", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "5.jpg" in run.one_error_line()
    assert not (tmp_path / "o.pt").exists()


def test_nan_weights_in_analyze_and_prune_are_exit_2(tmp_path):
    from tests.hostile import ok

    model = ok()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    for command in (["analyze"], ["prune", "--ratio", "2x", "-o", "o.pt"]):
        run = invoke(command[0], "nan.pt", *command[1:], "--arch", f"{HOSTILE}:ok", "--input-shape", "1,8,8",
                     cwd=tmp_path)
        assert run.code == 2 and "conv.weight" in run.one_error_line()
    assert files(tmp_path) == {"nan.pt"}


@pytest.mark.parametrize("damage", ["not a dict", "wrong types", "bad step"])
def test_structurally_damaged_finetune_state_is_exit_2(damage, tmp_path):
    state = tmp_path / "o.pt.resume"
    payload = {"format": "dpruner_run_state", "method": "finetune", "config": {}, "plans": [], "model": {},
               "progress": {}}
    if damage == "not a dict":
        payload = [1, 2, 3]
    elif damage == "wrong types":
        payload["model"] = [1]
    elif damage == "bad step":
        payload["progress"] = {"step": -5, "total_steps": 3, "optimizer": {}, "rng": torch.get_rng_state()}
    torch.save(payload, state)
    run = invoke("finetune", VGG, "--data", "digits", "--epochs", "1", "-o", "o.pt", "--resume", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "o.pt.resume" in run.one_error_line() or "training state" in run.one_error_line()
    assert files(tmp_path) == {"o.pt.resume"}


def test_damaged_tolerance_state_is_exit_2(tmp_path):
    """A real state file whose fields were tampered with after the options check."""
    state = tmp_path / "o.pt.resume"
    args = ["prune", VGG, "--data", "digits", "--tolerance", "1%", "--budget-epochs", "2", "--step-epochs", "0.5",
            "-o", "o.pt", "--quiet"]
    saved = {}

    # run the real controller, keep the first saved state, stop the run
    from dpruner.io import atomic

    original_save = atomic.atomic_torch_save

    def capture(obj, path, **kwargs):
        if str(path).endswith(".resume") and not saved:
            saved.update(obj)
            raise KeyboardInterrupt
        return original_save(obj, path, **kwargs)

    atomic.atomic_torch_save = capture
    try:
        invoke(*args, cwd=tmp_path)
    finally:
        atomic.atomic_torch_save = original_save
    assert saved
    saved["progress"]["rate"] = "fast"
    torch.save(saved, state)
    run = invoke(*args, "--resume", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "damaged" in run.one_error_line()


# ---- messages --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["prune"], ["bogus"], ["prune", VGG, "-o", "x.pt", "--seed", "1e23"],
                                  ["analyze", VGG, "--no-such-option"]])
def test_usage_errors_are_one_error_line_and_a_usage_hint(args, tmp_path):
    run = invoke(*args, cwd=tmp_path)
    assert run.code == 2
    run.one_error_line()
    assert "╭" not in run.stderr and "usage: dpruner" in run.stderr


@pytest.mark.parametrize("extra", [["--data", "digits", "--tolerance", "1%"], ["--ratio", "2x"]])
def test_exclude_everything_says_nothing_is_prunable(extra, tmp_path):
    run = invoke("prune", VGG, *extra, "--exclude", "*", "-o", "o.pt", "--quiet", cwd=tmp_path)
    assert run.code == 2, run.stderr
    assert "Nothing in the model can be pruned" in run.one_error_line()
    assert files(tmp_path) == set()


# ---- engine faults ---------------------------------------------------------------------------------------------

def _split_ignoring_its_sizes(b, node):
    """A faulty split rule (the engine's before it learned that literal sizes are constants of the code): the
    pieces get their share of the input's channels and nothing is pinned, so a pruned input breaks the call."""
    from dpruner.graph.atoms import Chan

    x = b.val(node.args[0])
    pieces, start = [], 0
    for meta in node.meta["tensor_meta"]:
        pieces.append(Chan(x.axis, x.atoms[start : start + meta.shape[x.axis]]))
        start += meta.shape[x.axis]
    return tuple(pieces)


def test_a_pruned_model_that_fails_its_check_is_exit_70_naming_the_node(tmp_path, monkeypatch):
    from dpruner.graph import rules
    from tests.hostile import split_net

    torch.save(split_net().state_dict(), tmp_path / "s.pt")
    monkeypatch.setitem(rules.FUNCTION_RULES, torch.split, _split_ignoring_its_sizes)  # plant an engine bug
    run = invoke("prune", "s.pt", "--arch", f"{HOSTILE}:split_net", "--input-shape", "1,8,8", "--ratio", "2x",
                 "-o", "o.pt", cwd=tmp_path)
    assert run.code == 70, run.stderr
    line = run.one_error_line()
    assert "node 'split'" in line and "bug in dpruner" in line and "--exclude 'conv'" in line
    assert files(tmp_path) == {"s.pt"}
    workaround = invoke("prune", "s.pt", "--arch", f"{HOSTILE}:split_net", "--input-shape", "1,8,8",
                        "--sparsity", "0.3", "--exclude", "conv", "-o", "o.pt", cwd=tmp_path)
    assert workaround.code == 0, workaround.stderr


def test_split_with_literal_sizes_pins_its_input_naming_the_node(tmp_path):
    """The real engine: the split input's channels are pinned (the sizes [2, 6] are constants of the code), the
    layers after it are pruned, and the model runs."""
    from tests.hostile import split_net

    torch.save(split_net().state_dict(), tmp_path / "s.pt")
    run = invoke("prune", "s.pt", "--arch", f"{HOSTILE}:split_net", "--input-shape", "1,8,8", "--sparsity", "0.5",
                 "-o", "o.pt", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    pinned = [u for u in doc["unprunable"] if "conv" in u["layers"]]
    assert pinned and "split: torch.split with fixed sizes [2, 6]" in pinned[0]["reasons"]
    assert doc["after"]["params"] < doc["before"]["params"]


# ---- stray output ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [["--baseline", "missing.pt"], ["--data", "nosuch:x"], ["--markdown", "no/dir/r.md"],
                                 ["--batches", "0"], ["--threads", "99999"],
                                 ["--data", f"python:{HOSTILE}:float_labels"]])  # found by the property test
def test_export_validates_every_input_before_writing(bad, tmp_path):
    run = invoke("export", VGG, "--onnx", "o.onnx", "--no-latency", *bad, cwd=tmp_path)
    assert run.code == 2, run.stderr
    run.one_error_line()
    assert files(tmp_path) == set()


def test_export_takes_its_onnx_file_back_when_the_report_cannot_be_written(tmp_path, monkeypatch):
    import dpruner.cli.report as report

    def full_disk(*args, **kwargs):
        from dpruner.errors import InputError

        raise InputError("Cannot write 'r.md': No space left on device; nothing was written.")

    monkeypatch.setattr(report, "write_markdown", full_disk)
    run = invoke("export", VGG, "--onnx", "o.onnx", "--no-latency", "--markdown", "r.md", cwd=tmp_path)
    assert run.code == 2 and "No space left" in run.one_error_line()
    assert files(tmp_path) == set()


# ---- subprocesses ----------------------------------------------------------------------------------------------

def test_report_memory_probe_ignores_modules_planted_in_the_working_folder(tmp_path):
    """`dpruner report --memory` started from a folder holding json.py/numpy.py: they never run."""
    marker = tmp_path / "PLANTED_RAN"
    for name in ("numpy", "json"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}')\n")
    script = Path(sys.executable).with_name("dpruner")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from dpruner.cli.app import main; main()"]
    proc = subprocess.run([*command, "report", VGG, VGG, "--memory", "--no-latency", "--json"], capture_output=True,
                          text=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    doc = json.loads(proc.stdout)
    assert doc["after"]["peak_forward_bytes"]["torch"]["1"] is not None
