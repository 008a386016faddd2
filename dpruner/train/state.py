"""One resumable-state format for every long run (finetune, the tolerance controller, and each method that trains).

A state is plain data plus tensors, saved atomically beside the run's output (`OUTPUT.resume`) and read back with
`weights_only=True`:

    {"format": "dpruner_run_state", "method": "finetune" | "tolerance" | ...,
     "config": {...options that change results...}, "plans": [pruning plans applied so far],
     "model": state_dict (of the model after those plans), "progress": {...the method's own counters...}}

A state continues only the run it came from: same method and same `config` (model identity, data, options).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpruner.errors import InputError
from dpruner.train.distributed import DistContext

FORMAT = "dpruner_run_state"


def state_path_for(output: str | Path) -> Path:
    """Where the resumable state of a run writing `output` lives (beside it; removed when the run completes)."""
    output = Path(output)
    return output.with_name(output.name + ".resume")


def make_state(method: str, config: dict, model: dict, progress: dict, plans: list | None = None) -> dict:
    """The state to save: `model` is a state_dict of the model after `plans`; `progress` the method's counters."""
    return {"format": FORMAT, "method": method, "config": config, "plans": list(plans or []), "model": model,
            "progress": progress}


def load_state(path: Path) -> dict:
    """A saved run state (weights_only); a damaged file is a user error, not a crash."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"Cannot read the saved state '{path}' ({type(exc).__name__}); delete it and run "
                         "without --resume.") from None


def read_resume(path: Path) -> dict:
    """The state `--resume` continues from: the file beside the output, which must exist and be readable."""
    if path is None or not Path(path).is_file():
        raise InputError(f"--resume was given but there is no saved state at '{path}'; run without --resume to "
                         "start over.")
    return load_state(Path(path))


def check_state(state, method: str, config: dict, progress: dict[str, type | tuple], where) -> dict:
    """`state` validated for resuming `method` with `config`; `progress` names the fields (and types) the method
    reads from state["progress"]. Returns state["progress"]. Raises InputError with one sentence otherwise."""
    name_of = f"'{where}'" if isinstance(where, Path) else str(where)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{name_of} is not a dpruner run state; delete it and run without --resume.")
    if state.get("method") != method:
        raise InputError(f"{name_of} was saved by a {state.get('method')!s} run, not {method}; run without --resume.")
    check_fields(state, {"config": dict, "plans": list, "model": dict, "progress": dict}, where)
    if state["config"] != config:
        raise InputError("--resume needs the same model, data and options as the interrupted run (they differ "
                         f"from those saved in {name_of}).")
    check_fields(state["progress"], progress, where)
    return state["progress"]


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


def remove_state(state_path: Path, ctx: DistContext = DistContext()) -> None:
    """Delete a finished run's state (rank 0 only): call it after the run's output is safely written."""
    if ctx.is_main:
        Path(state_path).unlink(missing_ok=True)
