"""The training loop: schedule, distillation loss, determinism, learning, fractional epochs, resume."""

from __future__ import annotations

import math

import pytest
import torch

import dpruner
from dpruner.data.loaders import load_data
from dpruner.errors import InputError
from dpruner.train.api import finetune, state_path_for
from dpruner.train.config import TrainConfig
from dpruner.train.evaluate import evaluate
from dpruner.train.loop import cosine_with_warmup, distillation_loss, fit
from dpruner.zoo import digits_vgg
from tests.conftest import SAMPLE_MODELS


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=128)


def test_cosine_with_warmup_shape():
    f = cosine_with_warmup(100, 10)
    assert f(0) < f(5) < f(9) <= 1.0  # linear warm-up
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-9)  # half-way through the cosine
    assert f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert float(distillation_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(8, 10), 4.0)) > 0


def test_fit_learns_digits_from_scratch():
    small_batches = load_data("digits", batch_size=32)
    torch.manual_seed(0)
    model = digits_vgg()
    before = evaluate(model, small_batches.val).accuracy
    result = fit(model, small_batches, TrainConfig(epochs=4, lr=0.05, quiet=True))
    after = evaluate(model, small_batches.val).accuracy
    assert before < 0.3 and after > 0.9
    assert result.steps == 4 * len(small_batches.train)


def _train_once(digits, epochs=2, teacher=None):
    torch.manual_seed(1)
    model = digits_vgg()
    fit(model, digits, TrainConfig(epochs=epochs, lr=0.05, seed=3, quiet=True), teacher=teacher)
    return model


def test_same_seed_gives_identical_weights_on_cpu(digits):
    a, b = _train_once(digits), _train_once(digits)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_distillation_changes_training(digits):
    teacher = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    plain, distilled = _train_once(digits, 1), _train_once(digits, 1, teacher)
    assert not torch.equal(plain.classifier[-1].weight, distilled.classifier[-1].weight)


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_uninterrupted_result(digits, tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, seed=5, quiet=True)
    torch.manual_seed(0)
    reference = digits_vgg()
    torch.manual_seed(0)
    interrupted = digits_vgg()
    finetune(reference, digits, config)

    state = state_path_for(tmp_path / "out.pt")
    import dpruner.train.api as api

    real_fit = api.fit

    def crash_after_first_epoch(*args, on_epoch_end=None, **kwargs):
        def save_then_crash(train_state):
            on_epoch_end(train_state)
            raise Interrupt()
        return real_fit(*args, on_epoch_end=save_then_crash, **kwargs)

    api.fit = crash_after_first_epoch
    try:
        with pytest.raises(Interrupt):
            finetune(interrupted, digits, config, state_path=state)
    finally:
        api.fit = real_fit
    assert state.is_file()
    torch.manual_seed(0)
    resumed = digits_vgg()  # a fresh process would rebuild the model: its weights come from the state file
    result = finetune(resumed, digits, config, state_path=state, resume=True)
    assert result.resumed_from_step == len(digits.train)
    assert not state.exists()  # removed once training completed
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_refuses_other_options_or_a_missing_state(digits, tmp_path):
    state = state_path_for(tmp_path / "out.pt")
    with pytest.raises(InputError, match="no saved state"):
        finetune(digits_vgg(), digits, TrainConfig(epochs=1, quiet=True), state_path=state, resume=True)


def test_fractional_budget_rounds_to_whole_batches(digits):
    n = len(digits.train)
    result = fit(digits_vgg(), digits, TrainConfig(epochs=1.5, quiet=True))
    assert result.steps == round(1.5 * n) and math.isclose(result.epochs, result.steps / n)
