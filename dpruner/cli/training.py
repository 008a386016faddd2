"""Options shared by the commands that read data or train (evaluate, finetune, prune --tolerance), declared once,
and the glue that turns them into library objects."""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

DataOpt = Annotated[Optional[str], typer.Option("--data", help="Data set: digits, imagefolder:ROOT, cifar10:ROOT, cifar100:ROOT or python:file.py:fn (docs/data.md).")]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction", help="Share of the training split held out for validation (tolerance decisions); never trained on.")]
ValFromOpt = Annotated[str, typer.Option("--val-from", help="Where the validation split comes from: 'train' (carved from it, --val-fraction) or 'test' (half of the test split, seeded; the other half is reported as test). Use 'test' when the checkpoint was trained on the whole training split, so decisions are taken on data it never saw. Or a data spec (imagefolder:ROOT, ...): validation is that data set's test split, a held-out set of your own.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size per process.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data-loading worker processes.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda when available).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed for splits, shuffling, augmentation and initialisation: the same seed gives the same result on CPU.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (they are also off when stderr is not a terminal).")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="cifar10:/cifar100: only: download the data set into ROOT if it is missing.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (SGD, Nesterov momentum 0.9, cosine schedule).")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="Weight decay (not applied to biases and norm parameters).")]
LabelSmoothingOpt = Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy loss.")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Override the data set's normalisation mean, comma-separated per channel (e.g. 0.485,0.456,0.406).")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Override the data set's normalisation std, comma-separated per channel.")]
AugmentOpt = Annotated[bool, typer.Option("--augment/--no-augment", help="Training augmentation (random crop + flip for images).")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", help="Linear learning-rate warm-up, in epochs (fractions allowed).")]


def releases_process_group(command):
    """Wrap a command that may join a torchrun process group so that it leaves the group however it ends
    (see dpruner.train.distributed.teardown for why a rank must not exit with the group alive)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        finally:
            if "torch.distributed" in sys.modules:  # never import torch just to find there is nothing to do
                from dpruner.train.distributed import teardown

                teardown()

    return wrapper


def train_config(*, epochs: float, lr: float, weight_decay: float, label_smoothing: float, warmup_epochs: float,
                 device: str, seed: int, quiet: bool):
    """TrainConfig from the shared options (it checks their ranges)."""
    from dpruner.train.config import TrainConfig

    return TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing,
                       warmup_epochs=warmup_epochs, device=device, seed=seed, quiet=quiet)


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    from dpruner.errors import InputError

    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"{option} must be comma-separated numbers such as 0.5,0.5,0.5, got '{text}'.") from None


def load_bundle(spec: str | None, *, input_shape, batch_size: int, workers: int, val_fraction: float, seed: int,
                download: bool, ctx, mean: str | None = None, std: str | None = None, augment: bool = True,
                val_from: str = "train"):
    """The data set for a model whose input is `input_shape` (C,H,W or N,C,H,W; None: the data's own size)."""
    from dpruner.data.loaders import load_data
    from dpruner.errors import InputError

    if spec is None:
        raise InputError("This command needs --data (e.g. --data digits or --data imagefolder:ROOT).")
    image_size = int(input_shape[-1]) if input_shape is not None else None
    return load_data(spec, batch_size=batch_size, workers=workers, val_fraction=val_fraction, seed=seed,
                     download=download, image_size=image_size, rank=ctx.rank, world_size=ctx.world_size,
                     mean=_floats(mean, "--mean"), std=_floats(std, "--std"), augment=augment, val_from=val_from)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def data_key(spec: str | None, *, val_from: str, val_fraction: float, seed: int, batch_size: int,
             mean: str | None, std: str | None) -> str:
    """Names the held-out batches a sensitivity scan reads, for its cache: `analyze --sensitivity` and
    `prune --allocation sensitivity` with the same data options share one cached result."""
    return f"{spec}|val_from={val_from}|val_fraction={val_fraction}|seed={seed}|batch={batch_size}|mean={mean}|std={std}"


SensitivityBatchesOpt = Annotated[int, typer.Option("--sensitivity-batches", min=1, help="Sensitivity scan: validation batches each pruned copy is scored on (the same batches for every group and level).")]
