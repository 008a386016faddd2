"""Latency measurement: warm-up, then timed runs until the median is stable; median and p90 in milliseconds."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    threads: int

    def to_json(self) -> dict:
        return {"batch": self.batch, "median_ms": self.median_ms, "p90_ms": self.p90_ms, "runs": self.runs,
                "threads": self.threads}


def default_threads() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def time_fn(fn: Callable[[], object], *, warmup: int = 5, round_runs: int = 20, min_seconds: float = 1.0,
            max_seconds: float = 20.0, tolerance: float = 0.02) -> tuple[float, float, int]:
    """Run `fn` in rounds of `round_runs` until the median of all runs moved by less than `tolerance` (relative)
    in the last round and `min_seconds` have passed (or `max_seconds`). Returns (median_ms, p90_ms, runs)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    began = time.perf_counter()
    previous = None
    while True:
        for _ in range(round_runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        elapsed = time.perf_counter() - began
        stable = previous is not None and abs(median - previous) <= tolerance * previous
        if (stable and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
        previous = median
    return 1000 * median, 1000 * float(np.percentile(times, 90)), len(times)


def torch_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int, threads: int) -> Latency:
    """Eager PyTorch on CPU, eval mode, no autograd, `threads` intra-op threads (restored after)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = model.eval().cpu()
    x = torch.randn(batch, *input_shape[1:])
    try:
        with torch.inference_mode():
            median, p90, runs = time_fn(lambda: model(x))
    finally:
        torch.set_num_threads(saved)
    return Latency(batch, median, p90, runs, threads)


def ort_latency(path, input_shape: tuple[int, ...], batch: int, threads: int) -> Latency:
    """ONNX Runtime, CPU provider, `threads` intra-op threads."""
    from dpruner.export.verify import ort_session

    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape[1:])).astype(np.float32)
    median, p90, runs = time_fn(lambda: session.run(None, {name: x}))
    return Latency(batch, median, p90, runs, threads)
