"""Facts about one model (size, MACs, latency, accuracy) and the before/after comparison built from two of them."""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from dpruner.report.latency import Latency, ort_latency, torch_latency

SCHEMA_VERSION = 1
RUNTIMES = ("torch", "onnxruntime")


@dataclass
class ModelFacts:
    source: str
    params: int
    macs: int
    pt_bytes: int | None = None
    onnx_bytes: int | None = None
    latency: dict[str, dict[int, Latency]] = field(default_factory=dict)  # runtime -> batch -> Latency
    accuracy: dict[str, float] | None = None  # split -> top-1
    memory: dict[str, dict[int, int]] = field(default_factory=dict)  # runtime -> batch -> peak RSS growth (bytes)

    def to_json(self) -> dict:
        return {
            "source": self.source, "params": self.params, "macs": self.macs,
            "file_bytes": {"pt": self.pt_bytes, "onnx": self.onnx_bytes},
            "latency_ms": {rt: {str(b): {"median": lat.median_ms, "p90": lat.p90_ms, "runs": lat.runs}
                                for b, lat in per.items()} for rt, per in self.latency.items()},
            "accuracy": self.accuracy,
            "peak_forward_bytes": {rt: {str(b): v for b, v in per.items()} for rt, per in self.memory.items()} or None,
        }


def measure_model(model: nn.Module, input_shape: tuple[int, ...], *, source: str, pt_path: str | Path | None = None,
                  onnx_path: str | Path | None = None, batches: tuple[int, ...] = (1, 8), threads: int = 1,
                  latency: bool = True, accuracy: dict[str, float] | None = None, memory: bool = False,
                  export: dict | None = None) -> ModelFacts:
    """Measure one model. Without `onnx_path` a temporary export (dynamic batch, `export` settings such as opset
    and exporter, else dpruner's defaults) is timed in ONNX Runtime and its size reported."""
    import torch

    from dpruner.export.onnx import export_onnx
    from dpruner.metrics.macs import count_macs, count_params

    model = model.eval().cpu()
    facts = ModelFacts(source, count_params(model), count_macs(model, torch.randn(1, *input_shape[1:])).total,
                       Path(pt_path).stat().st_size if pt_path else None, accuracy=accuracy)
    with tempfile.TemporaryDirectory(prefix="dpruner-report-") as tmp:
        if onnx_path is None:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(model, (1, *input_shape[1:]), onnx_path, **(export or {}))
        facts.onnx_bytes = Path(onnx_path).stat().st_size
        files = {b: _onnx_for_batch(model, onnx_path, input_shape, b, Path(tmp), export) for b in batches}
        if latency:
            facts.latency["torch"] = {b: torch_latency(model, input_shape, b, threads) for b in batches}
            facts.latency["onnxruntime"] = {b: ort_latency(files[b], input_shape, b, threads) for b in batches}
        if memory:
            from dpruner.report.memory import forward_peak_bytes

            facts.memory = {rt: {b: forward_peak_bytes(rt, model, files[b], input_shape, b, threads) for b in batches}
                            for rt in RUNTIMES}
    return facts


def measure_onnx_file(path: str | Path, input_shape: tuple[int, ...], *, source: str, params: int, macs: int,
                      batches: tuple[int, ...] = (1, 8), threads: int = 1, latency: bool = True,
                      accuracy: dict[str, float] | None = None) -> ModelFacts:
    """Facts of an ONNX file that only ONNX Runtime runs (an int8 model): size and ORT latency; params and MACs
    are those of the float model it was quantized from."""
    facts = ModelFacts(source, params, macs, None, Path(path).stat().st_size, accuracy=accuracy)
    if latency:
        facts.latency["onnxruntime"] = {b: ort_latency(path, input_shape, b, threads) for b in batches}
    return facts


def _onnx_for_batch(model: nn.Module, onnx_path: Path, input_shape: tuple[int, ...], batch: int, tmp: Path,
                    export: dict | None) -> Path:
    """`onnx_path`, or a static-batch twin when that file cannot run at `batch` in ONNX Runtime (its batch is
    static, or the model's forward loops over the images, so the traced graph fixes the batch)."""
    import numpy as np

    from dpruner.export.onnx import export_onnx
    from dpruner.export.verify import ort_session

    session = ort_session(onnx_path)  # quiet: a failure is expected here and handled
    try:
        session.run(None, {session.get_inputs()[0].name:
                           np.zeros((batch, *input_shape[1:]), dtype=np.float32)})
        return Path(onnx_path)
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors have no common public base class
        twin = tmp / f"batch{batch}.onnx"
        export_onnx(model, (batch, *input_shape[1:]), twin, **{**(export or {}), "dynamic_batch": False})
        return twin


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(before: ModelFacts, after: ModelFacts) -> dict:
    """before/after for sizes (x smaller), latency speedups, and speedup / MACs reduction (1.0: the latency gain is
    all the MACs promised; below: memory traffic, overheads or odd channel counts ate some of it)."""
    macs = _ratio(before.macs, after.macs)
    out = {"params": _ratio(before.params, after.params), "macs": macs,
           "file_bytes": {"pt": _ratio(before.pt_bytes, after.pt_bytes),
                          "onnx": _ratio(before.onnx_bytes, after.onnx_bytes)},
           "speedup": {}, "speedup_per_macs": {}}
    for runtime in RUNTIMES:
        for batch, lat in after.latency.get(runtime, {}).items():
            ref = before.latency.get(runtime, {}).get(batch)
            if ref is None:
                continue
            speedup = ref.median_ms / lat.median_ms
            out["speedup"].setdefault(runtime, {})[str(batch)] = speedup
            out["speedup_per_macs"].setdefault(runtime, {})[str(batch)] = speedup / macs if macs else None
    for runtime, per in after.memory.items():
        for batch, value in per.items():
            ref = before.memory.get(runtime, {}).get(batch)
            out.setdefault("peak_forward_bytes", {}).setdefault(runtime, {})[str(batch)] = _ratio(ref, value)
    if before.accuracy and after.accuracy:
        out["accuracy_delta"] = {k: after.accuracy[k] - before.accuracy[k] for k in after.accuracy
                                 if k in before.accuracy}
    return out


def environment(threads: int) -> dict:
    import onnxruntime
    import torch

    return {"threads": threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "processor": platform.processor() or None,
            "python": platform.python_version()}


def build_report(after: ModelFacts, before: ModelFacts | None = None, *, threads: int, onnx: dict | None = None,
                 verification: dict | None = None) -> dict:
    """The versioned JSON document (docs/report.md)."""
    return {"schema": SCHEMA_VERSION, "environment": environment(threads), "onnx": onnx,
            "verification": verification, "before": before.to_json() if before else None,
            "after": after.to_json(), "ratios": ratios(before, after) if before else None}
