"""A pruned model as a torch.export program (.pt2): the graph and weights in one file that `torch.export.load` runs
with nothing but torch installed (no dpruner, no model code), so a deployment need not carry either."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpruner.errors import UnsupportedError

MAX_BATCH = 4096  # the dynamic batch's upper bound recorded in the program (the report's own limit)


@dataclass(frozen=True)
class ProgramInfo:
    """What was written: the file, whether its batch is dynamic, the example shape, the torch that wrote it."""

    path: str
    dynamic_batch: bool
    input_shape: tuple[int, ...]
    file_bytes: int
    torch: str
    note: str = ""

    def to_json(self) -> dict:
        return {"path": self.path, "format": "torch.export", "dynamic_batch": self.dynamic_batch,
                "input_shape": list(self.input_shape), "file_bytes": self.file_bytes, "torch": self.torch,
                "note": self.note}


def export_program(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, *,
                   dynamic_batch: bool = True) -> ProgramInfo:
    """torch.export.export the eval-mode model and torch.export.save it to `path` (written directly: callers pass a
    temporary path). A dynamic batch is traced at batch 2: torch specialises sizes 0 and 1, so an example of batch
    1 would fix the batch."""
    model = model.eval()
    batch = max(2, input_shape[0]) if dynamic_batch else input_shape[0]
    example = torch.randn(batch, *input_shape[1:])
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=shapes)
        torch.export.save(program, str(path))
    except Exception as exc:  # torch.export's failures are about the model's forward: say which, briefly
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"torch.export.export failed{' with a dynamic batch' if dynamic_batch else ''}: "
                               f"{first[:300]}") from None
    return ProgramInfo(str(path), dynamic_batch, (batch, *input_shape[1:]), Path(path).stat().st_size,
                       torch.__version__)
