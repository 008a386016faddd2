"""D-Pruner gates (methods/gate.py, seed 000): one shared gate per coupled group, exact folding, nothing left in
the model, the removal rule, stop conditions, a real run on the digits sample model and agreement under torchrun."""

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
from dpruner.methods.cost import build_cost_model
from dpruner.methods.gate import GateConfig, Gates, choose, fold
from dpruner.methods.run import resolve, run
from dpruner.metrics.macs import count_macs
from dpruner.train.config import TrainConfig
from tests.conftest import SAMPLE_MODELS


class Residual(nn.Module):
    """stem conv+BN, a block whose conv+BN output is added to the stem's (one group, two BN members), then a conv
    without a norm layer (its group is gated on the conv output) and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.plain = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a = F.relu(self.bn0(self.stem(x)))
        b = F.relu(a + self.bn1(self.conv1(a)))
        return self.fc(F.relu(self.plain(b)).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    model = Residual()
    for bn in (model.bn0, model.bn1):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_folding_constant_scores_leaves_the_outputs_unchanged():
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    graph, index = analyze_groups(model, x[:1])
    gates = Gates(model, graph, index, GateConfig(ratio=2.0))
    gen = torch.Generator().manual_seed(1)
    scores = {g: torch.rand(n, generator=gen).clamp_min(0.05) for g, n in gates.sizes.items()}
    assert len(scores) == 2  # the residual group (two BN members) and the norm-less conv's group
    gates.constant = scores
    with torch.no_grad():
        gated = model(x)
    gates.detach()
    with torch.no_grad():
        plain = model(x)
    assert not torch.allclose(gated, plain, atol=1e-3)  # the gates did change something
    fold(model, graph, index, {g: s.numpy() for g, s in scores.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=1e-5)


def test_coupled_members_share_one_score_and_detach_leaves_the_plain_model():
    model = _model()
    keys = set(model.state_dict())
    graph, index = analyze_groups(model, torch.randn(1, 3, 8, 8))
    gates = Gates(model, graph, index, GateConfig(ratio=2.0))
    calls = []
    for name, scorer in gates.scorers.items():
        scorer.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model(torch.randn(2, 3, 8, 8))
    assert sorted(calls) == sorted(gates.scorers)  # one scorer call per group, though the residual has two members
    assert any(k.startswith(Gates.NAME) for k in model.state_dict())
    gates.detach()
    assert set(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_choose_takes_the_lowest_below_the_threshold_up_to_the_goal_and_the_cap():
    model = _model()
    example = torch.randn(1, 3, 8, 8)
    graph, index = analyze_groups(model, example)
    macs = count_macs(model, example)
    cost = build_cost_model(model, graph, index, macs.by_module, macs.total)
    groups = [g for g in index.groups if g.prunable]
    means = {g.id: np.linspace(0.01, 0.9, len(g.channels)) for g in groups}
    below = choose(index, means, cost, None, 0, 0.2, 0.9)
    assert below.sum() == sum(int((m < 0.2).sum()) for m in means.values())
    capped = choose(index, means, cost, None, 0, None, 0.5)  # everything is a candidate: half of each group at most
    assert capped.sum() == sum(len(g.channels) // 2 for g in groups)
    goal = 0.9 * macs.total
    some = choose(index, means, cost, goal, 0, None, 0.9)
    assert cost.estimate(some)[0] <= goal and some.sum() < capped.sum()


def test_forced_removal_follows_the_planner_widths_not_a_global_score_ranking():
    """Scores that have not separated (all near 0.9) must not send the forced removal into the costliest group
    (the stream both BNs write): each group loses its planned share, lowest score x L1 first, and the goal is met."""
    from dpruner.methods.gate import forced_choice, forced_keys
    from dpruner.metrics.macs import count_sizes
    from dpruner.surgery.plan import apply_plan, make_plan

    model = _model()
    example = torch.randn(1, 3, 8, 8)
    graph, index = analyze_groups(model, example)
    groups = [g for g in index.groups if g.prunable]
    assert len(groups) >= 2
    # the costlier stream group scores lowest by a hair: a global ranking would empty it first
    means = {g.id: np.full(len(g.channels), 0.9) - (0.01 if len(g.channels) == 6 and g.id == groups[0].id else 0)
             + np.linspace(0, 1e-3, len(g.channels)) for g in groups}
    before = count_sizes(model, example)["macs"]
    goal = before / 1.5
    flags = forced_choice(model, example, GateConfig(ratio=1.5), graph, index, means,
                          np.zeros(len(index.roots), bool), goal)
    per_group = {g.id: int(flags[np.searchsorted(index.roots, g.channels)].sum()) for g in groups}
    assert all(0 < n < len(g.channels) for g, n in zip(groups, per_group.values()))  # every group gives some
    keys = forced_keys(model, graph, index, means)
    for g in groups:  # and what a group gives is its lowest-keyed channels
        order = np.argsort(keys[g.id], kind="stable")[:per_group[g.id]]
        assert flags[np.searchsorted(index.roots, np.asarray(g.channels)[order])].all()
    apply_plan(model, make_plan(graph, index, index.roots[flags]))
    assert count_sizes(model, example)["macs"] <= goal * 1.05
    already = forced_choice(_model(), example, GateConfig(ratio=1.5), graph, index, means, flags, before * 10)
    assert (already == flags).all()  # goal already met: nothing more
    # channels the threshold already removed (here the two highest-keyed of the stream group) count toward the
    # widths: they go first, and with the cost model the other groups give fewer channels than without them
    from dpruner.methods.cost import build_cost_model

    fresh = _model()
    graph, index = analyze_groups(fresh, example)
    stream = next(g for g in index.groups if g.prunable and len(g.channels) == 6)
    top = np.searchsorted(index.roots, np.asarray(stream.channels)[np.argsort(keys[stream.id])[-2:]])
    threshold = np.zeros(len(index.roots), bool)
    threshold[top] = True
    macs = count_macs(fresh, example)
    cost = build_cost_model(fresh, graph, index, macs.by_module, macs.total)
    plain = forced_choice(fresh, example, GateConfig(ratio=1.5), graph, index, means, threshold, goal)
    fitted = forced_choice(fresh, example, GateConfig(ratio=1.5), graph, index, means, threshold, goal, cost=cost)
    assert plain[top].all() and fitted[top].all()
    assert cost.estimate(fitted)[0] <= goal * (1 + 1e-9)
    others = np.ones(len(index.roots), bool)
    others[np.searchsorted(index.roots, np.asarray(stream.channels))] = False
    assert fitted[others].sum() < plain[others].sum()


def test_forced_keys_follow_the_weights_until_the_scores_separate():
    from dpruner.methods.api import score_groups
    from dpruner.methods.gate import forced_keys

    model = _model()
    graph, index = analyze_groups(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in index.groups if g.prunable)
    l1 = score_groups(model, graph, index, "l1")[group.id]
    flat = {group.id: np.full(len(l1), 0.9)}  # not separated: the weights order the channels
    assert (np.argsort(forced_keys(model, graph, index, flat)[group.id]) == np.argsort(l1)).all()
    strongest = int(np.argmax(l1))
    apart = {group.id: np.where(np.arange(len(l1)) == strongest, 0.01, 0.95)}  # separated: the score decides
    assert int(np.argmin(forced_keys(model, graph, index, apart)[group.id])) == strongest


def test_progressive_schedule_spreads_the_ratio_geometrically():
    from dpruner.methods.gate import interval_goal

    goals = [interval_goal(100.0, 25.0, i, 4, "progressive") for i in range(1, 5)]
    assert goals == pytest.approx([100 / 4 ** 0.25, 50.0, 100 / 4 ** 0.75, 25.0])  # ratio^(i/n): 1.41x, 2x, ..., 4x
    assert [interval_goal(100.0, 25.0, i, 4, "last") for i in range(1, 5)] == [None, None, None, 25.0]
    with pytest.raises(InputError, match="--gate-schedule"):
        GateConfig(ratio=2.0, schedule="sometimes")


def test_interval_ranking_uses_the_mean_logit_so_fluctuating_scores_are_not_ranked_low():
    """Channel 0 scores 0.9 every step (logit 2.20); channel 1 alternates 0.99 and 0.6 (logits 4.60 and 0.41, mean
    2.50: a higher level than channel 0), yet its mean score 0.795 is lower. The mean logit ranks channel 1 above
    channel 0, the mean score below; folding multiplies by the mean score either way."""
    from types import SimpleNamespace

    from dpruner.methods.gate import GateTraining

    level = torch.sigmoid((torch.logit(torch.tensor(0.99, dtype=torch.float64))
                           + torch.logit(torch.tensor(0.6, dtype=torch.float64))) / 2).item()
    assert level == pytest.approx(0.924, abs=1e-3)
    for rank, expected, order in (("logit", [0.9, level, 0.2], [2, 0, 1]), ("score", [0.9, 0.795, 0.2], [2, 1, 0])):
        gates = SimpleNamespace(sizes={7: 3}, cache={})
        training = GateTraining(gates, GateConfig(ratio=2.0, rank=rank))
        for s in (torch.tensor([0.9, 0.99, 0.2]), torch.tensor([0.9, 0.6, 0.2])):
            gates.cache = {7: s.clone().requires_grad_()}
            assert training.loss(None, 0).requires_grad  # the sparsity and binarisation terms
        scale, ranks = training.means(SimpleNamespace(enabled=False), "cpu")
        np.testing.assert_allclose(scale[7], [0.9, 0.795, 0.2], rtol=1e-6)
        np.testing.assert_allclose(ranks[7], expected, rtol=1e-6)
        assert np.argsort(ranks[7]).tolist() == order
    with pytest.raises(InputError, match="--gate-rank"):
        GateConfig(ratio=2.0, rank="median")


def test_target_pull_holds_each_groups_mean_score_at_the_share_the_goal_keeps():
    """pull=target: the sparsity term is (mean(s) - keep)^2 per group, zero when the mean sits at the planned keep
    share; pull=zero (and no keep shares, i.e. no ratio) is mean(s). keep_shares gives each gated group the share
    of its channels dpruner's plan at the ratio keeps."""
    from types import SimpleNamespace

    from dpruner.methods.gate import GateTraining, gate_members, keep_shares, planned_losses
    from dpruner.metrics.macs import count_sizes

    s = torch.tensor([0.9, 0.5, 0.1, 0.5])  # mean 0.5
    for pull, keep, expected in (("target", {7: 0.5}, 0.0), ("target", {7: 0.75}, 0.0625), ("zero", {7: 0.5}, 0.5),
                                 ("target", None, 0.5)):
        config = GateConfig(ratio=2.0, pull=pull, binary_weight=0.0, sparsity_weight=1.0)
        training = GateTraining(SimpleNamespace(sizes={7: 4}, cache={7: s}), config, keep)
        assert training.loss(None, 0).item() == pytest.approx(expected)

    model = _model()
    example = torch.randn(1, 3, 8, 8)
    graph, index = analyze_groups(model, example)
    sizes = gate_members(graph, index)[0]
    config = GateConfig(ratio=2.0, pull="target")
    goal = count_sizes(model, example)["macs"] / 2
    keep = keep_shares(model, example, config, graph, index, goal)
    losses = planned_losses(model, example, config, index, 2.0)
    assert set(keep) == set(sizes) and any(v < 1 for v in keep.values())
    assert all(keep[g] == pytest.approx(1 - losses.get(g, 0) / n) for g, n in sizes.items())
    assert keep_shares(model, example, GateConfig(ratio=2.0, pull="zero"), graph, index, goal) is None
    assert keep_shares(model, example, config, graph, index, None) is None  # tolerance only: no goal to keep
    with pytest.raises(InputError, match="--gate-pull"):
        GateConfig(ratio=2.0, pull="sideways")


def test_carried_scorers_keep_each_survivors_learned_score_after_a_removal():
    """After channels go, each surviving channel's scorer output (its last-layer row and bias) and input column
    follow it to its new position; with zero input weights on the removed channels the scores are identical."""
    from dpruner.methods.gate import carry, gate_members, links
    from dpruner.surgery.plan import apply_plan, make_plan

    model = _model()
    example = torch.randn(1, 3, 8, 8)
    graph, index = analyze_groups(model, example)
    gates = Gates(model, graph, index, GateConfig(ratio=2.0))
    gen = torch.Generator().manual_seed(3)
    for net in gates.scorers.values():  # learned-looking scorers: distinct scores per channel
        for p in net.parameters():
            p.data = torch.randn(p.shape, generator=gen)
    stream = next(g for g in index.groups if g.id in gates.sizes and len(g.channels) == 6)
    drop = [1, 4]  # two of the stream's channels go
    with torch.no_grad():
        gates.scorers[str(stream.id)][0].weight[:, drop] = 0.0  # so the survivors' features fully decide
    x = torch.randn(4, 3, 8, 8)
    model(x)
    before = gates.cache[stream.id].detach().clone()
    members, state = gates.members, gates.state()
    gates.detach()
    removed = np.zeros(len(index.roots), dtype=bool)
    removed[np.searchsorted(index.roots, np.asarray(stream.channels)[drop])] = True
    apply_plan(model, make_plan(graph, index, index.roots[removed]))
    graph2, index2 = analyze_groups(model, example)
    carried = carry(state, links(members, make_plan(graph, index, index.roots[removed]),
                                 *gate_members(graph2, index2)))
    assert set(carried) == {g.id for g in index2.groups if g.prunable} and len(carried) == 2
    gates2 = Gates(model, graph2, index2, GateConfig(ratio=2.0), carried=carried)
    model(x)
    new_stream = next(g for g, n in gates2.sizes.items() if n == 4)
    keep = [i for i in range(6) if i not in drop]
    torch.testing.assert_close(gates2.cache[new_stream], before[keep])
    gates2.detach()


def test_the_final_fine_tune_share_depends_on_the_goal():
    assert GateConfig(ratio=2.0).final_fraction == 0.6 and GateConfig(tolerance=0.01).final_fraction == 0.3
    assert GateConfig(ratio=2.0, tolerance=0.01).final_fraction == 0.6
    assert GateConfig(tolerance=0.01, final_fraction=0.5).final_fraction == 0.5
    assert GateConfig(ratio=2.0).sparsity_weight == 20.0 and GateConfig(ratio=2.0, pull="zero").sparsity_weight == 2.0


def test_config_and_resolve():
    with pytest.raises(InputError, match="needs a goal"):
        GateConfig()
    with pytest.raises(InputError):
        GateConfig(ratio=2.0, threshold=1.5)
    assert resolve("gate", None, tolerance=True) == ("gate", "gate")
    assert resolve("gate", None, tolerance=False) == ("gate", "gate")
    with pytest.raises(InputError, match="own scorer"):
        resolve("gate", "l1", tolerance=False)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=64, val_from="test")


def test_gate_reaches_the_ratio_on_digits_and_leaves_no_scorers(digits):
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    keys = set(model.state_dict())
    # a gating phase of 80% of the budget (3.2 epochs): long enough for digits' scores to separate under the zero
    # pull, so the threshold decides part of a removal (the target pull holds group means, the ranking decides)
    result = run("gate", model, torch.randn(1, 1, 8, 8), GateConfig(ratio=2.0, prune_every=0.5, final_fraction=0.2,
                                                                   pull="zero"),
                 data=digits, train=TrainConfig(epochs=4, quiet=True))
    assert result.target_met and result.ratio["macs"] >= 1.9 and result.details["gate"]["stopped_by"] == "ratio"
    assert any(h["action"] == "pruned" and h["removed"] > h["forced"] for h in result.history)  # gates decided
    assert result.after["accuracy"] > 0.8 and result.epochs_used == pytest.approx(4.0, abs=0.05)
    assert set(result.model.state_dict()) == keys
    replay = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    for plan in result.plans:
        dpruner.apply_plan(replay, plan)
    assert [p.shape for p in replay.parameters()] == [p.shape for p in result.model.parameters()]


def test_removals_that_stay_below_the_tolerance_are_rolled_back_with_smaller_steps(digits, monkeypatch):
    """Tolerance only, validation always below the floor: every removal gets one interval to recover, is rolled
    back, and the next step is half as large (Play-and-Prune); three rollbacks in a row stop the run."""
    import dpruner.methods.gate as gate

    monkeypatch.setattr(gate, "step_accuracy", lambda *args: 0.0)
    seen = []  # (sparsity weight, keep shares) of every interval's training
    real = gate.GateTraining
    monkeypatch.setattr(gate, "GateTraining", lambda gates, config, keep: seen.append(
        (config.sparsity_weight, keep)) or real(gates, config, keep))
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    result = run("gate", model, torch.randn(1, 1, 8, 8),
                 GateConfig(tolerance=0.01, prune_every=0.25, final_fraction=0.2, pull="target"), data=digits,
                 train=TrainConfig(epochs=4, quiet=True))
    assert [h["action"] for h in result.history] == [gate.RECOVERING, "rolled back"] * 3
    # recovering intervals train without the pull; the others pull toward this step's shares (the rate's size)
    assert [w for w, _ in seen] == [20.0, 0.0] * 3  # the target pull's default weight
    assert all(keep and min(keep.values()) < 1 for _, keep in seen[::2])
    assert [h["rate"] for h in result.history if "rate" in h] == pytest.approx([0.05, 0.025, 0.0125])
    assert result.details["gate"]["stopped_by"] == "tolerance" and result.plans == []
    assert result.details["gate"]["forced_channels"] == 0  # the rolled-back removals are not counted
    assert not result.target_met  # nothing pruned is no success, as for the tolerance controller
    assert result.after["params"] == result.before["params"]


def test_without_an_interval_left_a_removal_below_the_tolerance_is_undone_at_once(digits, monkeypatch):
    import dpruner.methods.gate as gate

    monkeypatch.setattr(gate, "step_accuracy", lambda *args: 0.0)
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    result = run("gate", model, torch.randn(1, 1, 8, 8),
                 GateConfig(tolerance=0.01, prune_every=0.5, threshold=0.99, final_fraction=0.6), data=digits,
                 train=TrainConfig(epochs=2, quiet=True))  # a gating phase of 0.8 epochs: one interval
    assert [h["action"] for h in result.history] == ["rolled back"]
    assert result.details["gate"]["stopped_by"] == "budget" and result.plans == []


def test_a_removal_in_the_second_to_last_interval_gets_the_last_one_to_recover(digits, monkeypatch):
    """Two gating intervals: the first removal falls below the floor and recovers (or not) in the second; and the
    rate caps the whole removal even when the threshold would take every channel."""
    import dpruner.methods.gate as gate

    monkeypatch.setattr(gate, "step_accuracy", lambda *args: 0.0)
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    example = torch.randn(1, 1, 8, 8)
    macs = dpruner.count_macs(model, example).total
    result = run("gate", model, example, GateConfig(tolerance=0.01, prune_every=0.5, final_fraction=0.25,
                                                   threshold=0.99),
                 data=digits, train=TrainConfig(epochs=2, quiet=True))  # 1.5 epochs of 6/11-epoch intervals: 2
    first, second = result.history
    assert first["action"] == gate.RECOVERING and second["action"] == "rolled back" and second["removed"] == 0
    assert 0.9 * macs * 0.97 <= first["macs"] <= 0.9 * macs  # the 10% step, not every channel under 0.99
    assert result.plans == [] and result.details["gate"]["forced_channels"] == 0


@pytest.mark.parametrize("rate", [0.0, 0.005, -0.1, 0.31, float("nan"), float("inf")])
def test_gate_rate_outside_its_range_is_a_user_error(rate):
    with pytest.raises(InputError, match="--gate-rate"):
        GateConfig(tolerance=0.01, step_rate=rate)


def test_a_recovered_removal_is_kept_and_the_rate_follows_the_headroom(digits, monkeypatch):
    """Below the floor right after the first removal, above it after the next interval: the removal stays, the
    rate halves; the next removal keeps a full tolerance of headroom and the rate grows by half."""
    import dpruner.methods.gate as gate

    calls = []
    monkeypatch.setattr(gate, "step_accuracy", lambda *args: calls.append(1) or (0.0 if len(calls) == 1 else 1.0))
    model = dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt")
    example = torch.randn(1, 1, 8, 8)
    macs = dpruner.count_macs(model, example).total
    result = run("gate", model, example, GateConfig(tolerance=0.01, prune_every=0.5, final_fraction=0.25),
                 data=digits, train=TrainConfig(epochs=4, quiet=True))  # 3 epochs of gating: 6 intervals
    first, second, third = result.history[:3]
    assert first["action"] == gate.RECOVERING and first["macs"] <= 0.9 * macs * 1.02  # the rate's 10%
    assert second["action"] == "recovered" and second["rate"] == pytest.approx(0.05) and second["removed"] == 0
    assert third["action"] == "pruned" and third["rate"] == pytest.approx(0.075)
    assert third["macs"] <= 0.95 * first["macs"] * 1.02
    assert len(result.plans) == sum(h["action"] in (gate.RECOVERING, "pruned") for h in result.history)
    assert result.target_met and result.ratio["macs"] > 1.2


def _vgg_gate(digits, config, train, example, resume=None):
    """A gate run on the digits VGG sample; returns its result and the resumable states it saved."""
    import copy

    states = []
    result = run("gate", dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), example, config, data=digits,
                 train=train, resume=resume, on_checkpoint=lambda state: states.append(copy.deepcopy(state)))
    return result, states


def test_a_run_resumed_after_accepted_steps_carries_the_rate(digits, monkeypatch):
    """Resuming from the state after a recovered and an accepted removal continues with their rate (not the
    initial one): the resumed run's history and plans equal the uninterrupted run's."""
    import dpruner.methods.gate as gate

    def accuracy(*args):  # below the floor right after the first removal only
        accuracy.calls += 1
        return 0.0 if accuracy.calls == 1 else 1.0
    accuracy.calls = 0
    monkeypatch.setattr(gate, "step_accuracy", accuracy)
    config = GateConfig(tolerance=0.01, prune_every=0.5, final_fraction=0.25)
    train = TrainConfig(epochs=4, quiet=True)
    example = torch.randn(1, 1, 8, 8)
    full, states = _vgg_gate(digits, config, train, example)
    assert [h["action"] for h in full.history][:3] == [gate.RECOVERING, "recovered", "pruned"]
    assert states[2]["progress"]["rate"] == pytest.approx(0.075)
    accuracy.calls = 10  # every later measurement is above the floor, as in the uninterrupted run
    resumed, _ = _vgg_gate(digits, config, train, example, resume=states[2])
    assert resumed.history == full.history and resumed.plans == full.plans


def test_a_run_resumed_while_a_removal_recovers_ends_where_the_uninterrupted_one_does(digits, monkeypatch):
    """The state saved during a recovery interval carries the network before the removal: resuming from it and
    rolling back gives the same plans, history and weights as the run that was not interrupted."""
    import dpruner.methods.gate as gate

    monkeypatch.setattr(gate, "step_accuracy", lambda *args: 0.0)
    config = GateConfig(tolerance=0.01, prune_every=0.5, final_fraction=0.25)
    # 1.8 epochs of gating = 3 intervals of 6/11 epoch (digits has 11 batches): a removal, a recovery that fails,
    # a removal undone at once
    train = TrainConfig(epochs=2.4, quiet=True)
    example = torch.randn(1, 1, 8, 8)
    full, states = _vgg_gate(digits, config, train, example)
    assert [h["action"] for h in full.history] == [gate.RECOVERING, "rolled back", "rolled back"]
    assert states[0]["progress"]["pending"] is not None
    resumed, _ = _vgg_gate(digits, config, train, example, resume=states[0])
    assert resumed.plans == full.plans == [] and resumed.history == full.history
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)


SCRIPT = '''
import sys, torch
sys.path.insert(0, {root!r})
import dpruner
from dpruner.data.loaders import load_data
from dpruner.methods.run import run
from dpruner.methods.gate import GateConfig
from dpruner.train.config import TrainConfig
from dpruner.train.distributed import setup, teardown
ctx, device = setup("cpu")
torch.set_num_threads(1)
data = load_data("digits", batch_size=32, rank=ctx.rank, world_size=ctx.world_size)
model = dpruner.load_model({model!r})
result = run("gate", model, torch.randn(1, 1, 8, 8), GateConfig(ratio=2.0, prune_every=0.5), data=data,
             train=TrainConfig(epochs=2, quiet=True), ctx=ctx, device=device)
torch.save({{"plans": result.plans, "history": result.history}}, {out!r} + str(ctx.rank))
teardown()
'''


@pytest.mark.slow
def test_two_torchrun_ranks_remove_the_same_channels(tmp_path):
    """Scores are averaged over ranks before anything is removed (each rank sees its own batches), and the scorers
    are part of the DDP-wrapped model: both gloo ranks take the same steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = str(tmp_path / "gate")
    script = tmp_path / "gate.py"
    script.write_text(SCRIPT.format(root=root, out=out, model=str(SAMPLE_MODELS / "digits_vgg.pt")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(out + r, weights_only=False) for r in "01")
    assert a["plans"] and a["plans"] == b["plans"] and a["history"] == b["history"]


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(digits):
    """States are saved after every interval; resuming from the first gives the same plans, history and weights
    (scorers are seeded, the data stream continues at its position)."""
    config = GateConfig(ratio=2.0, prune_every=0.5)
    train = TrainConfig(epochs=3, quiet=True)
    example = torch.randn(1, 1, 8, 8)
    full, states = _vgg_gate(digits, config, train, example)
    assert len(states) >= 2 and states[0]["method"] == "gate"
    resumed, _ = _vgg_gate(digits, config, train, example, resume=states[0])
    assert resumed.plans == full.plans and resumed.history == full.history
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    with pytest.raises(InputError, match="same model, data and options"):
        run("gate", dpruner.load_model(SAMPLE_MODELS / "digits_vgg.pt"), example,
            GateConfig(ratio=3.0, prune_every=0.5), data=digits, train=train, resume=states[0])
