"""`--round-to auto`: the channel multiple a runtime computes in on this hardware, so pruned widths waste none of it.

Why it matters (docs/benchmarks.md, "Runtime-aware widths"): ONNX Runtime's CPU convolutions run in a blocked
channel layout (MLAS NCHWc: blocks of 8 channels with AVX/AVX2, 16 with AVX-512F) and oneDNN, behind PyTorch's CPU
convolutions, blocks the same way (nChw8c / nChw16c); a width off the block is padded up to it, so part of the
removed work is still done. On this project's AVX-512 machine, 2x-MACs resnet18 / resnet50 / mobilenet_v2 reach
0.60 / 0.69 / 0.35 of the promised ONNX Runtime speedup at batch 1 unrounded, 0.91 / 0.91 / 0.94 with multiples of 8
and 0.95 / 0.98 / 1.02 with multiples of 16.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

RUNTIMES = ("onnxruntime", "torch", "cuda")  # CPU ONNX Runtime, CPU PyTorch, an NVIDIA GPU (PyTorch/TensorRT)
PRECISIONS = ("float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class RoundTo:
    """The multiple chosen and the one-line rule that chose it (printed and kept in the JSON)."""

    multiple: int
    reason: str

    def to_json(self) -> dict:
        return {"multiple": self.multiple, "auto": True, "reason": self.reason}


def cpu_features() -> frozenset[str]:
    """This CPU's instruction-set flags (lower case, as /proc/cpuinfo names them: avx2, avx512f, avx512_vnni, ...);
    where /proc/cpuinfo is missing, what PyTorch's dispatcher detected (AVX2 / AVX512)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    capability = torch.backends.cpu.get_cpu_capability().lower()  # 'avx2', 'avx512', 'default', 'vsx', ...
    return frozenset({"avx2", "avx512f"} if capability.startswith("avx512") else {"avx2"} if capability == "avx2"
                     else set())


def auto_round_to(*, runtime: str = "onnxruntime", precision: str = "float32",
                  features: frozenset[str] | None = None, machine: str | None = None) -> RoundTo:
    """The channel multiple for the deployment `runtime` at `precision` (the runtime the model will serve on, which
    need not be where it is pruned or fine-tuned). `features` (CPU flags) and `machine` are
    detected unless given (tests inject them)."""
    from dpruner.errors import InputError

    if runtime not in RUNTIMES:
        raise InputError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'.")
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    if runtime == "cuda":
        # NVIDIA's tensor-core rule for GEMM-backed convolutions: channel counts multiples of 8 for fp16/bf16,
        # 16 for int8, 4 for tf32 (float32 convolutions run as TF32 on Ampere and later by default in cuDNN)
        multiple = {"float16": 8, "bfloat16": 8, "int8": 16, "float32": 4}[precision]
        return RoundTo(multiple, f"CUDA tensor cores at {precision} take channels in multiples of {multiple}")
    features = cpu_features() if features is None else features
    machine = (machine or platform.machine()).lower()
    if precision == "int8":
        # ONNX Runtime's int8 GEMM packs the output channels (N) in panels of 16 (MLAS QGEMM, AVX2 and AVX-512
        # alike); oneDNN's int8 convolutions block by 16 as well
        return RoundTo(16, "int8 kernels pack output channels in panels of 16")
    if precision in ("float16", "bfloat16") and runtime == "onnxruntime":
        raise InputError(f"--precision {precision} on CPU: ONNX Runtime's CPU provider computes convolutions in "
                         "float32 or int8; choose one of those.")
    if "avx512f" in features:
        return RoundTo(16, f"{'ONNX Runtime (MLAS NCHWc)' if runtime == 'onnxruntime' else 'PyTorch (oneDNN)'} on "
                           "AVX-512F computes channels in blocks of 16")
    if {"avx2", "avx"} & features:
        return RoundTo(8, f"{'ONNX Runtime (MLAS NCHWc)' if runtime == 'onnxruntime' else 'PyTorch (oneDNN)'} on "
                          "AVX/AVX2 computes channels in blocks of 8")
    # ARM (NEON: 4 floats per register, kernels unrolled to 8 or 16) and anything unknown: 8 costs little accuracy
    # and is a multiple of every vector width in use; not measured here
    return RoundTo(8, f"no blocked layout known for {machine or 'this CPU'}; 8 is a multiple of its vector widths "
                      "(not measured)")


def parse_round_to(text: str | int) -> int | str:
    """`--round-to`: a whole number >= 1, or 'auto'."""
    from dpruner.errors import InputError

    if isinstance(text, int):
        value = text
    elif str(text).strip().lower() == "auto":
        return "auto"
    else:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise InputError(f"--round-to takes a whole number such as 8, or auto, got '{text}'.") from None
    if value < 1:
        raise InputError(f"--round-to must be at least 1, got {value}.")
    return value
