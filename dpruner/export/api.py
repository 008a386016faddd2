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
from dpruner.export.int8 import Int8Check, Int8Settings
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


@dataclass
class Int8Result:
    """`export --int8`: the float export's verification against PyTorch, the quantization settings, the int8
    file's check against the float file, and whether the int8 file was written."""

    float_result: ExportResult  # the float ONNX (a temporary file) verified against PyTorch
    info: ExportInfo  # the int8 file
    settings: "Int8Settings"
    check: "Int8Check | None"  # None when the float export already failed
    written: bool

    @property
    def passed(self) -> bool:
        return self.float_result.verification.passed and self.check is not None and self.check.passed

    def to_json(self) -> dict:
        return {"settings": self.settings.to_json() if self.settings else None,
                "check": self.check.to_json() if self.check else None, "written": self.written}


def export_int8(model: nn.Module, input_shape: tuple[int, ...], output: str | os.PathLike, *, calib_loader,
                eval_loader, eval_split: str = "test", calib_batches: int = 8, max_drop: float = 0.01,
                inputs: Iterable = (), opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                exporter: str = "torchscript", atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                keep_on_failure: bool = False) -> Int8Result:
    """Export float ONNX (verified against PyTorch as usual), quantize it statically to int8 (QDQ, per-channel)
    calibrated on `calib_batches` batches of `calib_loader`, and check the int8 file against the float one on
    `eval_loader` (top-1 drop at most `max_drop`). Only the int8 file is written, atomically, when both pass."""
    from dpruner.export.int8 import calibration_batches, check_int8, quantize_onnx

    output = Path(output)
    check_not_input(output, inputs)
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir() or not folder.is_dir():
        from dpruner.errors import InputError

        raise InputError(f"Cannot write '{output}': give a file name in an existing folder.")
    calib = calibration_batches(calib_loader, calib_batches)
    with tempfile.TemporaryDirectory(prefix="dpruner-int8-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        float_result = export_model(model, input_shape, float_path, opset=opset, dynamic_batch=dynamic_batch,
                                    exporter=exporter, atol=atol, rtol=rtol, loader=eval_loader)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp.onnx", dir=folder)
        os.close(fd)
        int8_tmp = Path(tmp_name)
        try:
            if not float_result.written:
                return Int8Result(float_result, float_result.info, None, None, False)
            settings = quantize_onnx(float_path, int8_tmp, calib)
            check = check_int8(float_path, int8_tmp, eval_loader, eval_split, max_drop)
            info = ExportInfo(str(output), opset, exporter, float_result.info.dynamic_batch, tuple(input_shape),
                              int8_tmp.stat().st_size, note=float_result.info.note)
            written = check.passed or keep_on_failure
            if written:
                os.chmod(int8_tmp, 0o644)
                os.replace(int8_tmp, output)
            return Int8Result(float_result, info, settings, check, written)
        finally:
            int8_tmp.unlink(missing_ok=True)
