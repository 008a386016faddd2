"""Cached layer inputs vs whole-network forwards for `--method coarse`'s candidate judging, side by side in one run
on the pretrained CIFAR ResNet-56: for every group coarse visits (input to output), the same random candidate
masks are judged with and without `Prefix` on the same in-memory validation batches; prints each mode's total
time, the speedup, and the largest difference in any candidate's error or loss (must be ~0).

    .venv-bench/bin/python bench/coarse_prefix.py [--candidates 4] [--eval-batches 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("DPRUNER_SHARED_DATA", ROOT.parent / "shared" / "data"))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def main() -> None:
    import numpy as np
    import torch

    import dpruner
    from dpruner.data.loaders import load_data
    from dpruner.graph.summary import analyze_groups
    from dpruner.methods.coarse import Masking, changed_modules, group_order, judge
    from dpruner.methods.prefix import Prefix

    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (SHARED / "cifar10-jpeg").is_dir():
        raise SystemExit(f"no data at {SHARED}: set DPRUNER_SHARED_DATA")
    torch.set_num_threads(args.threads)
    data = load_data(f"imagefolder:{SHARED / 'cifar10-jpeg'}", batch_size=128, seed=0, val_from="test",
                     mean=IMAGENET[0], std=IMAGENET[1])
    batches = [b for _, b in zip(range(args.eval_batches), data.val)]
    model = dpruner.load_model(SHARED / "cifar-resnet" / "resnet56-4bfd9763.th", arch="dpruner.zoo:resnet56").eval()
    example = torch.randn(1, 3, 32, 32)
    graph, index = analyze_groups(model, example)
    prefix = Prefix(model, batches[0][0])
    masking = Masking(model, graph, index)
    rng = np.random.default_rng(0)
    times = {"whole network": 0.0, "cached inputs": 0.0}
    worst, groups = 0.0, 0
    for group in group_order(model, graph, index):
        if not group.prunable:
            continue
        positions = np.searchsorted(index.roots, np.asarray(group.channels))
        variants = []
        for _ in range(args.candidates):
            flags = np.zeros(len(index.roots), dtype=bool)
            flags[rng.choice(positions, size=len(positions) // 2, replace=False)] = True
            variants.append(flags)
        every = np.zeros(len(index.roots), dtype=bool)
        every[positions] = True
        changed = changed_modules(graph, index, every)
        results = {}
        for mode, use in (("whole network", None), ("cached inputs", prefix)):
            start = time.perf_counter()
            results[mode] = judge(model, batches, variants, masking.apply, masking.undo, changed, use, bn_batch=True)
            times[mode] += time.perf_counter() - start
        worst = max(worst, float(np.abs(np.asarray(results["whole network"]) -
                                        np.asarray(results["cached inputs"])).max()))
        groups += 1
    print(f"ResNet-56, {groups} groups x {args.candidates} candidates x {args.eval_batches} batches of 128, "
          f"{args.threads} threads, torch {torch.__version__}")
    for mode, seconds in times.items():
        print(f"  {mode}: {seconds:.1f} s")
    print(f"  speedup: {times['whole network'] / times['cached inputs']:.2f}x; "
          f"largest error/loss difference: {worst:.2e}")


if __name__ == "__main__":
    main()
