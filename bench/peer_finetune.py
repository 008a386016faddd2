"""Torch-Pruning's magnitude pruner on the CIFAR ResNet-56, fine-tuned with exactly dpruner's recipe and budget,
for the side-by-side in docs/benchmarks.md (issue: prune to a tolerance).

    .venv-bench/bin/python bench/peer_finetune.py --ratio 2.1 --budget-epochs 4 --data imagefolder:../shared/data/cifar10-jpeg

Torch-Pruning 1.6.1 breaks this model's forward when it prunes the residual stream (the option-A F.pad
shortcuts), so its residual-stream layers (stem conv, every block's conv2) and the classifier are passed as
ignored_layers: it prunes the blocks' inner channels only, the one setting in which its result runs. The channel
fraction that reaches --ratio (MACs) is found by bisection; then the model is fine-tuned with dpruner's loop (SGD
Nesterov, cosine, label smoothing 0.1, distillation from the unpruned model), the same as `dpruner prune --ratio
--data`. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import dpruner
from dpruner.data.loaders import load_data
from dpruner.metrics import count_macs, count_params
from dpruner.train.config import TrainConfig
from dpruner.train.evaluate import evaluate
from dpruner.train.loop import fit


def tp_prune(model, x, fraction):
    import torch_pruning as tp

    ignored = [model.linear, model.conv1] + [b.conv2 for stage in (model.layer1, model.layer2, model.layer3)
                                             for b in stage]
    tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=fraction,
                         ignored_layers=ignored).step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="../shared/data/cifar-resnet/resnet56-4bfd9763.th")
    parser.add_argument("--data", default="imagefolder:../shared/data/cifar10-jpeg")
    parser.add_argument("--ratio", type=float, required=True, help="MACs ratio to reach (the tolerance run's)")
    parser.add_argument("--budget-epochs", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch_pruning

    torch.manual_seed(args.seed)
    original = dpruner.load_model(args.checkpoint, arch="dpruner.zoo:resnet56").eval()
    x = torch.randn(1, 3, 32, 32)
    base = count_macs(original, x).total
    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        ratio = base / count_macs(tp_prune(copy.deepcopy(original), x, mid), x).total
        lo, hi = (lo, mid) if ratio >= args.ratio else (mid, hi)
    pruned = tp_prune(copy.deepcopy(original), x, hi)
    reached = base / count_macs(pruned, x).total
    data = load_data(args.data, batch_size=128, workers=args.workers, seed=args.seed, image_size=32)
    config = TrainConfig(epochs=args.budget_epochs, seed=args.seed, quiet=True)
    began = time.perf_counter()
    fit(pruned, data, config, teacher=copy.deepcopy(original).eval())
    seconds = time.perf_counter() - began
    result = {
        "tool": f"torch-pruning {torch_pruning.__version__} MagnitudeImportance(p=2), residual stream ignored",
        "fraction": hi, "budget_epochs": args.budget_epochs, "fine_tune_seconds": seconds,
        "ratio": {"macs": reached, "params": count_params(original) / count_params(pruned)},
        "before": {"val": evaluate(original, data.val).accuracy, "test": evaluate(original, data.test).accuracy},
        "after": {"val": evaluate(pruned, data.val).accuracy, "test": evaluate(pruned, data.test).accuracy},
        "config": config.to_json(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
