"""MAC counts against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from dpruner.errors import ShapeError
from dpruner.metrics import count_macs, count_params
from tests.conftest import TinyNet

# TinyNet on a 1x1x7x7 input, counted by hand (fvcore's rules: a conv output element costs Cin/groups*kh*kw MACs,
# bias is free; Linear costs in*out; BatchNorm in eval mode costs 2 per element when it has an affine transform).
CONV1 = 4 * 7 * 7 * (1 * 3 * 3)  # 1764
BN1 = 4 * 7 * 7 * 2  # 392
CONV2 = 6 * 3 * 3 * (4 * 3 * 3)  # 1944: (7 - 3) // 2 + 1 = 3
FC = 6 * 3 * 3 * 5  # 270


def test_tiny_net_macs_by_hand(tiny):
    macs = count_macs(tiny, torch.randn(1, 1, 7, 7))
    assert (macs.by_module["conv1"], macs.by_module["bn1"], macs.by_module["conv2"], macs.by_module["fc"]) == (
        CONV1, BN1, CONV2, FC)
    assert macs.total == CONV1 + BN1 + CONV2 + FC == 4370
    assert macs.by_module[""] == macs.total


def test_macs_scale_with_batch(tiny):
    assert count_macs(tiny, torch.randn(3, 1, 7, 7)).total == 3 * 4370


def test_params_by_hand(tiny):
    assert count_params(tiny) == (4 * 9 + 4) + (4 + 4) + (6 * 4 * 9) + (54 * 5 + 5)


def test_wrong_input_is_a_shape_error(tiny):
    with pytest.raises(ShapeError, match="cannot run on input shape 3,7,7"):
        count_macs(tiny, torch.randn(1, 3, 7, 7))
