"""`dpruner.export_model`: export, check, optionally simplify, verify; the file appears (atomically) only when
verification passes, or with keep_on_failure."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from torch import nn

from dpruner.export.onnx import DEFAULT_OPSET, ExportInfo, check_onnx, export_onnx, simplify_onnx
from dpruner.export.program import ProgramInfo, export_program
from dpruner.export.verify import DEFAULT_ATOL, DEFAULT_RTOL, Verification, verify_onnx, verify_program
from dpruner.io.atomic import check_not_input


@dataclass
class ExportResult:
    info: ExportInfo | ProgramInfo
    verification: Verification  # of the file that was (or would have been) written
    written: bool  # False: verification failed and the file was discarded

    def to_json(self) -> dict:
        key = "onnx" if isinstance(self.info, ExportInfo) else "torch_export"
        return {key: self.info.to_json(), "verification": self.verification.to_json(), "written": self.written}


def _is_runtime_failure(exc: BaseException) -> bool:
    """An error raised by ONNX Runtime while running the exported graph."""
    return type(exc).__module__.startswith("onnxruntime")


def export_model(model: nn.Module, input_shape: tuple[int, ...], output: str | os.PathLike, *,
                 inputs: Iterable = (), opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                 exporter: str = "torchscript", simplify: bool = False, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL,
                 keep_on_failure: bool = False, loader=None) -> ExportResult:
    """Export `model` to ONNX at `output` and verify it in ONNX Runtime (see verify_onnx). Never overwrites an
    input; a failed verification leaves no file unless keep_on_failure."""
    output = Path(output)
    check_not_input(output, inputs)
    if output.is_dir() or not (output.parent if str(output.parent) else Path(".")).is_dir():
        from dpruner.errors import InputError

        raise InputError(f"Cannot write '{output}': give a file name in an existing folder.")
    folder = output.parent if str(output.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp.onnx", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    slim = tmp.with_suffix(".slim.onnx")
    try:
        def attempt(dynamic: bool):
            export_onnx(model, input_shape, tmp, opset=opset, dynamic_batch=dynamic, exporter=exporter)
            check_onnx(tmp)
            final, simplifier = tmp, None
            if simplify:
                simplifier = simplify_onnx(tmp, slim)
                check_onnx(slim)
                final = slim
            return final, simplifier, verify_onnx(model, final, input_shape, dynamic_batch=dynamic, atol=atol,
                                                  rtol=rtol, loader=loader)

        note = ""
        try:
            final, simplifier, verification = attempt(dynamic_batch)
        except Exception as exc:
            if not dynamic_batch or not _is_runtime_failure(exc):
                raise
            # A forward that loops over the batch in Python (torchvision's detectors: `for img in images`) is
            # recorded for the export batch only; such a graph fails at any other batch size in ONNX Runtime.
            final, simplifier, verification = attempt(False)
            dynamic_batch = False
            note = (f"exported with a static batch of {input_shape[0]}: the graph exported with a dynamic batch "
                    "fails at other batch sizes in ONNX Runtime (the model's forward fixes the batch, e.g. a loop "
                    "over images)")
        info = ExportInfo(str(output), opset, exporter, dynamic_batch, tuple(input_shape), final.stat().st_size,
                          simplify, simplifier, note)
        written = verification.passed or keep_on_failure
        if written:
            os.chmod(final, 0o644)
            os.replace(final, output)
        return ExportResult(info, verification, written)
    finally:
        tmp.unlink(missing_ok=True)
        slim.unlink(missing_ok=True)


def export_torch_program(model: nn.Module, input_shape: tuple[int, ...], output: str | os.PathLike, *,
                         inputs: Iterable = (), dynamic_batch: bool = True, atol: float = DEFAULT_ATOL,
                         rtol: float = DEFAULT_RTOL, keep_on_failure: bool = False, loader=None) -> ExportResult:
    """Export `model` as a torch.export program (.pt2) at `output`, load it back with torch.export.load and verify
    it against the model like an ONNX file. Atomic; never overwrites an input; a failed verification leaves no
    file unless keep_on_failure. A forward that fixes the batch falls back to a static batch, with a note."""
    from dpruner.errors import InputError, UnsupportedError

    output = Path(output)
    check_not_input(output, inputs)
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir() or not folder.is_dir():
        raise InputError(f"Cannot write '{output}': give a file name in an existing folder.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp.pt2", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        def attempt(dynamic: bool):
            info = export_program(model, input_shape, tmp, dynamic_batch=dynamic)
            return info, verify_program(model, tmp, input_shape, dynamic_batch=dynamic, atol=atol, rtol=rtol,
                                        loader=loader)

        try:
            info, verification = attempt(dynamic_batch)
        except UnsupportedError:
            if not dynamic_batch:
                raise
            info, verification = attempt(False)
            info = ProgramInfo(**{**info.__dict__, "note": (
                f"exported with a static batch of {input_shape[0]}: torch.export could not keep the batch dynamic "
                "(the model's forward fixes it)")})
        info = ProgramInfo(**{**info.__dict__, "path": str(output)})
        written = verification.passed or keep_on_failure
        if written:
            os.chmod(tmp, 0o644)
            os.replace(tmp, output)
        return ExportResult(info, verification, written)
    finally:
        tmp.unlink(missing_ok=True)
