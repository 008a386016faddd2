"""Library calls behind `dpruner evaluate` and `dpruner finetune`: evaluation on every split, and fine-tuning with
an atomic, resumable training state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpruner.errors import InputError
from dpruner.train.config import TrainConfig
from dpruner.train.distributed import DistContext, barrier
from dpruner.train.evaluate import EvalResult, check_compatible, evaluate
from dpruner.train.loop import FitResult, fit
from dpruner.train.state import (check_state, load_state, make_state, read_resume,  # noqa: F401 (re-exported)
                                   remove_state, state_path_for)



def evaluate_splits(model: nn.Module, data, device: torch.device | str = "cpu", *, ctx: DistContext = DistContext(),
                    quiet: bool = True) -> dict[str, EvalResult]:
    """Top-1 accuracy on the validation split and, when the data set has one, the test split."""
    check_compatible(model, data.val, data.num_classes, "cpu" if device is None else device)
    out = {"val": evaluate(model, data.val, device, ctx=ctx, quiet=quiet, description="validation")}
    if data.test is not None:
        out["test"] = evaluate(model, data.test, device, ctx=ctx, quiet=quiet, description="test")
    return out


@dataclass(frozen=True)
class FinetuneResult:
    fit: FitResult
    resumed_from_step: int


def finetune(model: nn.Module, data, config: TrainConfig, *, device: torch.device | str = "cpu",
             ctx: DistContext = DistContext(), teacher: nn.Module | None = None, state_path: Path | None = None,
             resume: bool = False, keep_state: bool = False) -> FinetuneResult:
    """Fine-tune `model` in place. With `state_path`, rank 0 saves the training state there atomically after every
    epoch; `resume=True` continues from it (same model, data and config), so Ctrl-C or a crash loses at most one
    epoch. The state file is removed when training completes, unless `keep_state`: a caller that still has to
    write its output keeps it and calls remove_state() once the output is in place (an interrupt in between must
    not lose the run)."""
    from dpruner.io.atomic import atomic_torch_save

    start = None
    if resume:
        state = read_resume(state_path)
        start = check_state(state, "finetune", config.to_json(),
                            {"step": int, "total_steps": int, "optimizer": dict, "rng": torch.Tensor}, state_path)
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, KeyError, ValueError):
            raise InputError(f"The model does not match the saved state in '{state_path}'.") from None
        if not 0 <= start["step"] <= start["total_steps"]:
            raise InputError(f"'{state_path}' is damaged (step {start['step']} of {start['total_steps']}); delete it "
                             "and run without --resume.")

    def save(train_state: dict) -> None:
        if state_path is not None and ctx.is_main:
            atomic_torch_save(make_state("finetune", config.to_json(), model.state_dict(), train_state), state_path)
        barrier(ctx)

    result = fit(model, data, config, device=device, ctx=ctx, teacher=teacher, start=start,
                 on_epoch_end=save if state_path is not None else None)
    if state_path is not None and not keep_state:
        remove_state(state_path, ctx)
    return FinetuneResult(result, int(start["step"]) if start else 0)


def recalibrate(model: nn.Module, data, env, *, batches: int = 50) -> None:
    """BatchNorm statistics re-estimated on `batches` training batches on the run's device; under torchrun every
    rank then takes rank 0's buffers (each rank read its own shard), so all ranks keep and measure one model."""
    from dpruner.train.evaluate import recalibrate_bn

    recalibrate_bn(model.to(env.device), data.train, batches=batches, device=env.device)
    if env.ctx.enabled:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.cpu()
