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
from dpruner.export.verify import DEFAULT_ATOL, DEFAULT_RTOL, Verification, verify_onnx
from dpruner.io.atomic import check_not_input


@dataclass
class ExportResult:
    info: ExportInfo
    verification: Verification  # of the file that was (or would have been) written
    written: bool  # False: verification failed and the file was discarded

    def to_json(self) -> dict:
        return {"onnx": self.info.to_json(), "verification": self.verification.to_json(), "written": self.written}


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
        info = export_onnx(model, input_shape, tmp, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter)
        check_onnx(tmp)
        final = tmp
        simplifier = None
        if simplify:
            simplifier = simplify_onnx(tmp, slim)
            check_onnx(slim)
            final = slim
        verification = verify_onnx(model, final, input_shape, dynamic_batch=dynamic_batch, atol=atol, rtol=rtol,
                                   loader=loader)
        info = ExportInfo(str(output), opset, exporter, dynamic_batch, tuple(input_shape), final.stat().st_size,
                          simplify, simplifier)
        written = verification.passed or keep_on_failure
        if written:
            os.chmod(final, 0o644)
            os.replace(final, output)
        return ExportResult(info, verification, written)
    finally:
        tmp.unlink(missing_ok=True)
        slim.unlink(missing_ok=True)
