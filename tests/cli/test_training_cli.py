"""evaluate / finetune / prune --tolerance from the shell: JSON schemas, outputs that load, exit codes, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dpruner
from tests.conftest import ROOT, SAMPLE_MODELS

VGG = str(SAMPLE_MODELS / "digits_vgg.pt")


def dp(*args: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


def torchrun2(*args: str):
    """`dpruner ARGS` as two CPU processes under torchrun (gloo), one intra-op thread each."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "dpruner", *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_failure(stderr: str) -> str:
    """What a failed torchrun run says: the ranks' own error lines, then torchrun's summary (which alone only names
    the signal, and is long enough to push the rank's message out of a plain tail)."""
    clues = [line for line in stderr.splitlines()
             if any(k in line for k in ("Error", "error", "terminate", "what()", "Traceback", "Exception", "abort"))]
    return "\n".join(clues[:40]) + "\n...\n" + stderr[-1500:]


def test_evaluate_json():
    proc = dp("evaluate", VGG, "--data", "digits", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == 1 and doc["val"]["samples"] == 145 and doc["test"]["samples"] == 359
    assert doc["test"]["accuracy"] == pytest.approx(0.9944, abs=1e-3)  # the sample model's recorded accuracy


def test_finetune_writes_a_loadable_checkpoint_with_distillation(tmp_path):
    small = tmp_path / "small.pt"
    assert dp("prune", VGG, "--ratio", "2x", "-o", str(small)).returncode == 0
    out = tmp_path / "small_ft.pt"
    proc = dp("finetune", str(small), "--data", "digits", "--epochs", "2", "--teacher", VGG, "-o", str(out),
              "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["distill"] is True and doc["train"]["epochs"] == 2
    assert doc["after"]["test"]["accuracy"] >= 0.9
    loaded = dpruner.load_checkpoint(out)
    assert len(loaded.plan) == 1 and loaded.meta["finetune"]["distill"] is True
    assert not (tmp_path / "small_ft.pt.resume").exists()


def test_prune_to_tolerance_json_schema_and_result(tmp_path):
    out = tmp_path / "tol.pt"
    proc = dp("prune", VGG, "--data", "digits", "--tolerance", "1%", "--budget-epochs", "4", "--step-epochs",
              "0.5", "-o", str(out), "--json", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for key in ("schema", "before", "after", "ratio", "tolerance", "output", "method", "history"):
        assert key in doc
    for side in ("before", "after"):
        assert {"params", "macs", "accuracy", "test_accuracy"} <= set(doc[side])
    assert doc["tolerance"] == pytest.approx(0.01) and doc["method"] == "tolerance" and doc["criterion"] == "l1" and doc["output"] == str(out)
    assert doc["after"]["accuracy"] >= doc["before"]["accuracy"] - 0.01 - 1e-9
    assert doc["ratio"]["macs"] > 1.0 and doc["epochs_used"] <= 4 + 1e-9
    assert doc["history"][0]["action"] == "start" and doc["history"][-1]["action"] == "final"
    steps = [h for h in doc["history"] if h["action"] == "prune"]
    assert steps and all({"ratio_macs", "macs", "params", "val_accuracy", "rate"} <= set(h) for h in steps)
    loaded = dpruner.load_checkpoint(out)
    assert dpruner.count_macs(loaded.model, torch.randn(1, 1, 8, 8)).total == doc["after"]["macs"]


def test_ratio_with_data_fine_tunes_after_pruning(tmp_path):
    out = tmp_path / "r.pt"
    proc = dp("prune", VGG, "--data", "digits", "--ratio", "2x", "--budget-epochs", "1", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ratio"]["macs"] == pytest.approx(2.0, rel=0.05) and doc["epochs_used"] == 1
    assert doc["after"]["test_accuracy"] > 0.8


def test_spp_from_the_shell_writes_a_plain_pruned_model(tmp_path):
    out = tmp_path / "spp.pt"
    proc = dp("prune", VGG, "--data", "digits", "--method", "spp", "--ratio", "2x", "--spp-a", "0.3",
              "--budget-epochs", "2", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["method"] == "spp" and doc["criterion"] == "l1" and doc["ratio"]["macs"] == pytest.approx(2.0, rel=0.05)
    assert doc["spp"]["rank_updates"] > 1 and doc["spp"]["pruned_channels"] > 0 and doc["after"]["test_accuracy"] > 0.8
    loaded = dpruner.load_checkpoint(out)
    assert dpruner.count_macs(loaded.model, torch.randn(1, 1, 8, 8)).total == doc["after"]["macs"]
    assert loaded.meta["pruned"]["method"] == "spp"
    assert set(loaded.model.state_dict()) == set(dpruner.load_model(VGG).state_dict())  # nothing added


def test_gate_from_the_shell_writes_a_plain_model_at_the_ratio(tmp_path):
    out = tmp_path / "gate.pt"
    proc = dp("prune", VGG, "--data", "digits", "--method", "gate", "--ratio", "2x", "--gate-every", "0.5",
              "--budget-epochs", "3", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["method"] == "gate" and doc["target_met"] and doc["ratio"]["macs"] >= 1.9
    assert {"removed", "forced", "action"} <= set(doc["history"][0]) and doc["after"]["test_accuracy"] > 0.8
    loaded = dpruner.load_checkpoint(out)
    assert dpruner.count_macs(loaded.model, torch.randn(1, 1, 8, 8)).total == doc["after"]["macs"]
    assert set(loaded.model.state_dict()) == set(dpruner.load_model(VGG).state_dict())  # no scorers left


def test_gate_with_a_tolerance_it_cannot_keep_writes_nothing(tmp_path):
    """11 training batches per epoch are too few for the gates to decide: the last interval forces the ratio,
    validation falls past 1% at 4x (2x within 2% is kept since forced removals follow score x L1), the step is
    rolled back, exit 1 and no file."""
    out = tmp_path / "gate.pt"
    proc = dp("prune", VGG, "--data", "digits", "--method", "gate", "--ratio", "4x", "--tolerance", "1%",
              "--gate-every", "0.5", "--budget-epochs", "4", "-o", str(out), "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert not doc["target_met"] and doc["gate"]["stopped_by"] == "tolerance" and not out.exists()
    assert doc["history"][-1]["action"] == "rolled back" and "the gates did not reach the goal" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["prune", VGG, "--tolerance", "1%", "-o", "x.pt"], "needs --data"),
    (["prune", VGG, "--tolerance", "150%", "--data", "digits", "-o", "x.pt"], "--tolerance"),
    (["prune", VGG, "--tolerance", "1%", "--ratio", "2x", "--data", "digits", "-o", "x.pt"], "one of"),
    (["evaluate", VGG, "--data", "nosuch:thing"], "Unknown data set"),
    (["evaluate", VGG, "--data", "imagefolder:/does/not/exist"], "/does/not/exist"),
    (["evaluate", VGG], "needs --data"),
    (["evaluate", VGG, "--data", "digits", "--mean", "a,b"], "--mean must be"),
    (["finetune", VGG, "--data", "digits", "-o", "y.pt", "--resume"], "no saved state"),
    (["prune", VGG, "--data", "digits", "--tolerance", "1%", "-o", "y.pt", "--resume"], "no saved state"),
    (["prune", VGG, "--ratio", "2x", "-o", "y.pt", "--resume"], "--resume applies"),
    (["prune", VGG, "--data", "digits", "--method", "spp", "--ratio", "2x", "-o", "y.pt", "--resume"], "no saved state"),
    (["prune", VGG, "--data", "digits", "--method", "gate", "--ratio", "2x", "-o", "y.pt", "--resume"],
     "no saved state"),
    (["prune", VGG, "--ratio", "2x", "--method", "l1", "--criterion", "fpgm", "-o", "y.pt"], "give the criterion once"),
    (["prune", VGG, "--ratio", "2x", "--method", "tolerance", "-o", "y.pt"], "give --tolerance"),
    (["prune", VGG, "--ratio", "2x", "--criterion", "nosuch", "-o", "y.pt"], "nosuch"),
    (["prune", VGG, "--ratio", "2x", "--allocation", "sensitivity", "-o", "y.pt"], "give --data"),
    (["prune", VGG, "--ratio", "2x", "--method", "spp", "-o", "y.pt"], "give --ratio and --data"),
    (["prune", VGG, "--ratio", "2x", "--method", "spp", "--data", "digits", "--spp-u", "0.7", "-o", "y.pt"],
     "--spp-u"),
    (["prune", VGG, "--tolerance", "1%", "--method", "spp", "--data", "digits", "-o", "y.pt"], "not to a --tolerance"),
    (["prune", VGG, "--ratio", "2x", "--method", "gate", "-o", "y.pt"], "give --data"),
    (["prune", VGG, "--method", "gate", "--data", "digits", "-o", "y.pt"], "needs a goal"),
    (["prune", VGG, "--ratio", "2x", "--method", "gate", "--criterion", "l1", "--data", "digits", "-o", "y.pt"],
     "own scorer"),
    (["prune", VGG, "--ratio", "2x", "--method", "gate", "--data", "digits", "--gate-threshold", "2", "-o", "y.pt"],
     "--gate-threshold"),
    (["prune", VGG, "--ratio", "2x", "--method", "coarse", "-o", "y.pt"], "give --data"),
    (["prune", VGG, "--ratio", "2x", "--method", "coarse", "--granularity", "kernel", "--data", "digits", "-o",
      "y.pt"], "give --sparsity"),
    (["prune", VGG, "--ratio", "2x", "--method", "coarse", "--data", "digits", "--candidates", "0", "-o", "y.pt"],
     "--candidates"),
    (["prune", VGG, "--ratio", "2x", "--method", "spp", "--data", "digits", "--soft", "-o", "y.pt"], "--soft"),
    (["analyze", VGG, "--sensitivity"], "give --data"),
    (["analyze", VGG, "--data", "digits", "--plot", "p.png"], "add --sensitivity"),
    (["analyze", VGG, "--data", "digits", "--sensitivity", "--criterion", "nosuch"], "nosuch"),
])
def test_user_errors_are_one_sentence_with_exit_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.pt"))


def test_sensitivity_measured_by_analyze_is_reused_by_prune(tmp_path):
    """analyze --sensitivity caches its curves by model hash and data options; prune --allocation sensitivity with
    the same options reads them instead of measuring again, and reaches the target."""
    common = ["--data", "digits", "--val-from", "test", "--sensitivity-batches", "2", "--criterion", "l1"]
    scan = dp("analyze", VGG, *common, "--sensitivity", "--json")
    assert scan.returncode == 0, scan.stderr
    curves = json.loads(scan.stdout)["sensitivity"]
    assert curves["cached"] is False and curves["groups"] and curves["criterion"] == "l1"
    assert all(len(g["accuracy"]) == len(curves["levels"]) for g in curves["groups"])
    out = tmp_path / "s.pt"
    proc = dp("prune", VGG, *common, "--ratio", "2x", "--allocation", "sensitivity", "--budget-epochs", "0.5",
              "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["sensitivity"]["cached"] is True and doc["sensitivity"]["key"] == curves["key"]
    assert doc["ratio"]["macs"] >= 2.0 and doc["criterion"] == "l1" and doc["method"] == "one-shot"
    assert dpruner.load_model(out) is not None


def test_model_data_mismatch_is_exit_2(tmp_path):
    """A 1000-class ImageNet model on 1-channel 8x8 digits: one sentence, not a traceback."""
    state = tmp_path / "r18.pt"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), state)
    proc = dp("evaluate", str(state), "--arch", "torchvision:resnet18", "--data", "digits")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot run on the data's images" in proc.stderr or "classes" in proc.stderr


def test_first_step_failure_exits_1_and_writes_nothing(tmp_path):
    """A tolerance no step can meet (0.01 points on a 145-image split: any lost image fails), one try only."""
    out = tmp_path / "none.pt"
    proc = dp("prune", VGG, "--data", "digits", "--tolerance", "0.0001", "--budget-epochs", "3",
              "--lr", "0.3", "--penalty", "0", "-o", str(out), "--json")
    doc = json.loads(proc.stdout)
    assert doc["target_met"] is False
    assert proc.returncode == 1 and doc["output"] is None and not out.exists()


def test_torchrun_two_cpu_processes_gloo(tmp_path):
    out = tmp_path / "ddp.pt"
    proc = torchrun2("finetune", VGG, "--data", "digits", "--epochs", "1", "-o", str(out), "--json", "--device", "cpu")
    assert proc.returncode == 0, rank_failure(proc.stderr)
    doc = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 prints
    assert doc["world_size"] == 2
    assert doc["after"]["val"]["samples"] == 145 and doc["after"]["test"]["samples"] == 359  # exact, not padded
    assert doc["train"]["steps"] == 6  # each rank trains on half of the 11 batches' worth
    assert dpruner.load_checkpoint(out).meta["finetune"]["epochs"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ddp.pt"]  # one writer, no temp files left


def test_same_seed_same_result_byte_for_byte(tmp_path):
    """CI runs must be reproducible: the tolerance run twice with --seed gives identical plans and weights."""
    outs = []
    for name in ("a.pt", "b.pt"):
        out = tmp_path / name
        proc = dp("prune", VGG, "--data", "digits", "--tolerance", "1%", "--budget-epochs", "2", "--step-epochs",
                  "0.5", "--seed", "3", "-o", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        outs.append(torch.load(out, weights_only=True))
    a, b = outs
    assert a["plan"] == b["plan"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_torchrun_tolerance_run_agrees_across_ranks(tmp_path):
    """Both ranks take the same controller decisions (metrics are summed before they are read); rank 0 writes."""
    out = tmp_path / "tol.pt"
    proc = torchrun2("prune", VGG, "--data", "digits", "--tolerance", "1%", "--budget-epochs", "2", "--step-epochs",
                     "0.5", "-o", str(out), "--json", "--device", "cpu")
    assert proc.returncode == 0, rank_failure(proc.stderr)
    doc = json.loads(proc.stdout)
    assert doc["world_size"] == 2 and doc["target_met"] and doc["ratio"]["macs"] > 1
    assert doc["after"]["accuracy"] >= doc["before"]["accuracy"] - 0.01 - 1e-9
    loaded = dpruner.load_checkpoint(out)
    assert dpruner.count_macs(loaded.model, torch.randn(1, 1, 8, 8)).total == doc["after"]["macs"]


@pytest.mark.parametrize("fails", [False, True])
def test_commands_leave_the_process_group_however_they_end(fails, tmp_path):
    """A rank must not exit with a live Gloo group (it can die with SIGABRT at interpreter shutdown): the training
    commands' wrapper destroys the group on success and on error."""
    import torch.distributed as dist

    from dpruner.cli.training import releases_process_group

    @releases_process_group
    def command():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()
        if fails:
            raise ValueError("boom")
        return "done"

    if fails:
        with pytest.raises(ValueError):
            command()
    else:
        assert command() == "done"
    assert not dist.is_initialized()
