"""Coarse pruning with least-adversarial masks (methods/coarse.py, seed 002): a planted harmless mask is picked
among harmful ones, groups go from input to output, and a real run on the digits sample model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.data.loaders import load_data
from dpruner.errors import InputError
from dpruner.graph.summary import analyze_groups
from dpruner.methods.coarse import CoarseConfig, batch_statistics, group_order, judge, least_adversarial
from dpruner.methods.run import resolve, run
from dpruner.train.config import TrainConfig
from tests.conftest import SAMPLE_MODELS


class Probe(nn.Module):
    """conv (4 channels) -> relu -> 1x1 conv -> pooled classifier. Channels 0-2 carry the class evidence; channel 3
    reaches nothing (its outgoing weights are zero), so removing it is harmless."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(1.0)
            for c in range(3):
                self.conv.weight[c, c] = 5.0
            self.head.weight.zero_()
            for c in range(3):
                self.head.weight[c, c] = 1.0

    def forward(self, x):
        return self.head(F.relu(self.conv(x))).mean((2, 3))


def _batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        y = torch.randint(0, 3, (16,), generator=gen)
        x = torch.zeros(16, 3, 4, 4)
        x[torch.arange(16), y] = 1.0  # the input channel of the class lights up
        out.append((x + 0.01 * torch.randn(16, 3, 4, 4, generator=gen), y))
    return out


def test_the_least_adversarial_candidate_is_the_planted_harmless_mask():
    model = Probe().eval()
    batches = _batches()
    assert judge(model, batches, [None], lambda variant: None, lambda: None, set())[0][0] == 0.0  # as it stands
    graph, index = analyze_groups(model, torch.randn(1, 3, 4, 4))
    group = next(g for g in index.groups if ("conv", "out", None) in g.slots)
    fixed = np.zeros(len(index.roots), dtype=bool)
    flags, tried = least_adversarial(model, graph, index, group, 1, fixed, batches, 12,
                                     torch.Generator().manual_seed(0))
    removed = np.flatnonzero(flags[np.searchsorted(index.roots, group.channels)])
    assert removed.tolist() == [3]
    assert min(t["error"] for t in tried) == 0.0 and max(t["error"] for t in tried) > 0.2  # the others hurt
    assert torch.equal(model.conv.weight, Probe().conv.weight)  # every candidate was undone


def test_the_criterions_candidate_competes_and_loses_when_it_hurts():
    model = Probe().eval()
    batches = _batches()
    graph, index = analyze_groups(model, torch.randn(1, 3, 4, 4))
    group = next(g for g in index.groups if ("conv", "out", None) in g.slots)
    fixed = np.zeros(len(index.roots), dtype=bool)
    positions = np.searchsorted(index.roots, group.channels)
    # a harmful prior (channel 0 carries class 0) loses to the harmless random mask
    flags, tried = least_adversarial(model, graph, index, group, 1, fixed, batches, 12,
                                     torch.Generator().manual_seed(0), prior=np.array([0]))
    assert tried[0]["prior"] and tried[0]["error"] > 0.2
    assert np.flatnonzero(flags[positions]).tolist() == [3]
    # the harmless prior is kept even when no random candidate finds it (one candidate: the prior alone)
    flags, tried = least_adversarial(model, graph, index, group, 1, fixed, batches, 1,
                                     torch.Generator().manual_seed(0), prior=np.array([3]))
    assert len(tried) == 1 and tried[0]["error"] == 0.0
    assert np.flatnonzero(flags[positions]).tolist() == [3]


def test_candidates_are_judged_on_batch_statistics_without_touching_the_running_ones():
    """A shifted input (what removing an earlier channel does to a later norm) wrecks a model on stale running
    statistics; on the batch's own statistics it is what recalibration would give, and nothing is updated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.randn(64, 3, 4, 4)
    model.train()
    for _ in range(50):
        model(x)  # running statistics of this input distribution
    model.eval()
    shifted = x * 3 + 2
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    stale = model(shifted)
    with batch_statistics(model):
        inside = model(shifted)
        assert model[1].training and not model[0].training  # only the norm switches
    expected = F.batch_norm(model[0](shifted), None, None, model[1].weight, model[1].bias, training=True)
    assert torch.allclose(inside, model[5](model[4](model[3](F.relu(expected)))), atol=1e-6)
    assert not torch.allclose(inside, stale, atol=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())  # running stats, counter untouched
    assert not model[1].training and model[1].track_running_stats
    with batch_statistics(model, enabled=False):
        assert not model[1].training


def test_groups_are_visited_from_input_to_output():
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    graph, index = analyze_groups(model, torch.randn(1, 1, 8, 8))
    order = [g.layers[0] for g in group_order(model, graph, index)]
    assert order == ["features.0", "features.2", "features.5", "features.7", "classifier.0"]


def test_config_and_resolve():
    with pytest.raises(InputError, match="--candidates"):
        CoarseConfig(ratio=2.0, candidates=0)
    assert resolve("coarse", None, tolerance=False) == ("coarse", "l1")
    with pytest.raises(InputError, match="not to a --tolerance"):
        resolve("coarse", None, tolerance=True)


def test_coarse_prunes_digits_to_the_ratio_with_the_best_candidates():
    data = load_data("digits", batch_size=64, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    keys = set(model.state_dict())
    result = run("coarse", model, torch.randn(1, 1, 8, 8), CoarseConfig(ratio=2.0, candidates=6, eval_batches=2),
                 data=data, train=TrainConfig(epochs=1, quiet=True))
    assert result.target_met and result.ratio["macs"] == pytest.approx(2.0, rel=0.05)
    groups = result.details["coarse"]["groups"]
    assert len(groups) == 5 and all(g["best_error"] <= g["median_error"] <= g["worst_error"] for g in groups)
    assert result.after["accuracy"] > 0.8 and set(result.model.state_dict()) == keys
    coarse = result.details["coarse"]
    assert coarse["criterion_candidate"] and coarse["criterion_won"] == sum(g["criterion_won"] for g in groups)
    assert all(g["best_error"] <= g["criterion_error"] for g in groups)


def test_kernel_granularity_keeps_masked_kernels_zero_through_the_retrain():
    data = load_data("digits", batch_size=64, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    result = run("coarse", model, torch.randn(1, 1, 8, 8),
                 CoarseConfig(granularity="kernel", sparsity=0.5, candidates=3, eval_batches=1, exclude=("features.0",)),
                 data=data, train=TrainConfig(epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-3, quiet=True))
    details = result.details["coarse"]
    assert details["granularity"] == "kernel" and details["masked_layers"] == 3
    assert details["kernel_sparsity"] == pytest.approx(0.5, abs=0.01)
    for name in ("features.2", "features.5", "features.7"):
        weight = dict(result.model.named_modules())[name].weight
        zero = (weight.flatten(2).abs().sum(2) == 0).float().mean()
        assert float(zero) == pytest.approx(0.5, abs=0.01), name  # the zeros survived momentum and weight decay
    assert result.ratio["macs"] == 1.0  # kernel sparsity is reported, not counted as MACs saved


def test_an_input_channel_no_layer_reads_is_removed_and_counted():
    from dpruner.methods.coarse import empty_channels

    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt").eval()
    graph, index = analyze_groups(model, torch.randn(1, 1, 8, 8))
    masks = {"features.2": torch.zeros(32, 32, dtype=torch.bool)}
    masks["features.2"][:, [4, 9]] = True  # nothing reads input channels 4 and 9 of features.2 any more
    masks["features.2"][:5, 11] = True  # channel 11 is still read by outputs 5..31
    flags = empty_channels(model, graph, index, masks)
    group = next(g for g in index.groups if ("features.2", "in", None) in g.slots)
    chosen = np.flatnonzero(flags[np.searchsorted(index.roots, group.channels)])
    assert chosen.tolist() == [4, 9] and flags.sum() == 2


def test_planner_options_that_need_data_are_refused_up_front():
    data = load_data("digits", batch_size=64, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    example = torch.randn(1, 1, 8, 8)
    with pytest.raises(InputError, match="weight criterion"):
        run("coarse", model, example, CoarseConfig(ratio=2.0, criterion="taylor"), data=data)
    with pytest.raises(InputError, match="--allocation uniform or global"):
        run("coarse", model, example, CoarseConfig(ratio=2.0, allocation="pca"), data=data)
    from dpruner.methods.spp import SPPConfig

    with pytest.raises(InputError, match="--allocation uniform or global"):
        run("spp", model, example, SPPConfig(ratio=2.0, allocation="sensitivity"), data=data,
            train=TrainConfig(epochs=1))


def test_kernel_config_checks():
    with pytest.raises(InputError, match="give --sparsity"):
        CoarseConfig(granularity="kernel", ratio=2.0)
    with pytest.raises(InputError, match="--granularity"):
        CoarseConfig(granularity="row", ratio=2.0)
    with pytest.raises(InputError, match="to a --ratio"):
        CoarseConfig(sparsity=0.5)


def test_kernel_run_removes_emptied_channels_and_the_masks_follow(monkeypatch):
    """A chosen mask that empties input channels 4 and 9 of features.2: they are removed physically (30 channels
    left in features.0 / features.2's input), counted in the MACs, and the remaining masked kernels stay zero."""
    import dpruner.methods.coarse as coarse

    def planted(model, name, n_zero, batches, candidates, generator, ctx=None, device="cpu", bn_batch=False,
                prefix=None):
        weight = dict(model.named_modules())[name].weight
        mask = torch.zeros(weight.shape[:2], dtype=torch.bool)
        if name == "features.2":
            mask[:, [4, 9]] = True
            mask[0, 0] = True
        return mask, [{"error": 0.0, "loss": 0.0}]

    monkeypatch.setattr(coarse, "least_adversarial_kernels", planted)
    data = load_data("digits", batch_size=64, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    result = run("coarse", model, torch.randn(1, 1, 8, 8),
                 CoarseConfig(granularity="kernel", sparsity=0.1, candidates=1, eval_batches=1), data=data,
                 train=TrainConfig(epochs=0.5, quiet=True))
    assert result.details["coarse"]["removed_channels"] == 2 and result.ratio["macs"] > 1.0
    modules = dict(result.model.named_modules())
    assert modules["features.0"].out_channels == 30 and modules["features.2"].in_channels == 30
    assert float(modules["features.2"].weight.detach()[0, 0].abs().sum()) == 0  # the surviving masked kernel
    replay = dpruner.apply_plan(dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), result.plans[0])
    assert [p.shape for p in replay.parameters()] == [p.shape for p in result.model.parameters()]


SCRIPT = '''
import sys, torch
sys.path.insert(0, {root!r})
import dpruner
from dpruner.data.loaders import load_data
from dpruner.methods.coarse import CoarseConfig
from dpruner.methods.run import run
from dpruner.train.config import TrainConfig
from dpruner.train.distributed import setup, teardown
ctx, device = setup("cpu")
torch.set_num_threads(1)
data = load_data("digits", batch_size=32, rank=ctx.rank, world_size=ctx.world_size)
model = dpruner.load_model({model!r})
result = run("coarse", model, torch.randn(1, 1, 8, 8), CoarseConfig(ratio=2.0, candidates=4, eval_batches=2),
             data=data, train=TrainConfig(epochs=0.5, quiet=True), ctx=ctx, device=device)
torch.save({{"plan": result.plans[0], "groups": result.details["coarse"]["groups"]}}, {out!r} + str(ctx.rank))
teardown()
'''


@pytest.mark.slow
def test_two_torchrun_ranks_keep_the_same_masks(tmp_path):
    """Candidate errors are summed over ranks (each holds its own share of the validation batches) and every rank
    draws the same candidates, so both gloo ranks keep the same masks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = str(tmp_path / "coarse")
    script = tmp_path / "coarse.py"
    script.write_text(SCRIPT.format(root=root, out=out, model=str(SAMPLE_MODELS / "digits_vgg.pt")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(out + r, weights_only=False) for r in "01")
    assert a["plan"] == b["plan"] and a["groups"] == b["groups"]
