"""Peak memory of one forward pass, measured in a fresh process: on Linux the kernel's peak-RSS mark is reset
just before the forward (`echo 5 > /proc/self/clear_refs`), and the result is the peak resident set during the
forward (VmHWM) minus the resident set just before it (VmRSS): activations, workspaces and allocator growth, with
the weights already resident. Where the reset is unavailable, ru_maxrss growth is used (a lower bound, 0 when
loading peaked higher). PyTorch's allocator statistics exist only for CUDA, hence the process-level measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

_CHILD = r"""
import json, resource, sys
sys.path.extend(json.loads(sys.argv[5]))  # after the standard library and site-packages: nothing can shadow them
import numpy as np
runtime, path, shape, threads = sys.argv[1], sys.argv[2], [int(v) for v in sys.argv[3].split(",")], int(sys.argv[4])
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
def mark():
    if reset_peak():
        return status("VmRSS"), lambda: status("VmHWM")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return start, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if runtime == "torch":
    import torch
    torch.set_num_threads(threads)
    model = torch.load(path, weights_only=False).eval()  # our own temporary file, written by the parent
    x = torch.randn(*shape)
    before, peak = mark()
    with torch.inference_mode():
        model(x)
else:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before, peak = mark()
    session.run(None, {session.get_inputs()[0].name: x})
print(json.dumps({"before": before, "after": peak()}))
"""


def child_command(code: str, *args: str) -> list[str]:
    """`python -I -c CODE ARGS`: isolated mode ignores PYTHON* variables and keeps the working folder off sys.path,
    so a numpy.py or json.py lying where the user runs dpruner is never imported by a child dpruner starts."""
    return [sys.executable, "-I", "-c", code, *args]


def extra_paths() -> list[str]:
    """The parent's import folders a child may need (e.g. dpruner from a source tree), minus the working folder."""
    here = os.path.realpath(os.getcwd())
    return [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) != here]


def forward_peak_bytes(runtime: str, model: nn.Module | None, onnx_path: str | Path | None,
                       input_shape: tuple[int, ...], batch: int, threads: int) -> int | None:
    """Peak extra resident bytes of the first forward at `batch` in a fresh process ('torch' or 'onnxruntime');
    None when the probe cannot run (e.g. a model class the fresh process cannot import)."""
    with tempfile.TemporaryDirectory(prefix="dpruner-memory-") as tmp:
        if runtime == "torch":
            path = Path(tmp) / "model.pt"
            try:
                torch.save(model, path)
            except Exception:  # e.g. a model holding a lambda: the probe cannot run, the report shows '-'
                return None
        else:
            path = Path(onnx_path).resolve()
        shape = ",".join(str(v) for v in (batch, *input_shape[1:]))
        try:
            proc = subprocess.run(child_command(_CHILD, runtime, str(path), shape, str(threads),
                                                json.dumps(extra_paths())),
                                  capture_output=True, text=True, timeout=600, cwd=tmp)
        except subprocess.TimeoutExpired:
            return None
    if proc.returncode:
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return max(0, result["after"] - result["before"])
