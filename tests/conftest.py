"""Shared fixtures: tiny models for mechanics, paths to the real data when it is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = ROOT / "sample_models"
SHARED_DATA = Path(os.environ.get("DPRUNER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_data(relative: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not present: {path} (a fresh clone has no ../shared/data; set DPRUNER_SHARED_DATA)")
    return path


class TinyNet(nn.Module):
    """conv 1->4 (3x3, pad 1) - BN - ReLU - conv 4->6 (3x3, stride 2, no pad) - flatten - Linear(6*3*3 -> 5)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6 * 3 * 3, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.conv2(x).flatten(1))


def tiny_net(num_classes: int = 5) -> TinyNet:
    """Factory used as `tests/conftest.py:tiny_net` in arch-spec tests."""
    return TinyNet(num_classes)


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def not_a_model() -> int:
    """A factory that returns something other than an nn.Module (for error tests)."""
    return 42


# Hypothesis profiles: `ci` (the default: a small, fixed example count, no example database in the clone) and
# `long` (10,000 examples; `pytest tests/cli/test_properties.py --hypothesis-profile=long`).
try:
    from hypothesis import HealthCheck, settings

    _COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=int(os.environ.get("DPRUNER_PROPERTY_EXAMPLES", "100")),
                              database=None, derandomize=True, **_COMMON)
    settings.register_profile("long", max_examples=10_000, **_COMMON)
    settings.load_profile("ci")
except ImportError:  # hypothesis is in the test extra; without it the property tests skip
    pass


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dpruner cache folder (sensitivity scans): nothing is read from or written to the
    user's ~/.cache, and no test sees another's results."""
    monkeypatch.setenv("DPRUNER_CACHE_DIR", str(tmp_path_factory.mktemp("dpruner-cache")))
