"""Exports of models whose graph fixes the batch (a Python loop over the images) or whose outputs have a
value-dependent number of rows (a detector's boxes): a static-batch file said so, and rows compared as sets."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dpruner.export.api import export_model
from dpruner.export.verify import ROW_MATCH_MIN, Verification, _compare_row_sets


class LoopOverImages(nn.Module):
    """torchvision's detectors iterate over the images: the traced graph holds one branch per image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cat([self.conv(img[None]) for img in x]).mean((2, 3))


def test_a_model_that_fixes_the_batch_is_exported_with_a_static_batch_and_says_so(tmp_path):
    result = export_model(LoopOverImages().eval(), (1, 3, 8, 8), tmp_path / "m.onnx")
    assert result.written and result.verification.passed
    assert result.info.dynamic_batch is False and "static batch of 1" in result.info.note
    assert result.info.to_json()["note"] == result.info.note


def test_a_plain_model_keeps_its_dynamic_batch(tmp_path):
    result = export_model(nn.Conv2d(3, 4, 3).eval(), (1, 3, 8, 8), tmp_path / "m.onnx")
    assert result.info.dynamic_batch is True and result.info.note == ""


def _rows(n: int, seed: int = 0):
    gen = np.random.default_rng(seed)
    return [gen.normal(size=(n, 4)).astype(np.float32) * 100, gen.random(n).astype(np.float32),
            gen.integers(0, 5, n).astype(np.int64)]


def test_rows_in_another_order_match_as_sets():
    boxes, scores, labels = _rows(40)
    order = np.random.default_rng(1).permutation(40)
    result = Verification(atol=1e-4)
    _compare_row_sets([boxes, scores, labels], [boxes[order], scores[order], labels[order]], ["b", "s", "l"], result)
    assert result.mismatch is None and "100.0% of 40 rows matched" in result.partial[0]


def test_one_box_more_over_the_threshold_still_matches():
    boxes, scores, labels = _rows(40)
    result = Verification(atol=1e-4)
    _compare_row_sets([boxes, scores, labels], [boxes[:39], scores[:39], labels[:39]], ["b", "s", "l"], result)
    assert 39 / 40 >= ROW_MATCH_MIN and result.mismatch is None


def test_different_boxes_fail():
    expected, other = _rows(40, seed=0), _rows(40, seed=1)
    result = Verification(atol=1e-4)
    _compare_row_sets(expected, other, ["b", "s", "l"], result)
    assert result.mismatch is not None and "match between PyTorch and ONNX Runtime" in result.mismatch
    assert not result.passed
