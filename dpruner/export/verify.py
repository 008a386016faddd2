"""Verification of an exported file: ONNX Runtime (CPU provider) against PyTorch on random inputs at two batch
sizes, and on real images when a loader is given."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

DEFAULT_ATOL = 1e-4  # float32 graphs: differences above this point at a wrong export, not rounding


@dataclass
class Verification:
    """max_abs_diff: max |onnx - torch| over all outputs; max_rel_diff: that difference divided by the largest
    |torch| output of the same batch (relative to the logits' scale: elementwise ratios explode near zero);
    top1_agreement: share of samples whose arg-max class agrees."""

    atol: float
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    top1_agreement: float = 1.0
    samples: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    real_data: bool = False
    provider: str = "CPUExecutionProvider"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def to_json(self) -> dict:
        return {"passed": self.passed, "atol": self.atol, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "top1_agreement": self.top1_agreement, "samples": self.samples,
                "batch_sizes": self.batch_sizes, "real_data": self.real_data, "provider": self.provider}


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session (intra-op threads as given; None: ORT's default, all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *,
                dynamic_batch: bool = True, atol: float = DEFAULT_ATOL, loader=None, max_batches: int = 4,
                seed: int = 0) -> Verification:
    """Compare torch and ONNX Runtime outputs. Random inputs at batch 1 and a larger batch (only the exported
    batch size when it is static), then up to `max_batches` batches of real data from `loader`."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    result = Verification(atol=atol)
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, max(8, input_shape[0])] if dynamic_batch else [input_shape[0]]
    batches = [torch.randn(n, *input_shape[1:], generator=gen) for n in sizes]
    result.batch_sizes = sizes
    if loader is not None:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = batch[0]
            if not dynamic_batch:
                x = x[: input_shape[0]]
                if x.shape[0] != input_shape[0]:
                    break
            batches.append(x)
            result.real_data = True
    agree = 0
    model = model.eval()
    with torch.no_grad():
        for x in batches:
            expected = model(x).float().numpy()
            got = session.run(None, {name: x.numpy().astype(np.float32)})[0]
            diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
            scale = float(np.max(np.abs(expected))) if expected.size else 1.0
            result.max_abs_diff = max(result.max_abs_diff, diff)
            result.max_rel_diff = max(result.max_rel_diff, diff / max(scale, 1e-12))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            result.samples += x.shape[0]
    result.top1_agreement = agree / max(result.samples, 1)
    return result
