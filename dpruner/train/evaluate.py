"""Top-1 accuracy and loss of a model on a loader, exact across torchrun ranks (counts are summed, not averaged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpruner.errors import ShapeError
from dpruner.train.distributed import DistContext, sum_across
from dpruner.train.progress import progress_bar, progress_enabled


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # top-1, a fraction in [0, 1]
    loss: float  # mean cross-entropy (no label smoothing)
    samples: int

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss, "samples": self.samples}


def _batches(loader):
    for batch in loader:
        if isinstance(batch, dict):
            yield batch["image"] if "image" in batch else batch["input"], batch["label"]
        else:
            yield batch[0], batch[1]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", *, ctx: DistContext = DistContext(),
             quiet: bool = True, description: str = "evaluate") -> EvalResult:
    """Evaluate in eval mode (the model's mode is restored after)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        with progress_bar(description, len(loader), progress_enabled(quiet, ctx.is_main)) as update:
            for x, y in _batches(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                total += int(y.numel())
                update(acc=correct / max(total, 1))
    finally:
        model.train(was_training)
    correct, total, loss_sum = sum_across([correct, total, loss_sum], ctx, device)
    return EvalResult(correct / max(total, 1), loss_sum / max(total, 1), int(total))


@torch.no_grad()
def check_compatible(model: nn.Module, loader, num_classes: int, device: torch.device | str = "cpu") -> tuple:
    """Run one batch: the model must accept the data's images and have one output per class. Returns the
    input shape (C, H, W) of the data. Raises ShapeError with one sentence otherwise."""
    x, _ = next(iter(_batches(loader)))
    was_training = model.training
    model.eval()
    try:
        out = model(x[:2].to(device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShapeError(f"The model cannot run on the data's images of shape {tuple(x.shape[1:])} ({first}).") from None
    finally:
        model.train(was_training)
    if out.dim() != 2:
        raise ShapeError(f"The model's output has shape {tuple(out.shape)}; a classifier with one logit per class "
                         "was expected.")
    if out.shape[1] != num_classes:
        raise ShapeError(f"The model has {out.shape[1]} outputs but the data set has {num_classes} classes; pass "
                         "the matching --num-classes or another --data.")
    return tuple(x.shape[1:])
