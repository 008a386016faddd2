"""`--target latency` on a small CNN with a fake timer: the per-layer table, its prediction, the planner pruning to
the measured latency (not the MACs), the cache, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import dpruner
from dpruner.errors import InputError
from dpruner.runtime import latency as latency_module
from dpruner.runtime.latency import LatencySpec, build_latency_table
from tests.conftest import ROOT, SAMPLE_MODELS

OVERHEAD_MS = 0.05


class Net(nn.Module):
    """Three 3x3 convs at 16x16 and a classifier: wide enough for blocks of 8 to matter."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.b1 = nn.BatchNorm2d(64)
        self.c2 = nn.Conv2d(64, 96, 3, padding=1)
        self.b2 = nn.BatchNorm2d(96)
        self.c3 = nn.Conv2d(96, 64, 3, padding=1, stride=2)
        self.b3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


BLOCK = 4


def blocked_ms(module: nn.Module, shape) -> float:
    """A fake runtime whose convolutions cost by blocks of 4 channels (as ONNX Runtime's NCHWc layout does by 8 or
    16): ceil(in/4) * ceil(out/4) * k * k * output pixels, plus a fixed overhead per call."""
    total = [OVERHEAD_MS]

    def hook(m, inputs, output):
        if isinstance(m, nn.Conv2d):
            blocks = math.ceil(m.in_channels / BLOCK) * math.ceil(m.out_channels / BLOCK)
            total.append(blocks * m.kernel_size[0] * m.kernel_size[1] * output.shape[2] * output.shape[3] * 1e-4)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module.eval()(torch.randn(*shape))
    for h in handles:
        h.remove()
    return sum(total)


def net():
    torch.manual_seed(0)
    return Net().eval()


def test_the_table_predicts_the_fake_runtime_at_full_width_and_at_grid_points():
    model, x = net(), torch.randn(1, 3, 16, 16)
    table = build_latency_table(model, x, ["c1", "c2", "c3", "fc"], LatencySpec(timer=blocked_ms, multiple=BLOCK))
    full = blocked_ms(model, x.shape)
    assert table.full_ms == pytest.approx(full)
    assert table.predict({}) == pytest.approx(full)  # every layer at full width
    # the overhead of each single-layer call is in every table entry; the fixed share absorbs the difference
    one_layer = table.layers["c2"].predict(32, 48)  # grid points (multiples of 4 at 12.5% ... 100%)
    assert one_layer == pytest.approx(OVERHEAD_MS + 8 * 12 * 9 * 256 * 1e-4)
    # between grid points, a width is costed as its block: 45 channels cost what 48 do
    assert table.layers["c2"].predict(32, 45) == pytest.approx(one_layer)
    assert table.info["unique_layers"] == 4 and table.info["points_timed"] > 0


def test_pruning_to_a_latency_ratio_meets_the_measured_latency_not_the_macs():
    model, x = net(), torch.randn(1, 3, 16, 16)
    result = dpruner.prune(model, x, ratio=2.0, target="latency",
                           latency=LatencySpec(timer=blocked_ms, multiple=BLOCK))
    info = result.latency
    assert result.target_met and info["before_ms"] == pytest.approx(blocked_ms(net(), x.shape))
    assert info["after_ms"] == pytest.approx(blocked_ms(model, x.shape))  # what was measured is the model returned
    assert info["after_ms"] <= info["goal_ms"] * 1.03 and info["after_ms"] >= info["goal_ms"] * 0.95
    assert result.ratio["latency"] == pytest.approx(2.0, rel=0.06)
    assert abs(info["predicted_ms"] - info["after_ms"]) <= 0.1 * info["after_ms"]
    assert result.ratio["macs"] != pytest.approx(result.ratio["latency"], rel=0.01)  # a different target


def test_a_runtime_pruning_cannot_speed_up_misses_the_target():
    def overhead_only(module, shape):  # latency independent of the widths: nothing to gain
        return 1.0

    model, x = net(), torch.randn(1, 3, 16, 16)
    result = dpruner.prune(model, x, ratio=1.5, target="latency", latency=LatencySpec(timer=overhead_only))
    assert not result.target_met and result.latency["after_ms"] == 1.0


def test_the_table_is_cached_by_model_runtime_and_machine(tmp_path, monkeypatch):
    calls = []

    def fake_measure(module, shape, runtime, threads, min_seconds=1.0):
        calls.append(min_seconds)
        return blocked_ms(module, shape)

    monkeypatch.setenv("DPRUNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency_module, "measure_ms", fake_measure)
    model, x = net(), torch.randn(1, 3, 16, 16)
    first = build_latency_table(model, x, ["c1", "c2", "c3"], LatencySpec(threads=1, multiple=BLOCK))
    timed = len(calls)
    second = build_latency_table(model, x, ["c1", "c2", "c3"], LatencySpec(threads=1, multiple=BLOCK))
    assert len(calls) == timed + 1  # only the whole model again, no layer
    assert second.info["cached"] and not first.info["cached"] and second.predict({}) == first.predict({})
    build_latency_table(model, x, ["c1", "c2", "c3"], LatencySpec(threads=1, batch=4, multiple=BLOCK))
    assert len(calls) > timed + 2  # another batch is another table


def test_latency_needs_a_ratio_and_a_plannable_allocation():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(InputError, match="--ratio"):
        dpruner.prune(net(), x, sparsity=0.5, target="latency",
                      latency=LatencySpec(timer=blocked_ms, multiple=BLOCK))
    with pytest.raises(InputError, match="sensitivity"):
        dpruner.prune(net(), x, ratio=2.0, target="latency", allocation="sensitivity",
                      latency=LatencySpec(timer=blocked_ms, multiple=BLOCK))


def dp(*args):
    return subprocess.run([sys.executable, "-m", "dpruner", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_cli_target_latency_reports_before_after_and_predicted(tmp_path):
    out = tmp_path / "s.pt"
    proc = dp("prune", str(SAMPLE_MODELS / "digits_vgg.pt"), "--ratio", "1.1x", "--target", "latency",
              "--runtime", "torch", "--threads", "1", "-o", str(out), "--json")
    assert proc.returncode in (0, 1), proc.stderr  # 1: this tiny model may not get 1.1x faster on a busy machine
    doc = json.loads(proc.stdout)
    info = doc["latency"]
    assert info["runtime"] == "torch" and info["batch"] == 1 and info["threads"] == 1
    assert info["before_ms"] > 0 and info["after_ms"] > 0 and info["predicted_ms"] > 0 and info["tries"]
    assert doc["ratio"]["latency"] == pytest.approx(info["before_ms"] / info["after_ms"])
    assert doc["target_met"] == (proc.returncode == 0)
    bad = dp("prune", str(SAMPLE_MODELS / "digits_vgg.pt"), "--ratio", "2x", "--target", "latency", "--runtime",
             "cuda", "-o", str(tmp_path / "t.pt"))
    assert bad.returncode == 2 and "onnxruntime or torch" in bad.stderr
