"""BatchNorm recalibration after pruning: running statistics re-estimated from data, nothing else touched."""

from __future__ import annotations

import torch
from torch import nn

from dpruner.train.evaluate import recalibrate_bn


def test_running_statistics_become_the_datas_and_nothing_else_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    data = [(torch.randn(16, 3, 4, 4) * 3 + 2, torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    seen = recalibrate_bn(model, data, batches=3)
    assert seen == 48 and not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        z = torch.cat([model[0](x) for x, _ in data[:3]])
    torch.testing.assert_close(model[1].running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, z.var((0, 2, 3), unbiased=False) * 1, rtol=5e-2, atol=1e-3)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v)
