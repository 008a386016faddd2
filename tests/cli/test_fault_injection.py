"""Fault injection for every atomic write and state file (issue 13): a run is interrupted (Ctrl-C) at each write
-- before the write, after the write but before the rename, and after the final rename but before the state file
is removed -- and the `--resume` (when a state file survived) or a plain rerun must end with exactly the result of
an uninterrupted run, leaving no temporary files behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import dpruner.io.atomic as atomic
import dpruner.train.api as train_api
import dpruner.train.state as train_state
from tests.cli.conftest import invoke
from tests.conftest import SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")

FINETUNE = ["finetune", VGG, "--data", "digits", "--epochs", "3", "--batch-size", "512", "--quiet", "-o", "out.pt"]
TOLERANCE = ["prune", VGG, "--data", "digits", "--tolerance", "2%", "--budget-epochs", "1.5", "--step-epochs",
             "0.5", "--batch-size", "512", "--quiet", "-o", "out.pt"]
ONE_SHOT = ["prune", VGG, "--ratio", "2x", "-o", "out.pt"]
EXPORT = ["export", VGG, "--onnx", "out.onnx", "--no-latency", "--markdown", "out.md", "--baseline", VGG]
REPORT = ["report", VGG, VGG, "--no-latency", "--markdown", "out.md"]


class Interrupt:
    """Raise KeyboardInterrupt at the `at`-th atomic write, in `phase`; count the writes when `at` is None."""

    def __init__(self, monkeypatch, at: int | None, phase: str):
        self.at, self.phase, self.writes, self.replaces = at, phase, 0, 0
        real_write, real_replace, real_remove = atomic.atomic_write, os.replace, train_api.remove_state

        def write(path, writer, **kwargs):
            self.writes += 1
            if self.writes == self.at and phase == "before write":
                raise KeyboardInterrupt
            return real_write(path, writer, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith((".pt", ".resume", ".onnx", ".md")):
                self.replaces += 1
                if self.replaces == self.at and phase == "before rename":
                    raise KeyboardInterrupt
            return real_replace(src, dst, *args, **kwargs)

        def remove(path, ctx=None):
            if phase == "before state removal" and self.at is not None:
                raise KeyboardInterrupt
            return real_remove(path) if ctx is None else real_remove(path, ctx)

        monkeypatch.setattr(atomic, "atomic_write", write)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(train_api, "remove_state", remove)  # finetune reads it from train.api
        monkeypatch.setattr(train_state, "remove_state", remove)  # prune --tolerance from train.state


def outcome(folder: Path) -> dict[str, str]:
    """What a finished run leaves: the files and a digest of each (model tensors, not pickle bytes, for .pt)."""
    result = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".pt":
            doc = torch.load(path, weights_only=True)
            digest = hashlib.sha256()
            for key, tensor in sorted(doc["state_dict"].items()):
                digest.update(key.encode() + tensor.numpy().tobytes())
            digest.update(repr(doc["plan"]).encode())
            result[path.name] = digest.hexdigest()
        else:
            result[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def reference(args, tmp_path, monkeypatch) -> tuple[dict, int]:
    folder = tmp_path / "reference"
    folder.mkdir()
    with monkeypatch.context() as patch:
        counter = Interrupt(patch, None, "")
        run = invoke(*args, cwd=folder)
    assert run.code == 0, run.stderr
    return outcome(folder), {"before write": counter.writes, "before rename": counter.replaces}


def interrupted_then_finished(args, tmp_path, monkeypatch, at: int, phase: str, resumable: bool) -> dict:
    folder = tmp_path / f"{phase.replace(' ', '_')}_{at}"
    folder.mkdir()
    with monkeypatch.context() as patch:
        Interrupt(patch, at, phase)
        first = invoke(*args, cwd=folder)
    assert first.code == 130, first.stderr
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]
    state = folder / "out.pt.resume"
    again = invoke(*args, *(["--resume"] if resumable and state.exists() else []), cwd=folder)
    assert again.code == 0, again.stderr
    assert not state.exists()
    return outcome(folder)


@pytest.mark.parametrize("phase", ["before write", "before rename"])
def test_finetune_interrupted_at_every_write_resumes_to_the_same_model(phase, tmp_path, monkeypatch):
    expected, counts = reference(FINETUNE, tmp_path, monkeypatch)
    writes = counts[phase]
    assert writes == 3  # the states after epochs 1 and 2, then the output
    for at in range(1, writes + 1):
        assert interrupted_then_finished(FINETUNE, tmp_path, monkeypatch, at, phase, True) == expected, at


def test_finetune_interrupted_after_writing_before_removing_the_state(tmp_path, monkeypatch):
    expected, _ = reference(FINETUNE, tmp_path, monkeypatch)
    assert interrupted_then_finished(FINETUNE, tmp_path, monkeypatch, 1, "before state removal", True) == expected


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before write", "before rename"])
def test_tolerance_run_interrupted_at_every_write_resumes_to_the_same_model(phase, tmp_path, monkeypatch):
    expected, counts = reference(TOLERANCE, tmp_path, monkeypatch)
    writes = counts[phase]
    assert writes >= 2  # at least one step's state, then the output
    for at in range(1, writes + 1):
        assert interrupted_then_finished(TOLERANCE, tmp_path, monkeypatch, at, phase, True) == expected, at


def test_tolerance_run_interrupted_before_removing_the_state(tmp_path, monkeypatch):
    expected, counts = reference(TOLERANCE, tmp_path, monkeypatch)
    writes = counts["before rename"]
    assert interrupted_then_finished(TOLERANCE, tmp_path, monkeypatch, writes, "before state removal",
                                     True) == expected
    # and the last state write interrupted: the resumed run redoes only what came after the previous state
    assert interrupted_then_finished(TOLERANCE, tmp_path, monkeypatch, writes - 1, "before rename", True) == expected


@pytest.mark.parametrize("args", [ONE_SHOT, EXPORT, REPORT], ids=["prune", "export", "report"])
@pytest.mark.parametrize("phase", ["before write", "before rename"])
def test_stateless_commands_interrupted_at_every_write_rerun_to_the_same_files(args, phase, tmp_path, monkeypatch):
    expected, counts = reference(args, tmp_path, monkeypatch)
    # export writes its ONNX file itself (verified before the rename) and the Markdown report atomically
    assert counts[phase] == {"before write": 1, "before rename": 2 if args is EXPORT else 1}[phase]
    for at in range(1, counts[phase] + 1):
        assert interrupted_then_finished(args, tmp_path, monkeypatch, at, phase, False) == expected, at
