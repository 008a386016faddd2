"""fit's callbacks: how a pruning method joins training without copying the loop (issue: method interface)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpruner.data.loaders import load_data
from dpruner.train.config import TrainConfig
from dpruner.train.loop import Callback, Penalty, fit
from dpruner.zoo import digits_vgg


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=128)


def _config(**kw):
    return TrainConfig(epochs=kw.pop("epochs", 1.0), lr=0.05, weight_decay=5e-3, warmup_epochs=0, quiet=True, **kw)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def before_step(self, model, step):
        self.calls.append(("before", step))

    def loss(self, model, step):
        self.calls.append(("loss", step))
        return None

    def after_step(self, model, step):
        self.calls.append(("after", step))


def test_hooks_run_once_per_step_in_order(digits):
    recorder = Recorder()
    result = fit(digits_vgg(), digits, _config(epochs=0.5), callbacks=[recorder])
    assert result.steps >= 2
    expected = [(what, s) for s in range(result.steps) for what in ("before", "loss", "after")]
    assert recorder.calls == expected


class KeepZero(Callback):
    """Structured probabilistic pruning's rule: masked weights stay zero although momentum and weight decay act on
    them; the after-step hook restores them."""

    def __init__(self, layer: nn.Conv2d, rows: list[int]):
        self.layer, self.rows = layer, rows

    def before_step(self, model, step):
        with torch.no_grad():
            self.layer.weight[self.rows] = 0

    def after_step(self, model, step):
        with torch.no_grad():
            self.layer.weight[self.rows] = 0


def test_an_after_step_hook_keeps_masked_weights_at_zero_despite_momentum(digits):
    model = digits_vgg()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    fit(model, digits, _config(), callbacks=[KeepZero(conv, [0, 3])])
    w = conv.weight.detach()
    assert float(w[[0, 3]].abs().max()) == 0.0 and float(w[1].abs().max()) > 0
    free = digits_vgg()
    fit(free, digits, _config())  # without the hook the same rows move
    assert float(next(m for m in free.modules() if isinstance(m, nn.Conv2d)).weight.detach()[[0, 3]].abs().max()) > 0


class Gate(Callback):
    """A parameter living outside the model (a scorer), trained in its own group with its own learning rate,
    pushed towards zero by an extra loss term."""

    def __init__(self):
        self.scale = nn.Parameter(torch.ones(()))

    def param_groups(self, model, groups):
        return [*groups, {"params": [self.scale], "lr": 0.5, "weight_decay": 0.0}]

    def loss(self, model, step):
        return self.scale.abs()


def test_a_callback_adds_its_own_parameter_group_and_loss_term(digits):
    gate = Gate()
    fit(digits_vgg(), digits, _config(epochs=0.25), callbacks=[gate])
    assert float(gate.scale.detach()) < 1.0  # its gradient came from the loss term, its step from its own group


def test_penalty_is_a_callback_and_both_spellings_agree(digits):
    def l1(model):
        return 1e-3 * sum(p.abs().sum() for p in model.parameters())

    torch.manual_seed(0)
    a = digits_vgg()
    b = digits_vgg()
    b.load_state_dict(a.state_dict())
    fit(a, digits, _config(epochs=0.25, seed=3), penalty=l1)
    fit(b, digits, _config(epochs=0.25, seed=3), callbacks=[Penalty(l1)])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
