"""The fine-tuning loop: SGD (Nesterov), cosine schedule with linear warm-up, label smoothing, optional knowledge
distillation from a teacher, and callbacks through which a pruning method joins the training without copying the
loop: extra loss terms (the tolerance controller's sparsity penalty, a gate's sparsity term), parameter groups of
its own (a scorer network's learning rate), and work before/after each optimizer step (sampling masks, restoring
masked weights that momentum or weight decay moved)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpruner.train.config import TrainConfig
from dpruner.train.distributed import DistContext, sum_across
from dpruner.train.evaluate import _batches
from dpruner.train.progress import progress_bar, progress_enabled


@dataclass(frozen=True)
class FitResult:
    epochs: float  # epochs trained by this call (fractional: steps / steps per epoch)
    steps: int
    train_loss: float  # mean training loss (including distillation and penalty terms)
    train_accuracy: float  # top-1 on the augmented training batches seen
    seconds: float

    def to_json(self) -> dict:
        return {"epochs": self.epochs, "steps": self.steps, "train_loss": self.train_loss,
                "train_accuracy": self.train_accuracy, "seconds": self.seconds}


class Callback:
    """Hooks into `fit`; every method is optional (the defaults do nothing). `step` counts optimizer steps of this
    `fit` call, from its start (or resume) point."""

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        """The optimizer's parameter groups (fit's default: decay on weights, none on biases and norms); return
        them changed, or extended with parameters that live outside the model (a scorer network)."""
        return groups

    def before_step(self, model: nn.Module, step: int) -> None:
        """Before the forward pass of a step (e.g. sample this step's masks)."""

    def loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """An extra term added to the step's loss (None: nothing)."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimizer.step() (e.g. put masked weights back to zero: momentum and weight decay moved them)."""

    def should_stop(self, model: nn.Module, step: int) -> bool:
        """After step `step`: True ends training early (a method that reached its goal). Under torchrun every rank
        must answer the same, so decide from state all ranks share (weights, seeded draws), never from local data."""
        return False


class Penalty(Callback):
    """A loss term `fn(model)` (the tolerance controller's L1 push on the channels about to go)."""

    def __init__(self, fn: Callable[[nn.Module], torch.Tensor]):
        self.fn = fn

    def loss(self, model: nn.Module, step: int) -> torch.Tensor:
        return self.fn(model)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (1-D tensors): decaying them only hurts accuracy."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear from ~0 to 1 over warm-up, then half a cosine down to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: KL(teacher_T || student_T) * T^2 (T^2 keeps gradients at the CE scale)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                    log_target=True, reduction="batchmean") * t * t


def fit(model: nn.Module, data, config: TrainConfig, *, device: torch.device | str = "cpu",
        ctx: DistContext = DistContext(), teacher: nn.Module | None = None,
        penalty: Callable[[nn.Module], torch.Tensor] | None = None, start: dict | None = None,
        on_epoch_end: Callable[[dict], None] | None = None, description: str = "fine-tune",
        position: int = 0, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train `model` in place for config.epochs (fractional allowed) on data.train.

    `start` is a state from on_epoch_end (resume: optimizer, schedule position, RNG). on_epoch_end receives
    {'step', 'total_steps', 'optimizer', 'rng'} after every full epoch, for the caller to save atomically.
    With torchrun the model is wrapped in DistributedDataParallel for this call only, so a pruned (reshaped) model
    can be wrapped again by the next call. `position` is how many training batches earlier calls consumed: the
    data stream continues from there (epoch order and offset), so a series of short fine-tunes sees all the data.
    `callbacks` (see Callback) run in order; `penalty` is shorthand for a Penalty callback run first.
    """
    callbacks = [*([Penalty(penalty)] if penalty is not None else []), *callbacks]
    device = torch.device(device)
    steps_per_epoch = len(data.train)
    if steps_per_epoch == 0:
        from dpruner.data.spec import DataError

        raise DataError("The training split is empty (a loader with drop_last and fewer items than a batch?).")
    total = max(1, round(config.epochs * steps_per_epoch))
    cuda = device.type == "cuda"
    amp = config.amp if config.amp is not None else cuda
    channels_last = config.channels_last if config.channels_last is not None else cuda
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
    groups = param_groups(model, config.weight_decay)
    for callback in callbacks:
        groups = callback.param_groups(model, groups)
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0)
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, max(warmup, 0)))
    step = 0
    torch.manual_seed(config.seed)
    if start is not None:
        optimizer.load_state_dict(start["optimizer"])
        step = int(start["step"])
        schedule.last_epoch = step  # the saved param groups already hold the LR for `step`
        torch.set_rng_state(start["rng"])
    net = model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and cuda else nullcontext()
    loss_sum = correct = seen = 0.0
    stopped = False
    began = time.perf_counter()
    model.train()
    with progress_bar(description, total, progress_enabled(config.quiet, ctx.is_main)) as update:
        update(advance=step)
        while step < total:
            epoch, offset = divmod(position + step, steps_per_epoch)
            data.set_epoch(epoch, offset)  # resume or continue inside an epoch without loading what was done
            for x, y in _batches(data.train, "train"):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for callback in callbacks:
                    callback.before_step(model, step)
                with autocast:
                    logits = net(x)
                    if int(y.max()) >= logits.shape[-1]:
                        from dpruner.data.spec import DataError

                        raise DataError(f"Labels of the train split go up to {int(y.max())} but the model has "
                                        f"{logits.shape[-1]} outputs.")
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                    if teacher is not None:
                        with torch.no_grad():
                            target = teacher(x)
                        loss = ((1 - config.distill_alpha) * loss
                                + config.distill_alpha * distillation_loss(logits, target, config.distill_temperature))
                for callback in callbacks:
                    term = callback.loss(model, step)
                    if term is not None:
                        loss = loss + term
                bad = not bool(torch.isfinite(loss))
                if ctx.enabled:  # all ranks must stop together, or the others wait forever in the next all-reduce
                    bad = sum_across([float(bad)], ctx, device)[0] > 0
                if bad:
                    from dpruner.errors import DprunerError

                    raise DprunerError(f"The training loss became non-finite (nan or inf) at step {step}; lower --lr.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for callback in callbacks:
                    callback.after_step(model, step)
                schedule.step()
                step += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += float((logits.argmax(1) == y).sum())
                seen += len(y)
                update(loss=loss_sum / seen, acc=correct / seen)
                if any([callback.should_stop(model, step - 1) for callback in callbacks]):
                    stopped = True
                if step >= total or stopped:
                    break
            if stopped:
                break
            if on_epoch_end is not None and (position + step) % steps_per_epoch == 0 and step < total:
                on_epoch_end({"step": step, "total_steps": total, "optimizer": optimizer.state_dict(),
                              "rng": torch.get_rng_state()})
    loss_sum, correct, seen = sum_across([loss_sum, correct, seen], ctx, device)
    if ctx.enabled:  # BatchNorm statistics drift apart on each rank's last batches: everyone takes rank 0's
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return FitResult(step / steps_per_epoch, step, loss_sum / max(seen, 1), correct / max(seen, 1),
                     time.perf_counter() - began)
