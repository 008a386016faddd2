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

STATE_FORMAT = "dpruner_train_state"


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


def state_path_for(output: str | Path) -> Path:
    """Where the resumable state of a run writing `output` lives (beside it; removed when the run completes)."""
    output = Path(output)
    return output.with_name(output.name + ".resume")


def load_state(path: Path) -> dict:
    """A saved training or tolerance-run state (weights_only); a damaged file is a user error, not a crash."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"Cannot read the saved state '{path}' ({type(exc).__name__}); delete it and run "
                         "without --resume.") from None


def check_fields(state: dict, fields: dict[str, type | tuple], what) -> None:
    """A saved state's fields must exist with the expected types: a damaged or hand-edited file is a user error.
    `what` names the file in the message (a path, or words such as 'the resume file')."""
    name_of = f"'{what}'" if isinstance(what, Path) else str(what)
    for name, kind in fields.items():
        value = state.get(name) if isinstance(state, dict) else None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # an integral float saved as int is still a number
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(f"{name_of} is damaged (its '{name}' field is missing or of the wrong type); delete it "
                             "and run without --resume.")


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
        if state_path is None or not state_path.is_file():
            raise InputError(f"--resume was given but there is no saved state at '{state_path}'; run without "
                             "--resume to start over.")
        state = load_state(state_path)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InputError(f"'{state_path}' is not a dpruner training state.")
        check_fields(state, {"config": dict, "model": dict, "train": dict}, state_path)
        check_fields(state["train"], {"step": int, "total_steps": int, "optimizer": dict, "rng": torch.Tensor},
                     state_path)
        if state["config"] != config.to_json():
            raise InputError("--resume needs the same training options as the interrupted run (they differ from "
                             f"those saved in '{state_path}').")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, KeyError, ValueError):
            raise InputError(f"The model does not match the saved state in '{state_path}'.") from None
        start = state["train"]
        if not 0 <= start["step"] <= start["total_steps"]:
            raise InputError(f"'{state_path}' is damaged (step {start['step']} of {start['total_steps']}); delete it "
                             "and run without --resume.")

    def save(train_state: dict) -> None:
        if state_path is not None and ctx.is_main:
            payload = {"format": STATE_FORMAT, "config": config.to_json(), "model": model.state_dict(),
                       "train": train_state}
            atomic_torch_save(payload, state_path)
        barrier(ctx)

    result = fit(model, data, config, device=device, ctx=ctx, teacher=teacher, start=start,
                 on_epoch_end=save if state_path is not None else None)
    if state_path is not None and not keep_state:
        remove_state(state_path, ctx)
    return FinetuneResult(result, int(start["step"]) if start else 0)


def remove_state(state_path: Path, ctx: DistContext = DistContext()) -> None:
    """Delete a finished run's state (rank 0 only): call it after the run's output is safely written."""
    if ctx.is_main:
        Path(state_path).unlink(missing_ok=True)
