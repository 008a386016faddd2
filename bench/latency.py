"""Pruned vs original latency, side by side in one run: PyTorch eager and ONNX Runtime on CPU, batch 1 and 8, for
resnet18, resnet50, mobilenet_v2 (224x224) and the CIFAR ResNet-56 (32x32) pruned to 2x MACs, with the ratio
speedup / MACs reduction (1.0 = the latency gain is everything the MACs promised).

    .venv/bin/python bench/latency.py [--threads 2] [--round-to 1 8] [--models resnet18 ...] [--int8]

--int8 adds the runtime "ort-int8": both ONNX files quantized by dpruner's INT8 export step (ONNX Runtime static
QDQ, per-channel int8 weights; calibrated on 4 random batches, since values do not change the kernels' speed).

Weights are random (latency does not depend on their values; nothing is downloaded). Each configuration prunes with
dpruner's defaults (L2, uniform allocation) plus the given --round-to, exports both models with dpruner's exporter and
times them with dpruner.report.latency (warm-up, rounds of 20 runs until the median moves < 2%).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import dpruner
from dpruner.export.onnx import export_onnx
from dpruner.metrics import count_macs
from dpruner.report.latency import default_threads, ort_latency, torch_latency

MODELS = {"resnet18": ("torchvision:resnet18", 224), "resnet50": ("torchvision:resnet50", 224),
          "mobilenet_v2": ("torchvision:mobilenet_v2", 224), "resnet56": ("dpruner.zoo:resnet56", 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--round-to", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--int8", action="store_true", help="also time INT8 (QDQ) versions in ONNX Runtime")
    parser.add_argument("--runtimes", nargs="*", default=["onnxruntime", "torch"],
                        choices=["onnxruntime", "torch"], help="float runtimes to time")
    args = parser.parse_args()
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}")
    print(f"{'model':<13} {'round':>5} {'MACs x':>7} {'runtime':<12} {'batch':>5} {'before ms':>10} {'after ms':>9} "
          f"{'speedup':>8} {'speedup/MACs':>12} {'runs':>9}")
    for name in args.models:
        arch, size = MODELS[name]
        torch.manual_seed(0)
        original = dpruner.build_model(arch).eval()
        shape = (1, 3, size, size)
        x = torch.randn(*shape)
        for round_to in args.round_to:
            pruned = copy.deepcopy(original)
            dpruner.prune(pruned, x, ratio=2.0, round_to=round_to)
            macs_ratio = count_macs(original, x).total / count_macs(pruned, x).total
            with tempfile.TemporaryDirectory() as tmp:
                paths = {}
                for label, model in (("before", original), ("after", pruned)):
                    paths[label] = Path(tmp) / f"{label}.onnx"
                    export_onnx(model, shape, paths[label])
                    if args.int8:
                        from dpruner.export.int8 import quantize_onnx

                        gen = torch.Generator().manual_seed(1)
                        calib = [torch.randn(8, *shape[1:], generator=gen).numpy() for _ in range(4)]
                        paths[f"{label}-int8"] = Path(tmp) / f"{label}-int8.onnx"
                        quantize_onnx(paths[label], paths[f"{label}-int8"], calib)
                for runtime in [*args.runtimes, *(["ort-int8"] if args.int8 else [])]:
                    for batch in args.batches:
                        if runtime == "torch":
                            before = torch_latency(original, shape, batch, args.threads)
                            after = torch_latency(pruned, shape, batch, args.threads)
                        else:
                            suffix = "-int8" if runtime == "ort-int8" else ""
                            before = ort_latency(paths["before" + suffix], shape, batch, args.threads)
                            after = ort_latency(paths["after" + suffix], shape, batch, args.threads)
                        speedup = before.median_ms / after.median_ms
                        print(f"{name:<13} {round_to:>5} {macs_ratio:>7.2f} {runtime:<12} {batch:>5} "
                              f"{before.median_ms:>10.2f} {after.median_ms:>9.2f} {speedup:>8.2f} "
                              f"{speedup / macs_ratio:>12.2f} {before.runs:>4}/{after.runs:<4}", flush=True)


if __name__ == "__main__":
    main()
