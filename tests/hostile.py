"""Hostile and faulty user code for the reliability tests: architectures whose forward raises, exits or returns a
tuple, a factory that calls sys.exit, an architecture dpruner's engine cannot prune correctly, and `python:` data
loaders that yield the wrong things. Referenced as `tests/hostile.py:NAME` specs."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """1x8x8 input -> conv 8 - BN - ReLU - conv 8 - global mean - Linear; `mode` makes its forward misbehave."""

    def __init__(self, mode: str = "ok", num_classes: int = 10, channels: int = 1):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        if self.mode == "raise":
            raise ValueError("boom")
        if self.mode == "exit":
            sys.exit(3)
        y = self.fc(self.conv2(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))
        return (y, y) if self.mode == "tuple" else y


def ok(num_classes: int = 10) -> Net:
    return Net("ok", num_classes)


def ok_rgb(num_classes: int = 10) -> Net:
    return Net("ok", num_classes, channels=3)


def raises(num_classes: int = 10) -> Net:
    return Net("raise", num_classes)


def exits(num_classes: int = 10) -> Net:
    return Net("exit", num_classes)


def tuple_out(num_classes: int = 10) -> Net:
    return Net("tuple", num_classes)


def factory_exits(num_classes: int = 10):
    sys.exit(4)


class SplitNet(nn.Module):
    """`torch.split` with literal sizes: the sizes are constants of the code, so the engine pins the split input's
    channels (naming the node) and prunes the layers after it. Tests plant a faulty split rule on it to check that
    an engine fault is reported as dpruner's own (exit 70, nothing written)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(2, 4, 1)
        self.b = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        p, q = torch.split(self.conv(x), [2, 6], dim=1)
        return self.fc(torch.cat([self.a(p), self.b(q)], 1).mean((2, 3)))


def split_net(num_classes: int = 10) -> SplitNet:
    return SplitNet(num_classes)


def _loader(x, y, batch_size=16):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _digits_like(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def good_loaders():
    x, y = _digits_like()
    return {"train": _loader(x, y), "val": _loader(x, y), "num_classes": 10}


def float_labels():
    x, y = _digits_like()
    return {"train": _loader(x, y.float()), "val": _loader(x, y.float()), "num_classes": 10}


def int_inputs():
    x, y = _digits_like()
    return {"train": _loader((x * 10).long(), y), "val": _loader((x * 10).long(), y), "num_classes": 10}


def empty_val():
    x, y = _digits_like()
    return {"train": _loader(x, y), "val": _loader(x[:0], y[:0]), "num_classes": 10}


def labels_too_high():
    x, y = _digits_like()
    return {"train": _loader(x, y + 50), "val": _loader(x, y), "num_classes": 10}


class _Exploding(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        if i >= 20:
            sys.exit(5)
        return torch.randn(1, 8, 8), 1


def exits_while_loading():
    return {"train": DataLoader(_Exploding(), batch_size=8), "val": DataLoader(_Exploding(), batch_size=8),
            "num_classes": 10}


def exits_when_called():
    sys.exit(6)


class NanRelu(nn.Module):
    """A NaN weight followed by ReLU and max-pooling: PyTorch propagates the NaN to every output, ONNX Runtime's
    ReLU/MaxPool turn it into finite numbers, so the two runtimes disagree (export verification must fail)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.conv.weight[0, 0, 0, 0] = float("nan")

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def nan_relu(num_classes: int = 3) -> NanRelu:
    return NanRelu(num_classes)


def all_nan(num_classes: int = 10) -> Net:
    """Every weight NaN: both runtimes output NaN everywhere (they agree; verification says so)."""
    model = Net("ok", num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model
