"""The shipped sample checkpoints: small, loadable with no arguments, and as accurate as the README says."""

from __future__ import annotations

import pytest
import torch

from dpruner.data.digits import split_digits
from dpruner.io import load_checkpoint
from tests.conftest import SAMPLE_MODELS

# The README states these test accuracies (measured by sample_models/train.py); the checkpoint must still reach them.
STATED_TEST_ACCURACY = {"digits_vgg": 0.99, "digits_resnet": 0.99}


@pytest.mark.parametrize("name", sorted(STATED_TEST_ACCURACY))
def test_sample_model(name):
    path = SAMPLE_MODELS / f"{name}.pt"
    assert path.stat().st_size < 2 * 1024 * 1024
    loaded = load_checkpoint(path)
    assert loaded.arch == f"dpruner.zoo:{name}" and loaded.input_shape == (1, 1, 8, 8)
    x, y = split_digits(seed=loaded.meta["split_seed"]).test
    with torch.no_grad():
        acc = float((loaded.model(x).argmax(1) == y).float().mean())
    assert acc >= STATED_TEST_ACCURACY[name]
    assert acc == pytest.approx(loaded.meta["accuracy"]["test"], abs=1e-4)


def test_digits_splits_are_disjoint_and_stratified():
    splits = split_digits(seed=0)
    sizes = [len(part[1]) for part in (splits.train, splits.val, splits.test)]
    assert sum(sizes) == 1797 and sizes[2] == pytest.approx(0.2 * 1797, abs=10)
    for part in (splits.train, splits.val, splits.test):
        assert torch.bincount(part[1], minlength=10).min() > 0
    train_rows = {tuple(r.flatten().tolist()) for r in splits.train[0]}
    # digits has a few duplicate images; disjoint indices still leave almost no test image in train
    overlap = sum(tuple(r.flatten().tolist()) in train_rows for r in splits.test[0])
    assert overlap <= 5
