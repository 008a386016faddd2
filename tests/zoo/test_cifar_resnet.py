"""dpruner.zoo's CIFAR ResNets against the real pretrained checkpoints in ../shared/data."""

from __future__ import annotations

import pytest
import torch

from dpruner.analysis import analyze
from dpruner.io import load_checkpoint
from dpruner.zoo import resnet20, resnet56
from tests.conftest import shared_data

# ImageNet statistics: the normalisation the checkpoints were trained with (../shared/data/README.md).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_architecture_sizes():
    assert sum(p.numel() for p in resnet20().parameters()) == 269_722
    assert sum(p.numel() for p in resnet56().parameters()) == 853_018


@pytest.mark.data
def test_pretrained_resnet56_loads_and_classifies():
    path = shared_data("cifar-resnet/resnet56-4bfd9763.th")
    test_dir = shared_data("cifar10-jpeg/test")
    loaded = load_checkpoint(path, arch="dpruner.zoo:resnet56")
    from PIL import Image

    images, labels = [], []
    for label, folder in enumerate(sorted(p for p in test_dir.iterdir() if p.is_dir())):
        for file in sorted(folder.iterdir())[:30]:
            images.append(torch.tensor(list(Image.open(file).convert("RGB").getdata()), dtype=torch.float32))
            labels.append(label)
    x = torch.stack(images).reshape(-1, 32, 32, 3).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        acc = float((loaded.model(x).argmax(1) == torch.tensor(labels)).float().mean())
    assert acc > 0.7  # README: about 83% on this lossy copy; 300 images leave a few points of noise
    assert analyze(loaded.model, (1, 3, 32, 32)).macs == 126_554_752
