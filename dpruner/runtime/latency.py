"""`--target latency`: a per-layer latency table measured in the deployment runtime, used by the planner like the
MACs cost model, and the end-to-end measurement that confirms (and corrects) its prediction.

Each convolution and linear layer the planner can resize is timed alone, in the chosen runtime, at a grid of
(input, output) widths: multiples of the runtime's channel block (`widths.auto_round_to`), so the table sees the
steps a blocked layout makes. Layers of the same configuration (kernel, stride, widths, input size) are timed once.
Between grid points the latency is interpolated bilinearly. What the layers do not account for (pooling, adds,
layout reorders, per-op dispatch) is a fixed share: the whole model's measured latency minus the sum of its layers
at full width (negative when the per-call overhead of timing layers alone outweighs the rest). Tables are cached by model structure, runtime version, CPU, threads and batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)  # widths timed per layer, as shares of its full width
TABLE_VERSION = 1

# A timer: (module, input shape with the batch) -> milliseconds. Injected by tests; by default the runtime's.
Timer = Callable[[nn.Module, tuple[int, ...]], float]


@dataclass(frozen=True)
class LatencySpec:
    """Where latency is measured: the runtime (onnxruntime or torch, on this CPU), batch and intra-op threads."""

    runtime: str = "onnxruntime"
    batch: int = 1
    threads: int | None = None  # None: all cores this process may use
    timer: Timer | None = None  # None: measure in `runtime` (tests inject a fake)
    cache: bool = True
    multiple: int | None = None  # the runtime's channel block; None: widths.auto_round_to for `runtime` here

    def block(self) -> int:
        if self.multiple is not None:
            return self.multiple
        from dpruner.runtime.widths import auto_round_to

        return auto_round_to(runtime=self.runtime).multiple

    def resolved_threads(self) -> int:
        from dpruner.report.latency import default_threads

        return self.threads or default_threads()

    def measure(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        """Median latency in ms of `module` on a batch of `self.batch` inputs of `input_shape[1:]`."""
        shape = (self.batch, *input_shape[1:])
        if self.timer is not None:
            return float(self.timer(module, shape))
        return measure_ms(module, shape, self.runtime, self.resolved_threads())


def measure_ms(module: nn.Module, shape: tuple[int, ...], runtime: str, threads: int, *,
               min_seconds: float = 1.0) -> float:
    """Median ms of one forward in ONNX Runtime (an in-memory export) or eager PyTorch."""
    from dpruner.report.latency import time_fn

    module = module.eval().cpu()
    x = torch.randn(*shape)
    if runtime == "torch":
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return time_fn(lambda: module(x), min_seconds=min_seconds)[0]
        finally:
            torch.set_num_threads(saved)
    import onnxruntime as ort

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["input"], opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return time_fn(lambda: session.run(None, feed), min_seconds=min_seconds)[0]


def _layer_timer(spec: LatencySpec) -> Callable[[nn.Module, tuple[int, ...]], float]:
    """Single layers are timed with a shorter stability window (0.2 s) than whole models: there are hundreds."""
    if spec.timer is not None:
        return lambda module, shape: float(spec.timer(module, (spec.batch, *shape[1:])))
    return lambda module, shape: measure_ms(module, (spec.batch, *shape[1:]), spec.runtime,
                                            spec.resolved_threads(), min_seconds=0.2)


@dataclass
class LayerTable:
    grid_in: np.ndarray  # input widths timed (ascending)
    grid_out: np.ndarray  # output widths timed (ascending); a depthwise layer has one axis (grid_out = grid_in)
    ms: np.ndarray  # (len(grid_in), len(grid_out)), or (len(grid_in),) for depthwise
    depthwise: bool = False
    multiple: int = 1  # the runtime's channel block: a width is computed as if padded up to a multiple of it

    def predict(self, kin: float, kout: float) -> float:
        # a blocked runtime computes whole blocks: 41 channels cost what 48 do (capped at the layer's full width)
        kin = min(math.ceil(kin / self.multiple) * self.multiple, self.grid_in[-1])
        kout = min(math.ceil(kout / self.multiple) * self.multiple, self.grid_out[-1])
        if self.depthwise:
            return float(np.interp(kout, self.grid_in, self.ms))
        # bilinear on the grid (np.interp per axis; outside the grid the edge value)
        along_out = np.array([np.interp(kout, self.grid_out, row) for row in self.ms])
        return float(np.interp(kin, self.grid_in, along_out))


@dataclass
class LatencyTable:
    """Per resizable layer, its latency over widths; `fixed_ms` is the rest of the model."""

    layers: dict[str, LayerTable]
    full_ms: float  # the whole model as measured
    fixed_ms: float
    runtime: str
    batch: int
    threads: int
    info: dict = field(default_factory=dict)  # unique layers, points timed, seconds, cached

    def predict(self, widths: dict[str, tuple[float, float]]) -> float:
        """Latency for the given (kept in, kept out) widths of the table's layers (others at full width)."""
        total = self.fixed_ms
        for name, table in self.layers.items():
            kin, kout = widths.get(name, (table.grid_in[-1], table.grid_out[-1]))
            total += table.predict(kin, kout)
        return total


def _grid(full: int, multiple: int) -> np.ndarray:
    values = {min(full, max(multiple, int(np.ceil(full * f / multiple)) * multiple)) for f in GRID_FRACTIONS}
    values.add(full)
    return np.array(sorted(values), dtype=float)


def _layer_configs(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """Per layer: (kind, in, out, kernel, stride, padding, dilation, groups, bias, input spatial shape)."""
    shapes: dict[str, tuple] = {}
    hooks = []
    modules = dict(model.named_modules())
    def record(name):
        def hook(module, inputs, output):  # returns None: a forward hook's return value would replace the output
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    configs = {}
    for name in names:
        m = modules[name]
        if name not in shapes:
            continue
        if isinstance(m, nn.Conv2d):
            configs[name] = ("conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                             m.dilation, m.groups, m.bias is not None, shapes[name][1:])
        elif isinstance(m, nn.Linear):
            configs[name] = ("linear", m.in_features, m.out_features, (), (), (), (), 1, m.bias is not None,
                             shapes[name][:-1])
    return configs


def _build_layer(config: tuple, kin: int, kout: int) -> tuple[nn.Module, tuple[int, ...]]:
    kind, _, _, kernel, stride, padding, dilation, groups, bias, spatial = config
    if kind == "linear":
        return nn.Linear(kin, kout, bias=bias), (1, *spatial, kin)
    if groups > 1:  # depthwise: channels in = out = groups
        return (nn.Conv2d(kout, kout, kernel, stride, padding, dilation, groups=kout, bias=bias),
                (1, kout, *spatial))
    return nn.Conv2d(kin, kout, kernel, stride, padding, dilation, bias=bias), (1, kin, *spatial)


def _cache_key(configs: dict, spec: LatencySpec, multiple: int) -> str:
    import onnxruntime

    from dpruner.runtime.widths import cpu_features

    cpu = platform.processor() or platform.machine()
    payload = json.dumps({"v": TABLE_VERSION, "layers": sorted(set(map(repr, configs.values()))),
                          "runtime": spec.runtime, "batch": spec.batch, "threads": spec.resolved_threads(),
                          "multiple": multiple, "torch": torch.__version__, "ort": onnxruntime.__version__,
                          "cpu": cpu, "features": sorted(cpu_features())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("DPRUNER_CACHE_DIR", Path.home() / ".cache" / "dpruner")) / "latency"


def build_latency_table(model: nn.Module, example: torch.Tensor, names: list[str], spec: LatencySpec,
                        multiple: int | None = None, full_ms: float | None = None, log=None) -> LatencyTable:
    """Time every layer in `names` (conv2d / linear) alone over a grid of widths (multiples of `multiple`), once per
    distinct configuration; cache the per-configuration timings on disk (not with an injected timer)."""
    began = time.perf_counter()
    multiple = multiple or spec.block()
    configs = _layer_configs(model, example, names)
    full = full_ms if full_ms is not None else spec.measure(model, tuple(example.shape))
    key = _cache_key(configs, spec, multiple) if spec.timer is None and spec.cache else None
    path = _cache_dir() / f"{key}.json" if key else None
    timed: dict[str, list] = {}
    cached = False
    if path is not None and path.exists():
        try:
            timed = json.loads(path.read_text())
            cached = True
        except (OSError, ValueError):
            timed = {}
    timer = _layer_timer(spec)
    points = 0
    unique: dict[tuple, LayerTable] = {}
    for name, config in configs.items():
        if config in unique:
            continue
        _, cin, cout, *_rest = config
        depthwise = config[0] == "conv2d" and config[7] > 1
        if depthwise and not (config[7] == cin == cout):
            continue  # a grouped (not depthwise) conv: left to the fixed share
        grid_in, grid_out = _grid(cin, multiple), _grid(cout, multiple)
        slot = repr(config)
        if slot in timed:
            values = np.array(timed[slot])
        else:
            if log is not None and not unique:
                log(f"timing layers in {spec.runtime} (batch {spec.batch}) for the latency table")
            if depthwise:
                values = np.array([timer(*_build_layer(config, int(c), int(c))) for c in grid_out])
            else:
                values = np.array([[timer(*_build_layer(config, int(i), int(o))) for o in grid_out]
                                   for i in grid_in])
            points += values.size
            timed[slot] = values.tolist()
        unique[config] = LayerTable(grid_out if depthwise else grid_in, grid_out, values, depthwise, multiple)
    layers = {name: unique[config] for name, config in configs.items() if config in unique}
    if path is not None and points:
        from dpruner.io.atomic import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(timed).encode())
    at_full = sum(t.predict(t.grid_in[-1], t.grid_out[-1]) for t in layers.values())
    # the fixed share may be negative: every layer timed alone pays a call overhead the whole model pays once
    return LatencyTable(layers, full, full - at_full, spec.runtime, spec.batch, spec.resolved_threads(),
                        info={"layers": len(layers), "unique_layers": len(unique), "points_timed": points,
                              "cached": cached and points == 0, "seconds": round(time.perf_counter() - began, 1),
                              "layers_ms_at_full_width": at_full, "fixed_ms": full - at_full,
                              "multiple": multiple})
