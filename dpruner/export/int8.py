"""INT8 after pruning: ONNX Runtime's static quantization of the exported float model (QDQ format, per-channel int8
weights, uint8 activations calibrated with MinMax on training batches), then a check against the float model on
held-out images: quantization error is judged by what it does to predictions (top-1 agreement, accuracy drop), not
by an absolute difference, which int8 rounding always exceeds."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CALIB_BATCHES = 8
DEFAULT_MAX_DROP = 0.01  # top-1 points (as a fraction) the int8 model may lose against the float one


@dataclass
class Int8Check:
    """The int8 model against the float model it was quantized from, on the same images."""

    split: str
    samples: int
    float_accuracy: float
    int8_accuracy: float
    agreement: float  # share of images whose arg-max class is the same in both
    max_drop: float

    @property
    def drop(self) -> float:
        return self.float_accuracy - self.int8_accuracy

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop + 1e-12

    def failure(self) -> str | None:
        if self.passed:
            return None
        return (f"the int8 model's top-1 on the {self.split} split is {100 * self.int8_accuracy:.2f}% against "
                f"{100 * self.float_accuracy:.2f}% in float32, a drop of {100 * self.drop:.2f} points (more than "
                f"--int8-tolerance {100 * self.max_drop:g} points; top-1 agreement {100 * self.agreement:.2f}%)")

    def to_json(self) -> dict:
        return {"passed": self.passed, "split": self.split, "samples": self.samples,
                "float_accuracy": self.float_accuracy, "int8_accuracy": self.int8_accuracy, "drop": self.drop,
                "top1_agreement": self.agreement, "max_drop": self.max_drop, "failure": self.failure()}


@dataclass
class Int8Settings:
    calib_batches: int
    calib_samples: int
    format: str = "QDQ"
    weights: str = "int8, per channel"
    activations: str = "uint8, per tensor, MinMax calibration"
    onnxruntime: str = ""
    preprocessed: bool = False  # onnxruntime's quant_pre_process (shape inference + graph optimisation) ran first

    def to_json(self) -> dict:
        return dict(self.__dict__)


def calibration_batches(loader, batches: int) -> list[np.ndarray]:
    """The first `batches` input batches of `loader` as float32 arrays (decoded once, reused by the calibrator)."""
    from dpruner.train.evaluate import _batches

    out = []
    for i, (x, _) in enumerate(_batches(loader, "calibration")):
        if i >= batches:
            break
        out.append(x.numpy().astype(np.float32))
    return out


def quantize_onnx(float_path: str | os.PathLike, int8_path: str | os.PathLike, calib: list[np.ndarray]) -> Int8Settings:
    """onnxruntime.quantization.quantize_static in QDQ format, per-channel weights, calibrated on `calib`."""
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from dpruner.errors import UnsupportedError

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.items = iter([{name: x} for x in calib])

        def get_next(self):
            return next(self.items, None)

    from dpruner.export.verify import ort_session

    name = ort_session(float_path).get_inputs()[0].name
    source, preprocessed = Path(float_path), False
    with tempfile.TemporaryDirectory(prefix="dpruner-int8-") as tmp:
        try:  # shape inference + ORT's graph optimisation first, as ORT's quantization guide recommends
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
            source, preprocessed = pre, True
        except Exception:  # noqa: BLE001 - optional step; quantizing the plain export is still correct
            source = Path(float_path)
        try:
            quantize_static(str(source), str(int8_path), Reader(name), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(f"ONNX Runtime's static quantization failed: {first[:300]}") from None
    return Int8Settings(calib_batches=len(calib), calib_samples=sum(len(x) for x in calib),
                        onnxruntime=onnxruntime.__version__, preprocessed=preprocessed)


def onnx_top1(path: str | os.PathLike, loader, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max predictions of an ONNX classifier over a loader, and the labels."""
    from dpruner.export.verify import ort_session
    from dpruner.train.evaluate import _batches

    session = ort_session(path)
    name = session.get_inputs()[0].name
    preds, labels = [], []
    for x, y in _batches(loader, split):
        logits = session.run(None, {name: x.numpy().astype(np.float32)})[0]
        preds.append(logits.reshape(len(x), -1).argmax(1))
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def check_int8(float_path, int8_path, loader, split: str, max_drop: float = DEFAULT_MAX_DROP) -> Int8Check:
    """Run both ONNX files over the same split: accuracy of each and the share of agreeing predictions."""
    float_pred, labels = onnx_top1(float_path, loader, split)
    int8_pred, _ = onnx_top1(int8_path, loader, split)
    n = max(len(labels), 1)
    return Int8Check(split=split, samples=len(labels), float_accuracy=float((float_pred == labels).sum()) / n,
                     int8_accuracy=float((int8_pred == labels).sum()) / n,
                     agreement=float((float_pred == int8_pred).sum()) / n, max_drop=max_drop)


def parse_drop(text: str) -> float:
    """`--int8-tolerance`: '1%' or '1' (points) or '0.01' -> 0.01; 0 is allowed (no loss at all)."""
    from dpruner.errors import InputError

    cleaned = str(text).strip()
    try:
        value = float(cleaned.rstrip("%").removesuffix("pt").strip())
    except ValueError:
        raise InputError(f"--int8-tolerance must look like 1% or 0.01, got '{text}'.") from None
    if cleaned.endswith(("%", "pt")) or value >= 1:
        value /= 100
    if not 0 <= value < 1:
        raise InputError(f"--int8-tolerance must lie from 0% up to (not including) 100%, got '{text}'.")
    return value
