"""Verification of an exported file against PyTorch on random inputs at two batch sizes, and on real images when a
loader is given: an ONNX file in ONNX Runtime (CPU provider), or a torch.export program (.pt2) loaded back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

DEFAULT_ATOL = 1e-4  # float32 graphs: differences above this point at a wrong export, not rounding
DEFAULT_RTOL = 1e-4  # ... relative to each output's magnitude: large logits (random inception_v3) round further


@dataclass
class Verification:
    """max_abs_diff: max |onnx - torch| over all outputs, where both are finite; max_rel_diff: that difference
    divided by the largest finite |torch| output of the same batch (relative to the logits' scale: elementwise ratios
    explode near zero); top1_agreement: share of samples whose arg-max class agrees. Non-finite values (NaN, inf)
    pass only when both runtimes produce exactly the same ones at the same places: `nonfinite` says which side had
    them and `nonfinite_agree` whether they matched."""

    atol: float
    rtol: float = DEFAULT_RTOL
    held: str = "abs"  # which rule held: 'abs' (every |d| <= atol) or 'abs+rel' (|d| <= atol + rtol * max|torch|)
    within: bool = True  # every element met |d| <= atol + rtol * max|torch| of its output and batch
    outputs: list = field(default_factory=list)  # per output: name, shape, max_abs_diff, max_rel_diff, top1
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    top1_agreement: float = 1.0
    samples: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    real_data: bool = False
    provider: str = "CPUExecutionProvider"
    nonfinite: dict = field(default_factory=dict)  # non-finite counts per side: torch and `runtime`
    runtime: str = "onnxruntime"  # what runs the exported file: onnxruntime, or torch.export for a .pt2 program
    nonfinite_agree: bool = True
    mismatch: str | None = None  # outputs of different number or shape
    partial: list = field(default_factory=list)  # outputs whose length depends on the values, compared on common rows

    def __post_init__(self):
        self.nonfinite = {"torch": 0, self.runtime: 0, **self.nonfinite}

    @property
    def runtime_name(self) -> str:
        return {"onnxruntime": "ONNX Runtime", "torch.export": "the exported program"}.get(self.runtime, self.runtime)

    @property
    def passed(self) -> bool:
        return self.within and self.nonfinite_agree and self.mismatch is None

    def failure(self) -> str | None:
        """Why verification failed, as a sentence fragment; None when it passed."""
        if self.mismatch is not None:
            return self.mismatch
        if not self.nonfinite_agree:
            n_torch, n_ort = self.nonfinite["torch"], self.nonfinite[self.runtime]
            if n_torch and n_ort:
                return (f"both runtimes produce non-finite outputs (NaN/inf: PyTorch {n_torch}, {self.runtime_name} "
                        f"{n_ort}) but not the same ones")
            side = "PyTorch" if n_torch else self.runtime_name
            return (f"{side} produces {n_torch or n_ort} non-finite outputs (NaN/inf) where the other runtime does "
                    "not (a NaN/inf weight or an overflow?)")
        if not self.within:
            return (f"{self.runtime_name}'s outputs differ from PyTorch's by up to {self.max_abs_diff:.3g} (more than --atol "
                    f"{self.atol:g} + --rtol {self.rtol:g} x the output's largest value)")
        return None

    def to_json(self) -> dict:
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol, "held": self.held if self.passed else None,
                "outputs": self.outputs, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "top1_agreement": self.top1_agreement, "samples": self.samples,
                "batch_sizes": self.batch_sizes, "real_data": self.real_data, "provider": self.provider,
                "nonfinite": dict(self.nonfinite), "nonfinite_agree": self.nonfinite_agree,
                "mismatch": self.mismatch, "partial": self.partial, "failure": self.failure(),
                "runtime": self.runtime}


def flatten_outputs(value) -> list:
    """A model's outputs as a flat list of tensors/arrays in the order ONNX export writes them (dicts by value)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in flatten_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in flatten_outputs(v)]
    return [value]


def compare_outputs(expected: np.ndarray, got: np.ndarray, result: Verification) -> tuple[float, float]:
    """Fold one output pair into `result`: differences over the places where both are finite (each must satisfy
    |d| <= atol + rtol * max|torch|: float32 round-off grows with the largest values an output accumulates, so the
    relative part is taken against the output's scale, not elementwise, where values near zero would fail), and the
    non-finite places, which must coincide exactly (NaN with NaN, +inf with +inf). Returns this pair's (max abs,
    max rel) difference."""
    bad_e, bad_g = ~np.isfinite(expected), ~np.isfinite(got)
    result.nonfinite["torch"] += int(bad_e.sum())
    result.nonfinite[result.runtime] += int(bad_g.sum())
    if bad_e.any() or bad_g.any():
        same = np.array_equal(bad_e, bad_g) and np.array_equal(expected[bad_e], got[bad_g], equal_nan=True)
        result.nonfinite_agree = result.nonfinite_agree and bool(same)
    finite = ~(bad_e | bad_g)
    if not finite.any():
        return 0.0, 0.0
    want = expected[finite].astype(np.float64)
    delta = np.abs(got[finite].astype(np.float64) - want)
    diff = float(delta.max())
    scale = float(np.abs(want).max())
    rel = diff / max(scale, 1e-12)
    result.max_abs_diff = max(result.max_abs_diff, diff)
    result.max_rel_diff = max(result.max_rel_diff, rel)
    if diff > result.atol:
        result.held = "abs+rel"
        result.within = result.within and diff <= result.atol + result.rtol * scale
    return diff, rel


ROW_MATCH_MIN = 0.95  # share of a detector's rows that must find their twin in the other runtime
MAX_MATCHED_ROWS = 2000


def _row_groups(outputs: list, got_all: list, batch: int) -> list[list[int]]:
    """Runs of consecutive outputs with the same first dim, not the batch, in PyTorch and in ONNX Runtime (a
    detector's boxes, scores and labels of one image): rows whose count and order depend on the values."""
    groups: list[list[int]] = []
    for i, (e, g) in enumerate(zip(outputs, got_all)):
        if e.ndim == 0 or g.ndim == 0 or e.shape[0] == batch or e.shape[1:] != g.shape[1:]:
            continue
        if groups and groups[-1][-1] == i - 1 and outputs[i - 1].shape[0] == e.shape[0] \
                and got_all[i - 1].shape[0] == g.shape[0]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _same_rows(outputs, got_all, group, result) -> bool:
    """True when the group's outputs agree position by position (then they are compared as usual)."""
    for i in group:
        e, g = outputs[i], got_all[i]
        if e.shape != g.shape or not np.array_equal(np.isfinite(e), np.isfinite(g)):
            return False
        finite = np.isfinite(e)
        if finite.any():
            delta = np.abs(e[finite].astype(np.float64) - g[finite])
            if delta.max() > result.atol + result.rtol * np.abs(e[finite]).max():
                return False
    return True


def _compare_row_sets(expected: list, got: list, names: list[str], result: Verification) -> None:
    """Compare a detector's outputs as sets of rows: near-tied scores let the runtimes order the boxes
    differently, or put one more over a threshold. Each row (its values across the group's outputs side by side)
    must find a row of the other runtime within atol + rtol x that output's largest value; the share of rows
    matched over the larger count must reach ROW_MATCH_MIN."""
    def table(parts):
        return np.concatenate([p.reshape(len(p), -1)[:MAX_MATCHED_ROWS].astype(np.float64) for p in parts], 1)

    want, have = table(expected), table(got)
    tol = np.concatenate([np.full(int(np.prod(p.shape[1:], dtype=np.int64)),
                                  result.atol + result.rtol * (np.abs(p).max() if p.size else 0.0)) for p in expected])
    n = max(len(want), len(have))
    if not len(want) or not len(have):
        share, worst = (1.0 if n == 0 else 0.0), 0.0
    else:
        delta = np.nan_to_num(np.abs(have[:, None, :] - want[None, :, :]), nan=np.inf)
        closest = (delta / tol).max(-1)  # (rows of ONNX Runtime, rows of PyTorch), in tolerance units
        best = closest.argmin(1)
        ok = closest[np.arange(len(have)), best] <= 1
        share = float(ok.sum()) / n
        worst = float(delta[np.arange(len(have)), best].max(-1)[ok].max()) if ok.any() else 0.0
    result.max_abs_diff = max(result.max_abs_diff, worst)
    label = ", ".join(names)
    result.partial.append(f"{label}: {share:.1%} of {n} rows matched as sets (PyTorch {len(expected[0])} rows, "
                          f"{result.runtime_name} {len(got[0])}; their order and count depend on near-tied scores)")
    if share < ROW_MATCH_MIN:
        result.mismatch = (f"only {share:.1%} of the rows of {label} match between PyTorch and {result.runtime_name} "
                           f"(at least {ROW_MATCH_MIN:.0%} required)")


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session (intra-op threads as given; None: ORT's default, all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: a failed run raises, the caller words it
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *,
                dynamic_batch: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, loader=None,
                max_batches: int = 4, seed: int = 0) -> Verification:
    """Compare torch and ONNX Runtime on every output (tensor, tuple, list or dict of tensors). Random inputs at
    batch 1 and a larger batch (only the exported batch size when it is static), then up to `max_batches` batches
    of real data from `loader`. top1_agreement is the share of arg-max positions (over dim 1: classes, or
    per pixel for a segmentation map) that agree, per output and for the first output overall. An output whose
    first dim is not the batch and differs between the runtimes (a detector's boxes above a threshold) is compared
    with its neighbours of the same length as a set of rows (_compare_row_sets), and `partial` says so."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return verify_runner(model, lambda x: session.run(None, {name: x.numpy().astype(np.float32)}), names,
                         input_shape, dynamic_batch=dynamic_batch, atol=atol, rtol=rtol, loader=loader,
                         max_batches=max_batches, seed=seed)


def verify_program(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *,
                   dynamic_batch: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, loader=None,
                   max_batches: int = 4, seed: int = 0) -> Verification:
    """verify_onnx's comparison for a torch.export program file: loaded back with torch.export.load (what a user
    without dpruner does) and run on the same inputs."""
    from dpruner.export.onnx import output_names

    program = torch.export.load(str(path)).module()

    def run(x):
        return [o.detach().float().numpy() for o in flatten_outputs(program(x)) if isinstance(o, torch.Tensor)]

    with torch.no_grad():
        names = output_names(model.eval()(torch.randn(1 if dynamic_batch else input_shape[0], *input_shape[1:])))
    return verify_runner(model, run, names, input_shape, dynamic_batch=dynamic_batch, atol=atol, rtol=rtol,
                         loader=loader, max_batches=max_batches, seed=seed, runtime="torch.export",
                         provider="torch.export.load (CPU)")


def verify_runner(model: nn.Module, run, names: list[str], input_shape: tuple[int, ...], *, dynamic_batch: bool,
                  atol: float, rtol: float, loader, max_batches: int, seed: int, runtime: str = "onnxruntime",
                  provider: str = "CPUExecutionProvider") -> Verification:
    """The comparison behind verify_onnx and verify_program: `run(x)` returns the exported file's outputs (numpy,
    flattened in export order) for a torch batch `x`."""
    result = Verification(atol=atol, rtol=rtol, runtime=runtime, provider=provider)
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
    per: dict[int, dict] = {}
    model = model.eval()
    with torch.no_grad():
        for x in batches:
            outputs = [o.float().numpy() for o in flatten_outputs(model(x)) if isinstance(o, torch.Tensor)]
            got_all = run(x)
            if len(outputs) != len(got_all):
                result.mismatch = (f"PyTorch returns {len(outputs)} outputs and {result.runtime_name} "
                                   f"{len(got_all)}")
            row_groups = _row_groups(outputs, got_all, x.shape[0])
            matched_rows = {i for group in row_groups for i in group if not _same_rows(outputs, got_all, group, result)}
            for group in row_groups:
                if set(group) <= matched_rows:
                    _compare_row_sets([outputs[i] for i in group], [got_all[i] for i in group],
                                      [names[i] if i < len(names) else f"output_{i}" for i in group], result)
            for i, (expected, got) in enumerate(zip(outputs, got_all)):
                entry = per.setdefault(i, {"name": names[i] if i < len(names) else f"output_{i}",
                                           "shape": list(expected.shape[1:]), "max_abs_diff": 0.0,
                                           "max_rel_diff": 0.0, "agree": 0, "positions": 0})
                if i in matched_rows:
                    continue  # compared as a set of rows above
                if expected.shape != got.shape:
                    result.mismatch = (f"output '{entry['name']}' has shape {list(expected.shape)} in PyTorch "
                                       f"and {list(got.shape)} in {result.runtime_name}")
                    continue
                diff, rel = compare_outputs(expected, got, result)
                entry["max_abs_diff"], entry["max_rel_diff"] = max(entry["max_abs_diff"], diff), max(entry["max_rel_diff"], rel)
                if expected.ndim >= 2 and expected.shape[1] > 1 and expected.size:
                    same = np.nan_to_num(got).argmax(1) == np.nan_to_num(expected).argmax(1)
                    entry["agree"] += int(same.sum())
                    entry["positions"] += int(same.size)
            result.samples += x.shape[0]
    result.outputs = [{"name": e["name"], "shape": e["shape"], "max_abs_diff": e["max_abs_diff"],
                       "max_rel_diff": e["max_rel_diff"],
                       "top1_agreement": e["agree"] / e["positions"] if e["positions"] else None}
                      for _, e in sorted(per.items())]
    first = result.outputs[0]["top1_agreement"] if result.outputs else None
    result.top1_agreement = 1.0 if first is None else first
    return result
