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


def _batches(loader, split: str = "data"):
    """(inputs, labels) pairs from a loader, checked: reading errors (a truncated image, a loader's own exception
    or sys.exit) and malformed batches become one DataError sentence naming the split, never a crash later."""
    from dpruner.data.spec import DataError
    from dpruner.usercode import user_code

    with user_code(f"Reading the {split} split", DataError):
        iterator = iter(loader)
    seen = 0
    while True:
        with user_code(f"Reading the {split} split", DataError):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except DataError as exc:  # re-raised from a worker process: keep the original sentence only
                raise DataError(_worker_message(exc)) from None
        x, y = _pair(batch, split)
        seen += 1
        yield x, y
    if seen == 0:
        raise DataError(f"The {split} split yields no batches (an empty data set or loader).")


def _worker_message(exc: BaseException) -> str:
    """DataLoader workers re-raise as 'Caught X in DataLoader worker ...\n<traceback>\nX: message': the message."""
    text = str(exc).strip()
    if not text.startswith("Caught "):
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _pair(batch, split: str):
    from dpruner.data.spec import DataError

    if isinstance(batch, dict):
        keys = [k for k in ("image", "input") if k in batch]
        if not keys or "label" not in batch:
            raise DataError(f"Batches of the {split} split are dicts with keys {sorted(map(str, batch))}; dpruner "
                            "needs 'image' (or 'input') and 'label'.")
        x, y = batch[keys[0]], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise DataError(f"Batches of the {split} split must be (inputs, labels) pairs, not a {type(batch).__name__}.")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        kind = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"Inputs of the {split} split must be floating-point tensors with a batch dimension, not "
                        f"{kind}.")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool \
            or y.dim() != 1 or len(y) != len(x):
        kind = f"a {y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"Labels of the {split} split must be one integer class index per input ({len(x)} here), "
                        f"not {kind}.")
    if len(y) and (int(y.min()) < 0):
        raise DataError(f"Labels of the {split} split go down to {int(y.min())}; labels must be >= 0.")
    return x, y


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
            for x, y in _batches(loader, description):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                if y.numel() and int(y.max()) >= logits.shape[1]:
                    from dpruner.data.spec import DataError

                    raise DataError(f"Labels of the {description} split go up to {int(y.max())} but the model has "
                                    f"{logits.shape[1]} outputs.")
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
    from dpruner.usercode import describe, user_code

    x, _ = next(iter(_batches(loader, "validation")))
    was_training = model.training
    model.eval()
    try:
        with user_code("The model's forward"):
            try:
                out = model(x[:2].to(device))
            except RuntimeError as exc:
                raise ShapeError(f"The model cannot run on the data's images of shape {tuple(x.shape[1:])} "
                                 f"({describe(exc)}).") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"The model returns a {type(out).__name__}, not a tensor; training and evaluation need a "
                         "classifier that returns one logit per class.")
    if out.dim() != 2:
        raise ShapeError(f"The model's output has shape {tuple(out.shape)}; a classifier with one logit per class "
                         "was expected.")
    if out.shape[1] != num_classes:
        raise ShapeError(f"The model has {out.shape[1]} outputs but the data set has {num_classes} classes; pass "
                         "the matching --num-classes or another --data.")
    return tuple(x.shape[1:])


def recalibrate_bn(model: nn.Module, loader, *, batches: int = 50, device: torch.device | str = "cpu") -> int:
    """Re-estimate every BatchNorm's running statistics from `batches` batches of `loader` (train-mode forward
    passes without gradients, cumulative averages): pruning changes the statistics the kept channels see, and
    stale ones cost accuracy that no weight update is needed to recover. Nothing else changes (parameters, the
    model's mode afterwards). Returns the number of samples seen."""
    device = torch.device(device)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.to(device).train()
    seen = 0
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(_batches(loader, "train")):
                if i >= batches:
                    break
                model(x.to(device))
                seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return seen
