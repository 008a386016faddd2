"""scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes), shipped inside scikit-learn.

The embedded default data set: no download, small enough to train and prune on 2 CPU cores in seconds.
Splits are stratified and fixed by a seed, so train, validation and test never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Pixel values 0..16 are scaled to [0, 1], then normalised with the training set's statistics (computed once on
# the whole set; they are constants of the data set, not of a split).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplits:
    """Normalised images (N,1,8,8 float32) and labels (N int64) for each split."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images, normalised, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return (x - DIGITS_MEAN) / DIGITS_STD, y


def split_digits(*, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> DigitsSplits:
    """Stratified train/val/test split, identical for the same seed on every machine."""
    x, y = load_digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for label in range(NUM_CLASSES):
        idx = (y == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    chosen = {name: torch.cat(chunks).sort().values for name, chunks in parts.items()}
    return DigitsSplits(**{name: (x[idx], y[idx]) for name, idx in chosen.items()})
