"""Data-driven criteria (issue: data-driven pruning): Taylor importance and mean activation, gathered by one
collection step over a few batches; hand-built cases pin which channel scores lowest and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpruner
from dpruner.criteria import CRITERIA, get_criterion
from dpruner.criteria.stats import collect_stats
from dpruner.errors import InputError
from dpruner.graph.summary import analyze_groups
from dpruner.methods.api import score_groups


class Net(nn.Module):
    """conv -> BN -> relu -> conv -> pooled classifier: four channels in the first group."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.conv2(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


def _data(n_batches: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(n_batches)]


def _first_group(index):
    return next(g for g in index.groups if ("conv", "out", None) in g.slots)


def test_registry_declares_what_each_criterion_needs():
    assert not get_criterion("l1").needs_data and get_criterion("taylor").needs_data
    assert get_criterion("activation").needs == frozenset({"activations"})
    assert {"l1", "l2", "fpgm", "bn", "random", "taylor", "activation"} <= set(CRITERIA)
    assert all(c.summary for c in CRITERIA.values())


def _first_group_scores(criterion: str, silence) -> torch.Tensor:
    """Scores of the first group's four channels after `silence(model)` zeroed something in a fresh Net."""
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        silence(model)
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    return score_groups(model, graph, index, criterion, data=_data())[_first_group(index).id]


def test_a_channel_the_loss_does_not_see_has_zero_taylor_importance():
    def cut(model):
        model.conv2.weight[:, 2] = 0  # channel 2 reaches nothing downstream: dL/dz is zero there

    scores = _first_group_scores("taylor", cut)
    assert scores[2] == 0 and (scores[[0, 1, 3]] > 0).all()


def test_a_dead_channel_has_zero_mean_activation():
    def kill(model):
        model.bn.weight[1] = 0
        model.bn.bias[1] = 0  # the BN output of channel 1 is exactly zero

    scores = _first_group_scores("activation", kill)
    assert scores[1] == 0 and (scores[[0, 2, 3]] > 0).all()


def test_taylor_matches_its_definition_on_one_batch():
    """(sum over positions of z * dL/dz)^2 per sample, averaged, at the BN output."""
    torch.manual_seed(1)
    model = Net().eval()
    (x, y), = _data(1)
    z_store = {}
    model.bn.register_forward_hook(lambda m, i, o: z_store.setdefault("z", o))
    z_store.clear()
    out = model(x)
    z = z_store["z"]
    grad, = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), z)
    expected = ((z * grad).sum((2, 3)) ** 2).mean(0).detach()
    torch.manual_seed(1)
    model = Net().eval()
    graph, index = analyze_groups(model, x[:1])
    stats = collect_stats(model, graph, index, [(x, y)], needs=["taylor"], batches=1)
    torch.testing.assert_close(stats[_first_group(index).id]["taylor"], expected.float(), rtol=1e-4, atol=1e-8)


class Cancel(nn.Module):
    """Two branches added channel by channel (one coupled group, two BN members); branch b is minus branch a."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc((self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))).mean((2, 3)))


def test_taylor_sums_a_groups_members_before_squaring():
    """Removing a coupled channel zeroes it in every member at once, so its first-order change is the square of the
    members' sum: branches that cancel exactly give zero (squared one by one they would not), channel by channel."""
    torch.manual_seed(0)
    model = Cancel().eval()
    with torch.no_grad():
        model.conv_b.weight.copy_(-model.conv_a.weight)
        model.conv_b.bias.copy_(-model.conv_a.bias)
        model.bn_b.bias.copy_(-model.bn_a.bias)
        model.bn_b.weight[1:] = 2 * model.bn_a.weight[1:]  # channels 1..3 do not cancel
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    group = next(g for g in index.groups if ("bn_a", "norm", None) in g.slots and ("bn_b", "norm", None) in g.slots)
    scores = collect_stats(model, graph, index, _data(2), needs=["taylor"], batches=2)[group.id]["taylor"]
    assert scores[0] < 1e-10 and (scores[1:] > 1e-6).all()


def test_activation_ranks_a_channel_several_layers_write_by_its_filters():
    """A residual-style group (two BN members tied by an add): mean activation summed over the members follows the
    BN biases, so the channels are ranked by their filters' L2 norm, scaled to the group's mean activation. Here
    channel 3 has a huge activation (bias) but near-zero filters: it ranks last."""
    from dpruner.criteria.basic import l2
    from dpruner.criteria.views import group_tensors

    torch.manual_seed(0)
    model = Cancel().eval()
    with torch.no_grad():
        for conv, bn in ((model.conv_a, model.bn_a), (model.conv_b, model.bn_b)):
            conv.weight[3] *= 1e-3
            bn.bias[3] = 10.0
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    group = next(g for g in index.groups if ("bn_a", "norm", None) in g.slots and ("bn_b", "norm", None) in g.slots)
    measured = collect_stats(model, graph, index, _data(), needs=["activation"], batches=3)[group.id]["activation"]
    assert measured.argmax() == 3  # what activation alone would keep first
    scores = score_groups(model, graph, index, "activation", data=_data())[group.id]
    assert scores.argmin() == 3
    view = group_tensors(model, graph, index, group)
    torch.testing.assert_close(torch.as_tensor(scores).float(), l2(view) * measured.mean())


def test_collection_leaves_the_model_as_it_was():
    model = Net().train()
    for p in model.fc.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    collect_stats(model, graph, index, _data(), needs=["taylor", "activation"], batches=2)
    assert model.training and not model.fc.weight.requires_grad and model.conv.weight.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_with_a_data_criterion_needs_data_and_uses_it():
    with pytest.raises(InputError, match="scores channels on data; give --data"):
        dpruner.prune(Net().eval(), torch.randn(1, 3, 6, 6), sparsity=0.5, method="taylor")
    model = Net().eval()
    with torch.no_grad():
        model.conv2.weight[:, 2] = 0
    result = dpruner.prune(model, torch.randn(1, 3, 6, 6), sparsity=0.25, criterion="taylor", data=_data())
    assert result.plan["modules"]["conv"]["out"] == [0, 1, 3]  # the channel the loss never sees went


def test_cli_taylor_needs_data_and_prunes_with_it(tmp_path):
    import json

    from tests.cli.conftest import invoke
    from tests.conftest import SAMPLE_MODELS

    model = SAMPLE_MODELS / "digits_vgg.pt"
    run = invoke("prune", model, "--method", "taylor", "--ratio", "2x", "-o", tmp_path / "a.pt")
    assert run.code == 2 and "give --data" in run.one_error_line() and not (tmp_path / "a.pt").exists()
    run = invoke("prune", model, "--data", "digits", "--method", "taylor", "--ratio", "2x", "--budget-epochs", "0.5",
                 "-o", tmp_path / "b.pt", "--json")
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["method"] == "one-shot" and doc["criterion"] == "taylor" and doc["ratio"]["macs"] == pytest.approx(2.0, rel=0.05)


SCRIPT = '''
import sys, torch
sys.path.insert(0, {root!r})
from tests.criteria.test_data_criteria import Net, _data
from dpruner.criteria.stats import collect_stats
from dpruner.graph.summary import analyze_groups
from dpruner.train.distributed import setup, teardown
ctx, device = setup("cpu")
torch.manual_seed(0)
model = Net().eval()
graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
mine = _data(4)[ctx.rank::ctx.world_size]  # each rank reads its half of the batches
stats = collect_stats(model, graph, index, mine, needs=["taylor", "activation"], batches=4, ctx=ctx)
if ctx.is_main:
    torch.save({{g: {{k: v for k, v in s.items()}} for g, s in stats.items()}}, {out!r})
teardown()
'''


@pytest.mark.slow
def test_collection_under_torchrun_matches_one_process(tmp_path):
    """Two gloo ranks, each reading half of the batches, gather the same statistics as one process reading all."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = tmp_path / "stats.pt"
    script = tmp_path / "collect.py"
    script.write_text(SCRIPT.format(root=root, out=str(out)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = torch.load(out)
    torch.manual_seed(0)
    model = Net().eval()
    graph, index = analyze_groups(model, torch.randn(1, 3, 6, 6))
    alone = collect_stats(model, graph, index, _data(4), needs=["taylor", "activation"], batches=4)
    assert set(both) == set(alone)
    for gid in alone:
        for stat in ("taylor", "activation"):
            torch.testing.assert_close(both[gid][stat], alone[gid][stat], rtol=1e-5, atol=1e-9)


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an (N, C, H, W) tensor, permuting inside (as torchvision's ConvNeXt)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsFirstLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.norm = LayerNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_statistics_of_a_layernorm_that_permutes_inside_are_per_channel():
    """The norm's output is channels-first although it is a LayerNorm: statistics are taken on dim 1 (reading the
    last dim, the width, mixed positions into channels without any error)."""
    torch.manual_seed(0)
    model = ChannelsFirstLN().eval()
    x = torch.randn(4, 3, 6, 5)  # the width equals the channel count: the layout, not the shape, must decide
    graph, index = analyze_groups(model, x[:1])
    group = next(g for g in index.groups if ("norm", "norm", None) in g.slots)
    stats = collect_stats(model, graph, index, [(x, torch.zeros(4, dtype=torch.long))], needs=["activation"],
                          batches=1)
    with torch.no_grad():
        expected = model.norm(model.conv(x)).clamp_min(0).mean((2, 3)).mean(0)
    torch.testing.assert_close(stats[group.id]["activation"], expected, rtol=1e-5, atol=1e-6)
