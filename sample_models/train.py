"""Re-create the sample checkpoints: `python sample_models/train.py` (about a minute on 2 CPU cores).

Trains dpruner.zoo:digits_vgg and dpruner.zoo:digits_resnet on scikit-learn's digits (train split), reports
validation and test accuracy, and writes dpruner checkpoints next to this file. Seeded and single-threaded, so a
re-run on the same software stack reproduces the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dpruner.data.digits import INPUT_SHAPE, NUM_CLASSES, split_digits
from dpruner.io import save_checkpoint
from dpruner.io.arch import build_model

HERE = Path(__file__).resolve().parent
MODELS = {"digits_vgg": "dpruner.zoo:digits_vgg", "digits_resnet": "dpruner.zoo:digits_resnet"}
EPOCHS, BATCH, LR, WD, SEED = 40, 64, 0.05, 5e-4, 0


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (pad 1 with the background value, random 8x8 crop)."""
    padded = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(arch: str, splits) -> torch.nn.Module:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = build_model(arch)
    x, y = splits.train
    steps_per_epoch = math.ceil(len(x) / BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WD)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch, pct_start=0.1)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            loss = F.cross_entropy(model(shift_augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the checkpoints (default: sample_models/)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    splits = split_digits(seed=SEED)
    report = {}
    for name, arch in MODELS.items():
        model = train(arch, splits)
        acc = {split: round(accuracy(model, *getattr(splits, split)), 4) for split in ("train", "val", "test")}
        meta = {"data": "digits", "split_seed": SEED, "accuracy": acc, "recipe": {
            "epochs": EPOCHS, "batch": BATCH, "lr": LR, "weight_decay": WD, "seed": SEED, "script": "sample_models/train.py"}}
        save_checkpoint(args.out / f"{name}.pt", model, arch=arch, num_classes=NUM_CLASSES,
                        input_shape=(1, *INPUT_SHAPE), meta=meta)
        report[name] = acc
        print(f"{name}: {acc}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
