"""Cached layer inputs (methods/prefix.py): replaying the part of the network before the changed modules gives
exactly what a full forward gives, on real torchvision models whose blocks edit tensors in place (`out +=
identity`, a ReLU(inplace=True) module called twice per block), and coarse's candidate judging is unchanged by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from dpruner.graph.summary import analyze_groups
from dpruner.methods.coarse import Masking, changed_modules, group_order, judge
from dpruner.methods.prefix import Prefix


def _resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_clean_takes_the_outermost_modules_that_finish_before_the_change():
    model = _resnet18()
    prefix = Prefix(model, torch.randn(2, 3, 64, 64))
    assert prefix.clean({"layer3.1.conv1"}) == ["bn1", "conv1", "layer1", "layer2", "layer3.0", "maxpool", "relu"]
    # inside the block: its convs and bn1 ran before bn2, but its ReLU module runs twice per block: not replayed
    assert prefix.clean({"layer3.1.bn2"}) == ["bn1", "conv1", "layer1", "layer2", "layer3.0", "layer3.1.bn1",
                                              "layer3.1.conv1", "layer3.1.conv2", "maxpool", "relu"]
    assert prefix.clean({"conv1"}) == []  # nothing runs before the first layer
    assert prefix.clean({"not.a.module"}) == []  # a changed parameter used outside a module call: replay nothing


@pytest.mark.parametrize("changed", ["layer2.1.conv2", "layer4.0.downsample.0", "fc"])
def test_a_replayed_forward_equals_the_full_forward(changed):
    model = _resnet18()
    x = torch.randn(4, 3, 64, 64)
    prefix = Prefix(model, x)
    names = prefix.clean({changed})
    assert names
    weight = dict(model.named_modules())[changed].weight
    reference, cache = prefix.record(names, x)
    with torch.no_grad():
        weight.mul_(0.5)  # the variant: the changed module's weights differ
        full = model(x)
        for _ in range(2):  # twice: a replay must not have edited the cache in place
            with prefix.replay(cache):
                replayed = model(x)
            torch.testing.assert_close(replayed, full, rtol=0, atol=0)
    assert not torch.equal(reference, full)
    assert all("forward" not in vars(m) for m in model.modules())  # stubs removed


@pytest.mark.parametrize("bn_batch", [False, True])
def test_coarse_judging_is_the_same_with_and_without_cached_inputs(bn_batch):
    """Every candidate mask of a late group gets the same error and loss whether the prefix is replayed or not."""
    model = _resnet18()
    example = torch.randn(1, 3, 64, 64)
    graph, index = analyze_groups(model, example)
    group = group_order(model, graph, index)[-3]
    positions = np.searchsorted(index.roots, np.asarray(group.channels))
    rng = np.random.default_rng(0)
    variants = []
    for _ in range(4):
        flags = np.zeros(len(index.roots), dtype=bool)
        flags[rng.choice(positions, size=len(positions) // 2, replace=False)] = True
        variants.append(flags)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 64, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(2)]
    every = np.zeros(len(index.roots), dtype=bool)
    every[positions] = True
    changed = changed_modules(graph, index, every)
    prefix = Prefix(model, batches[0][0])
    assert prefix.clean(changed)  # a late group: there is a prefix to replay
    masking = Masking(model, graph, index)
    plain = judge(model, batches, variants, masking.apply, masking.undo, changed, None, bn_batch=bn_batch)
    cached = judge(model, batches, variants, masking.apply, masking.undo, changed, prefix, bn_batch=bn_batch)
    assert len({round(e, 6) for e, _ in plain}) > 1 or len({round(l, 6) for _, l in plain}) > 1
    np.testing.assert_allclose(np.asarray(cached), np.asarray(plain), rtol=1e-5, atol=1e-6)
