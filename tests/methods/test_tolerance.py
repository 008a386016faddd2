"""The Play-and-Prune controller: it stops within the tolerance, rolls back after a failed step, honours the
budget and the MACs cap; first with an accuracy oracle (mechanics, fast), then on the real digits sample model."""

from __future__ import annotations

import torch
import pytest

import dpruner
from dpruner.data.loaders import load_data
from dpruner.errors import InputError
from dpruner.methods.tolerance import ToleranceConfig, parse_tolerance, prune_to_tolerance
from dpruner.metrics import count_macs
from dpruner.train.config import TrainConfig
from dpruner.train.evaluate import evaluate
from tests.conftest import ROOT

EXAMPLE = torch.randn(1, 1, 8, 8)
FAST = TrainConfig(lr=0.01, quiet=True)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=128)


def vgg():
    return dpruner.load_model(ROOT / "sample_models" / "digits_vgg.pt")


def oracle(limit: float):
    """Accuracy that is perfect up to `limit`x MACs and collapses beyond: the controller must settle below it."""
    base = count_macs(vgg(), EXAMPLE).total

    def measure(model):
        ratio = base / count_macs(model.cpu(), EXAMPLE).total
        return 0.95 if ratio <= limit else 0.5
    return measure


def test_parse_tolerance_accepts_percent_and_fraction():
    assert parse_tolerance("1%") == pytest.approx(0.01)
    assert parse_tolerance("0.01") == pytest.approx(0.01)
    assert parse_tolerance("2.5%") == pytest.approx(0.025)
    for bad in ("0%", "100%", "abc", "-1%"):
        with pytest.raises(InputError):
            parse_tolerance(bad)


def test_stops_below_the_accuracy_cliff_and_rolls_back(digits):
    config = ToleranceConfig(tolerance=0.01, budget_epochs=3, step_epochs=0.05, final_epochs=0.05,
                             initial_rate=0.2, max_failures=2)
    result = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=oracle(2.5))
    actions = [h["action"] for h in result.history]
    assert result.met
    assert 1.0 < result.ratio["macs"] <= 2.5  # never kept a model past the cliff
    assert "rollback" in actions  # it overshot at least once and went back
    rejected = [h for h in result.history if h["action"] == "prune" and not h["accepted"]]
    assert rejected and all(h["ratio_macs"] > 2.5 for h in rejected)
    # after a rollback the next step is smaller: the rate halves
    i = actions.index("rollback")
    assert result.history[i]["rate"] < result.history[i - 1 - sum(
        1 for h in result.history[:i] if h["action"] == "recover")]["rate"] + 1e-12
    assert result.after["accuracy"] >= result.before["accuracy"] - config.tolerance


def test_honours_the_budget(digits):
    config = ToleranceConfig(tolerance=0.01, budget_epochs=0.6, step_epochs=0.1, final_epochs=0.1)
    calls = []
    measure = oracle(100.0)
    result = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False,
                                measure=lambda m: calls.append(1) or measure(m))
    assert result.epochs_used <= config.budget_epochs + 1e-6
    assert result.history[-1]["action"] == "final"
    steps = [h for h in result.history if h["action"] == "prune"]
    assert 1 <= len(steps) <= 5  # (0.6 - 0.1 final) / 0.1 per step


def test_max_ratio_caps_compression(digits):
    config = ToleranceConfig(tolerance=0.05, budget_epochs=2, step_epochs=0.05, final_epochs=0.05,
                             initial_rate=0.4, max_ratio=1.5)
    result = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=oracle(100.0))
    assert result.ratio["macs"] <= 1.5 * 1.05
    assert any("max-ratio" in h.get("reason", "") for h in result.history)


def test_max_latency_caps_the_run_at_the_measured_latency(digits):
    """A fake runtime (blocks of 4 channels, tests/runtime/test_latency.py) and an oracle that never fails: the run
    must stop when the measured latency reaches the cap, not before, and not cut far past it."""
    from dpruner.runtime.latency import LatencySpec
    from tests.runtime.test_latency import BLOCK, blocked_ms

    spec = LatencySpec(timer=blocked_ms, multiple=BLOCK)
    config = ToleranceConfig(tolerance=0.05, budget_epochs=2, step_epochs=0.05, final_epochs=0.05,
                             initial_rate=0.2, max_latency=0.6, latency=spec)
    result = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=oracle(100.0))
    assert any("max-latency" in h.get("reason", "") for h in result.history)
    assert result.after["latency"] == pytest.approx(blocked_ms(result.model, EXAMPLE.shape))
    share = result.after["latency"] / result.before["latency"]
    assert 0.6 * 0.8 <= share <= 0.6 * 1.03, share
    steps = [h for h in result.history if h["action"] == "prune"]
    assert all("ratio_latency" in h for h in steps)


def test_first_step_failing_returns_the_original_unmet(digits):
    config = ToleranceConfig(tolerance=0.01, budget_epochs=0.3, step_epochs=0.05, final_epochs=0.05,
                             max_failures=1)
    model = vgg()
    result = prune_to_tolerance(model, EXAMPLE, digits, config, FAST, distill=False, measure=oracle(1.0))
    assert not result.met and result.plans == []
    assert result.ratio["macs"] == pytest.approx(1.0)


def test_real_digits_run_meets_the_tolerance_on_validation(digits):
    """No oracle: real fine-tuning and real validation accuracy on the sample model."""
    torch.manual_seed(0)
    config = ToleranceConfig(tolerance=0.01, budget_epochs=4, step_epochs=0.5)
    result = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST)
    assert result.met and result.ratio["macs"] > 1.2
    measured = evaluate(result.model, digits.val).accuracy
    assert measured == pytest.approx(result.after["accuracy"])
    assert measured >= result.before["accuracy"] - 0.01 - 1e-9
    # the plans replay on the original architecture (what the checkpoint stores)
    rebuilt = vgg()
    for plan in result.plans:
        dpruner.apply_plan(rebuilt, plan)
    rebuilt.load_state_dict(result.model.state_dict())
    assert torch.allclose(rebuilt.eval()(EXAMPLE), result.model.eval()(EXAMPLE), atol=1e-6)


class Interrupt(Exception):
    pass


# taylor: the smoothed scores are part of the state; stopped late enough that an accepted step follows the resume
@pytest.mark.parametrize("criterion, crash_at", [("l1", 2), ("taylor", 4)])
def test_resume_continues_an_interrupted_run_to_the_same_result(digits, criterion, crash_at):
    """Stop the run right after a checkpoint, resume from it: the result equals an uninterrupted run."""
    config = ToleranceConfig(tolerance=0.01, budget_epochs=1.0, step_epochs=0.1, final_epochs=0.1, initial_rate=0.2,
                             criterion=criterion)
    measure = oracle(2.0)
    states = []
    full = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=measure,
                              on_checkpoint=states.append)

    saved = []

    def crash_on_second(state):
        saved.append(state)
        if len(saved) == crash_at:
            raise Interrupt()

    with pytest.raises(Interrupt):
        prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=measure,
                           on_checkpoint=crash_on_second)
    after_resume = []
    resumed = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=measure,
                                 resume=saved[-1], on_checkpoint=after_resume.append)
    assert resumed.plans == full.plans
    for a, b in zip(after_resume, states[crash_at:]):  # every later state, the smoothed scores included
        assert a["plans"] == b["plans"] and a["progress"]["rate"] == b["progress"]["rate"]
        assert a["progress"]["scores"].keys() == b["progress"]["scores"].keys()
        assert all(torch.allclose(a["progress"]["scores"][k], b["progress"]["scores"][k])
                   for k in a["progress"]["scores"])
    assert bool(states[-1]["progress"]["scores"]) == (criterion == "taylor")
    assert [h["action"] for h in resumed.history if h["action"] != "resume"] == [h["action"] for h in full.history]
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_resume_refuses_a_state_from_other_options(digits):
    config = ToleranceConfig(tolerance=0.01, budget_epochs=0.5, step_epochs=0.1, final_epochs=0.1)
    saved = []
    prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=oracle(100.0),
                       on_checkpoint=saved.append)
    other = ToleranceConfig(tolerance=0.02, budget_epochs=0.5, step_epochs=0.1, final_epochs=0.1)
    with pytest.raises(InputError, match="same model, data and options"):
        prune_to_tolerance(vgg(), EXAMPLE, digits, other, FAST, distill=False, measure=oracle(100.0),
                           resume=saved[-1])


def test_a_budget_without_room_for_a_step_is_refused():
    with pytest.raises(InputError, match="no room for a pruning step"):
        ToleranceConfig(tolerance=0.01, budget_epochs=1, step_epochs=1)


def test_the_rate_never_exceeds_max_rate(digits):
    """Accepted steps raise the rate; it is capped, so a later halving really gives a smaller step."""
    config = ToleranceConfig(tolerance=0.01, budget_epochs=1.2, step_epochs=0.1, final_epochs=0.1, initial_rate=0.3,
                             max_rate=0.4)
    result = prune_to_tolerance(vgg(), EXAMPLE, digits, config, FAST, distill=False, measure=oracle(100.0))
    rates = [h["rate"] for h in result.history if h["action"] == "prune"]
    assert len(rates) >= 2 and max(rates) <= 0.4 + 1e-12


def test_smoothed_scores_follow_their_channels_through_a_prune():
    """Taylor momentum across steps: the memory of a group's scores, carried past a prune, lines up channel for
    channel with the pruned model's own numbering (weights untouched, so fresh l1 scores equal the carried ones)."""
    import numpy as np
    import torch.nn.functional as F
    from torch import nn

    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.api import score_groups
    from dpruner.methods.tolerance import carry_scores, smooth_scores
    from dpruner.surgery.plan import apply_plan, make_plan

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.conv2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.conv2(F.relu(self.bn(self.conv(x)))).mean((2, 3))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        for i in range(6):
            net.conv.weight[i] = (i + 1) * torch.rand_like(net.conv.weight[i]).sign().abs()  # l1 grows with i
    graph, index = analyze_groups(net, x)
    scores = score_groups(net, graph, index, "l1")
    group = next(g for g in index.groups if ("conv", "out", None) in g.slots)
    removed = np.zeros(len(index.roots), bool)
    removed[np.searchsorted(index.roots, [group.channels[1], group.channels[4]])] = True
    memory = carry_scores(scores, index, removed)
    apply_plan(net, make_plan(graph, index, index.roots[removed]))
    graph2, index2 = analyze_groups(net, x)
    fresh = score_groups(net, graph2, index2, "l1")
    group2 = next(g for g in index2.groups if ("conv", "out", None) in g.slots)
    np.testing.assert_allclose(memory[";".join(sorted(map(repr, group2.slots)))], fresh[group2.id])
    np.testing.assert_allclose(fresh[group2.id], scores[group.id][[0, 2, 3, 5]])
    smoothed = smooth_scores({group2.id: np.zeros(4)}, index2, memory, 0.75)
    np.testing.assert_allclose(smoothed[group2.id], 0.75 * fresh[group2.id])
    assert smooth_scores({group2.id: np.ones(3)}, index2, memory, 0.75)[group2.id].tolist() == [1, 1, 1]
