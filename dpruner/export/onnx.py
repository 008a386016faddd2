"""`torch.onnx.export` with dpruner's defaults, written atomically, plus optional simplification (onnxslim).

Default exporter: the TorchScript-based one (`dynamo=False`), opset 17. It handles every model the engine produces
(including the GraphModules that replace blocks whose F.pad was rewritten) and needs nothing beyond torch and onnx;
`exporter="dynamo"` selects torch.export's exporter (needs onnxscript) where a user prefers it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpruner.errors import UnsupportedError

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class ExportInfo:
    """What was written and how (recorded in reports so a deployment knows what it runs)."""

    path: str
    opset: int
    exporter: str
    dynamic_batch: bool
    input_shape: tuple[int, ...]
    file_bytes: int
    simplified: bool = False
    simplifier: str | None = None
    note: str = ""  # why the file differs from what was asked (e.g. a static batch for a model that fixes it)

    def to_json(self) -> dict:
        return {"path": self.path, "opset": self.opset, "exporter": self.exporter,
                "dynamic_batch": self.dynamic_batch, "input_shape": list(self.input_shape),
                "file_bytes": self.file_bytes, "simplified": self.simplified, "simplifier": self.simplifier,
                "note": self.note}




def check_export_options(*, opset: int, exporter: str) -> None:
    """Refuse an unknown exporter or an opset outside what the exporters write, before any work."""
    if exporter not in EXPORTERS:
        raise UnsupportedError(f"Unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}.")
    try:  # torch's own bounds (a private module: fall back to those of torch 2.6-2.14)
        from torch.onnx import _constants as known

        low = known.ONNX_MIN_OPSET
        high = known.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET if exporter == "torchscript" else known.ONNX_MAX_OPSET
    except (ImportError, AttributeError):
        low, high = 7, 20
    if not low <= opset <= high:
        raise UnsupportedError(f"--opset must be from {low} to {high} with the {exporter} exporter, got {opset}.")


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, exporter: str = "torchscript") -> ExportInfo:
    """Export `model` (eval mode) for inputs of `input_shape` (N,C,H,W; N is dynamic unless dynamic_batch=False).
    Writes `path` directly: callers pass a temporary path and rename it once the file is verified."""
    check_export_options(opset=opset, exporter=exporter)
    model = model.eval()
    example = torch.randn(*input_shape)
    with torch.no_grad():
        names = output_names(model(example))
    kwargs = dict(input_names=["input"], output_names=names, opset_version=opset)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                axes = {name: {0: "batch"} for name in ["input", *names]} if dynamic_batch else None
                torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
            else:
                shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
                torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=shapes,
                                  external_data=False, verbose=False, **kwargs)
    except Exception as exc:  # the exporter's failures are about the model: say which op, without a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"torch.onnx.export ({exporter}, opset {opset}) failed: {first[:300]}") from None
    return ExportInfo(str(path), opset, exporter, dynamic_batch, tuple(input_shape), Path(path).stat().st_size)


def output_names(outputs) -> list[str]:
    """ONNX names for a model's outputs in export order: 'logits' for one tensor, the keys of a dict (segmentation
    models return {'out': ..., 'aux': ...}), 'output_i' for the items of a tuple or list."""
    from dpruner.export.verify import flatten_outputs

    if isinstance(outputs, torch.Tensor):
        return ["logits"]
    if isinstance(outputs, dict) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return [str(k) for k in outputs]
    return [f"output_{i}" for i, _ in enumerate(flatten_outputs(outputs))]


def check_onnx(path: str | os.PathLike) -> None:
    """onnx.checker on the file (full check, shapes inferred)."""
    import onnx

    from dpruner.errors import VerificationError

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"onnx.checker rejected the exported file: {str(exc).splitlines()[0][:300]}") from None


def simplify_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Constant folding, dead-node and redundant-op removal with onnxslim; returns the simplifier's name+version."""
    import onnx
    import onnxslim

    model = onnxslim.slim(onnx.load(str(src)))
    onnx.save(model, str(dst))
    return f"onnxslim {onnxslim.__version__}"
