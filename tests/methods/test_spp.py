"""Structured probabilistic pruning (methods/spp.py, seed 004): the rank-based update, mask sampling, masked weights
left alone by the optimizer, stop conditions, and a real run on the digits sample model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.data.loaders import load_data
from dpruner.errors import InputError
from dpruner.graph.summary import analyze_groups
from dpruner.methods.run import resolve, run
from dpruner.methods.spp import (SPPConfig, SPPMasks, SPPState, effective_A, force_goals, increments, removed_flags,
                                 update_probabilities)
from dpruner.train.config import TrainConfig
from dpruner.train.loop import fit
from tests.conftest import SAMPLE_MODELS


def test_increments_follow_the_papers_curve():
    """m = 6 still to prune, A = 0.05, u = 0.25: alpha = ln(8)/6, N_c = 4; delta(0) = A, delta(N_c) = uA,
    delta(m) = 0 (the boundary), negative past it."""
    delta = increments(12, 6, A=0.05, u=0.25)
    alpha = math.log(8) / 6
    assert delta[0] == pytest.approx(0.05)
    assert delta[1] == pytest.approx(0.05 * math.exp(-alpha))
    assert delta[4] == pytest.approx(0.0125)
    assert delta[6] == pytest.approx(0.0, abs=1e-12)
    assert delta[7] == pytest.approx(0.025 - 0.05 * math.exp(-alpha * 1))
    assert (np.diff(delta) < 0).all() and (delta[7:] < 0).all()
    assert not increments(5, 0, 0.05, 0.25).any()


def test_update_moves_the_weakest_up_and_the_strongest_down():
    p = np.array([0.5, 0.5, 0.5, 0.5])
    scores = np.array([3.0, 0.1, 2.0, 1.0])  # ranks: channel 1 -> 0, 3 -> 1, 2 -> 2, 0 -> 3
    new = update_probabilities(p, scores, goal=2, A=0.05, u=0.25)
    delta = increments(4, 2, 0.05, 0.25)
    np.testing.assert_allclose(new, 0.5 + delta[[3, 0, 2, 1]])
    assert new[1] > new[3] > 0.5 > new[0]


def test_channels_pruned_for_good_leave_the_ranking_and_the_goal_caps_them():
    p = np.array([1.0, 0.99, 0.99, 0.2])
    scores = np.array([0.0, 0.5, 0.4, 9.0])
    new = update_probabilities(p, scores, goal=2, A=0.05, u=0.25)  # one more may go: both 1 and 2 would cross
    assert new[0] == 1.0 and new[2] == 1.0  # the weaker of the two crossing (same raw value: lower score)
    assert (new[[1, 3]] == 0).all()  # goal reached: the others return to 0 and are no longer sampled
    done = update_probabilities(new, scores, goal=2, A=0.05, u=0.25)
    np.testing.assert_array_equal(done, new)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _setup(probabilities, goal, **config):
    torch.manual_seed(0)
    model = Net()
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    group = next(g for g in index.groups if g.prunable)
    state = SPPState({group.id: np.asarray(probabilities, dtype=np.float64)}, {group.id: goal})
    return model, graph, index, group, state, SPPConfig(ratio=2.0, **config)


def test_masks_are_drawn_with_each_channels_probability():
    p = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 0.0]
    model, graph, index, group, state, config = _setup(p, goal=1)
    masks = SPPMasks(graph, index, state, config)
    where = np.searchsorted(index.roots, group.channels)
    draws = np.stack([masks.masks(step)[where] for step in range(4000)])
    np.testing.assert_allclose(draws.mean(0), p, atol=0.03)
    np.testing.assert_array_equal(masks.masks(7), masks.masks(7))  # seeded by step: every rank draws the same


class Frozen(SPPMasks):
    """Probabilities held fixed (no rank updates, no early stop): the mechanics of one step alone."""

    def _rank_update(self, model):
        pass

    def should_stop(self, model, step):
        return False


class Batches(list):
    def set_epoch(self, epoch, offset=0):
        pass


class Bundle:
    def __init__(self, n=6):
        gen = torch.Generator().manual_seed(0)
        self.train = Batches((torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen))
                             for _ in range(n))

    def set_epoch(self, epoch, offset=0):
        pass


def test_masked_weights_are_untouched_by_momentum_and_weight_decay():
    """Channel 2 is always masked (p = 1): after several SGD steps with momentum 0.9 and weight decay its filter,
    bias and BN affine are exactly what they were; the other channels trained."""
    p = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    model, graph, index, group, state, config = _setup(p, goal=2)
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, Bundle(), TrainConfig(epochs=1, lr=0.5, momentum=0.9, weight_decay=0.05, quiet=True, distill_alpha=0),
        callbacks=[Frozen(graph, index, state, config)])
    after = model.state_dict()
    for name in ("conv.weight", "conv.bias", "bn.weight", "bn.bias"):
        assert torch.equal(after[name][2], before[name][2]), name
        assert not torch.equal(after[name][[0, 1, 3]], before[name][[0, 1, 3]]), name


def test_training_stops_when_every_group_reached_its_goal():
    model, graph, index, group, state, config = _setup([0.0] * 8, goal=3, interval=1, A=0.5)
    result = fit(model, Bundle(40), TrainConfig(epochs=1, quiet=True), callbacks=[SPPMasks(graph, index, state, config)])
    assert state.done() and result.steps < 40
    assert int((state.probabilities[group.id] >= 1).sum()) == 3
    assert removed_flags(index, state).sum() == 3


def test_forcing_fills_a_group_short_of_its_goal_by_highest_probability():
    state = SPPState({0: np.array([0.9, 0.2, 1.0, 0.6])}, {0: 3})
    force_goals(state, {0: np.array([1.0, 1.0, 1.0, 1.0])})
    np.testing.assert_array_equal(state.probabilities[0], [1.0, 0.0, 1.0, 1.0])
    assert state.forced == 2


def test_resolve_spp_defaults_to_l1_and_takes_a_ratio_only():
    assert resolve("spp", None, tolerance=False) == ("spp", "l1")
    with pytest.raises(InputError, match="not to a --tolerance"):
        resolve("spp", None, tolerance=True)


def test_config_rejects_out_of_range_settings():
    for bad in ({"u": 0.5}, {"A": 0.0}, {"interval": 0}, {"prune_fraction": 1.5}):
        with pytest.raises(InputError):
            SPPConfig(ratio=2.0, **bad)


def test_default_A_is_the_papers_unless_the_phase_is_too_short_to_reach_a_goal():
    assert effective_A(10_000, None, None) == 0.05  # >= 120 updates: the paper's value
    assert effective_A(39, None, None) == pytest.approx(6 / 39)  # ResNet-56 1-epoch phase: 39 updates
    assert effective_A(400, None, 10) == pytest.approx(6 / 40)  # a given interval counts updates, not steps
    assert effective_A(3, None, None) == 1.0
    assert effective_A(39, 0.05, None) == 0.05  # a given A is kept


def test_default_A_reaches_every_goal_inside_a_short_phase():
    data = load_data("digits", batch_size=64, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    result = run("spp", model, torch.randn(1, 1, 8, 8), SPPConfig(ratio=2.0), data=data,
                 train=TrainConfig(epochs=1, lr=0.01, quiet=True))
    spp = result.details["spp"]
    assert spp["A"] > 0.05 and spp["interval"] == 1
    assert spp["reached_in_phase"] and spp["forced_channels"] == 0


def test_spp_prunes_the_digits_model_to_the_ratio_and_keeps_it_accurate():
    data = load_data("digits", batch_size=64, val_from="test")
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    example = torch.randn(1, 1, 8, 8)
    result = run("spp", model, example, SPPConfig(ratio=2.0, A=0.3), data=data,
                 train=TrainConfig(epochs=2, lr=0.01, quiet=True))
    assert result.target_met and result.ratio["macs"] >= 1.9
    assert result.details["spp"]["reached_in_phase"] and result.details["spp"]["forced_channels"] == 0
    assert result.epochs_used == pytest.approx(2.0)
    assert result.after["accuracy"] > 0.8  # digits: the unpruned sample model is ~0.95 on validation
    assert not any("mask" in name for name, _ in result.model.named_buffers())
    reloaded = dpruner.apply_plan(dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), result.plans[0])
    assert [p.shape for p in reloaded.parameters()] == [p.shape for p in result.model.parameters()]


SCRIPT = '''
import sys, torch
sys.path.insert(0, {root!r})
import dpruner
from dpruner.data.loaders import load_data
from dpruner.methods.run import run
from dpruner.methods.spp import SPPConfig
from dpruner.train.config import TrainConfig
from dpruner.train.distributed import setup, teardown
ctx, device = setup("cpu")
torch.set_num_threads(1)
data = load_data("digits", batch_size=32, rank=ctx.rank, world_size=ctx.world_size)
model = dpruner.load_model({model!r})
result = run("spp", model, torch.randn(1, 1, 8, 8), SPPConfig(ratio=2.0, A=0.3), data=data,
             train=TrainConfig(epochs=1, quiet=True), ctx=ctx, device=device)
torch.save({{"plan": result.plans[0], "spp": result.details["spp"]}}, {out!r} + str(ctx.rank))
teardown()
'''


@pytest.mark.slow
def test_two_torchrun_ranks_prune_the_same_channels(tmp_path):
    """Masks are drawn per step from a shared seed and ranks from weights DDP keeps equal, so both gloo ranks end
    with the same plan (each reads its own half of the batches)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = str(tmp_path / "spp")
    script = tmp_path / "spp.py"
    script.write_text(SCRIPT.format(root=root, out=out, model=str(SAMPLE_MODELS / "digits_vgg.pt")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(out + r, weights_only=False) for r in "01")
    assert a["plan"] == b["plan"] and a["spp"] == b["spp"]
    assert a["spp"]["pruned_channels"] > 0 and a["spp"]["rank_updates"] > 1


def test_a_resumed_run_ends_where_the_uninterrupted_one_does():
    """States are saved at every epoch end of the masking phase and once it is over; resuming from either gives
    the same plan and weights as the run that was never interrupted."""
    import copy

    data = load_data("digits", batch_size=64, val_from="test")
    config = SPPConfig(ratio=2.0)
    train = TrainConfig(epochs=4, quiet=True)
    example = torch.randn(1, 1, 8, 8)
    states = []
    full = run("spp", dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), example, config, data=data, train=train,
               on_checkpoint=lambda state: states.append(copy.deepcopy(state)))
    stages = [s["progress"]["stage"] for s in states]
    assert stages[0] == "masking" and stages[-1] == "retrain"
    for state in (states[0], states[-1]):
        again = run("spp", dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), example, config, data=data,
                    train=train, resume=state)
        assert again.plans == full.plans and again.details == full.details
        for key, value in full.model.state_dict().items():
            torch.testing.assert_close(again.model.state_dict()[key], value)
