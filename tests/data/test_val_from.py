"""`--val-from test`: decisions on data the checkpoint never trained on, the test split halved by seed."""

from __future__ import annotations

import json

import pytest
import torch

from dpruner.data.loaders import load_data
from dpruner.data.spec import DataError


def _labels(loader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def _inputs(loader) -> torch.Tensor:
    return torch.cat([x for x, _ in loader])


def test_the_test_split_is_halved_into_val_and_test_disjoint_and_seeded():
    default = load_data("digits", batch_size=64)
    halved = load_data("digits", batch_size=64, val_from="test")
    full_test = _inputs(default.test)
    val, test = _inputs(halved.val), _inputs(halved.test)
    assert len(val) + len(test) == len(full_test) and abs(len(val) - len(test)) <= 10
    # every image of both halves comes from the original test split, none twice
    joined = torch.cat([val, test]).flatten(1)
    assert torch.unique(joined, dim=0).shape[0] == len(full_test)
    assert set(map(tuple, joined.tolist())) == set(map(tuple, full_test.flatten(1).tolist()))
    # the validation images carved from train go back to training: the whole training split trains
    assert len(halved.train.dataset) == len(default.train.dataset) + len(default.val.dataset)
    assert "val from test" in halved.name
    again = load_data("digits", batch_size=64, val_from="test")
    assert torch.equal(_inputs(again.val), val)  # same seed, same halves
    other = load_data("digits", batch_size=64, val_from="test", seed=1)
    assert not torch.equal(_inputs(other.val), val)
    counts = torch.bincount(_labels(halved.val), minlength=10) - torch.bincount(_labels(halved.test), minlength=10)
    assert counts.abs().max() <= 1  # stratified per class


def test_val_from_rejects_unknown_values_and_python_loaders(tmp_path):
    with pytest.raises(DataError, match="val_from must be .train., .test. or a data spec"):
        load_data("digits", val_from="val")
    module = tmp_path / "data.py"
    module.write_text("def loaders(batch_size=8):\n    return [], []\n")
    with pytest.raises(DataError, match="--val-from other than train does not apply"):
        load_data(f"python:{module}:loaders", val_from="test")


def test_cli_evaluate_reports_both_halves():
    from tests.cli.conftest import invoke
    from tests.conftest import SAMPLE_MODELS

    run = invoke("evaluate", SAMPLE_MODELS / "digits_vgg.pt", "--data", "digits", "--val-from", "test", "--json")
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert "val from test" in doc["data"]
    bad = invoke("evaluate", SAMPLE_MODELS / "digits_vgg.pt", "--data", "digits", "--val-from", "nope")
    assert bad.code == 2 and "val_from must be 'train', 'test' or a data spec" in bad.one_error_line()


def test_validation_from_another_data_set_is_its_test_split(tmp_path):
    """`val_from=SPEC`: a held-out set of the user's own; training and test stay those of --data."""
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / "held" / split / label
            folder.mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (8, 8), (20 * i, 200 if label == "a" else 0, 0)).save(folder / f"{i}.png")
    own = load_data(f"imagefolder:{tmp_path / 'held'}", batch_size=4, image_size=8)
    both = load_data(f"imagefolder:{tmp_path / 'held'}", batch_size=4, image_size=8,
                     val_from=f"imagefolder:{tmp_path / 'held'}")
    assert torch.equal(_inputs(both.val), _inputs(own.test)) and torch.equal(_inputs(both.test), _inputs(own.test))
    # nothing is carved from the training split: all 20 images train (18 when validation is carved from them)
    assert len(both.train.dataset) == 20 and len(own.train.dataset) == 18
    assert "(20 train; validation: test split of imagefolder:" in both.name
    with pytest.raises(DataError, match=r"has 2 classes, but 'digits \(.*\)' has 10"):
        load_data("digits", val_from=f"imagefolder:{tmp_path / 'held'}")
    with pytest.raises(DataError, match="val_from must be 'train', 'test' or a data spec"):
        load_data("digits", val_from="holdout")
