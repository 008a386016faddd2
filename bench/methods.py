"""Criteria and allocations side by side on the pretrained CIFAR ResNets: one-shot pruning to 2x MACs, no
fine-tuning, BatchNorm statistics recalibrated on 50 training batches, then top-1 on held-out data.

Restartable: every finished (model, row, seed) is one JSON line in bench/results/methods/oneshot.jsonl and is
skipped on the next run. Data: ../shared/data/cifar10-jpeg with `--val-from test` (the test split halved by seed:
the "val" half is where decisions would be taken, the "test" half is reported) and the original training's
ImageNet normalisation. Criteria that need data score on 10 training batches.

    .venv/bin/python bench/methods.py [--models resnet20 resnet56] [--rows l1 taylor ...] [--seeds 0]

Fine-tuned columns (the same budget for every row) are still to come; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rows import append_row, finished as finished_rows, read_rows  # bench/rows.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPRUNER_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "results" / "methods" / "oneshot.jsonl"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# row name -> dpruner.prune arguments (ratio 2x MACs, dpruner's defaults otherwise)
ROWS = {
    "dense": None,
    "random": {"method": "random"},
    "l1": {"method": "l1"},
    "l2": {"method": "l2"},
    "fpgm": {"method": "fpgm"},
    "bn": {"method": "bn"},
    "taylor": {"method": "taylor"},
    "activation": {"method": "activation"},
    "pca-gm": {"method": "pca-gm"},
    "l1 + pca widths": {"method": "l1", "allocation": "pca"},
    "taylor global": {"method": "taylor", "allocation": "global"},
}


def run_row(model_name: str, row: str, seed: int, recal_batches: int) -> dict:
    import torch

    import dpruner
    from dpruner.data.loaders import load_data
    from dpruner.train.evaluate import evaluate, recalibrate_bn

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_data(f"imagefolder:{SHARED / 'cifar10-jpeg'}", batch_size=128, seed=seed, val_from="test",
                     mean=IMAGENET[0], std=IMAGENET[1])
    model = dpruner.load_model(SHARED / "cifar-resnet" / CHECKPOINTS[model_name], arch=f"dpruner.zoo:{model_name}")
    start = time.perf_counter()
    ratio = {"macs": 1.0, "params": 1.0}
    if ROWS[row] is not None:
        result = dpruner.prune(model, torch.randn(1, 3, 32, 32), ratio=2.0, seed=seed, data=data.train, **ROWS[row])
        ratio = result.ratio
    prune_s = time.perf_counter() - start
    recalibrate_bn(model, data.train, batches=recal_batches)
    val, test = evaluate(model, data.val), evaluate(model, data.test)
    return {"model": model_name, "row": row, "seed": seed, "ratio": ratio, "val": val.accuracy,
            "test": test.accuracy, "prune_s": round(prune_s, 1), "recal_batches": recal_batches}


def table(path: Path) -> str:
    rows = read_rows(path)
    models = sorted({r["model"] for r in rows})
    lines = ["| criterion / allocation | " + " | ".join(f"{m} MACs x | {m} test (val) top-1" for m in models) + " |",
             "|---|" + "---|---|" * len(models)]
    for row in ROWS:
        cells = []
        for m in models:
            found = [r for r in rows if r["model"] == m and r["row"] == row]
            if not found:
                cells += ["-", "-"]
                continue
            tests = [r["test"] for r in found]
            vals = [r["val"] for r in found]
            cells += [f"{found[0]['ratio']['macs']:.2f}",
                      " / ".join(f"{100 * t:.1f}" for t in tests) + " (" + " / ".join(f"{100 * v:.1f}" for v in vals)
                      + ")"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recal-batches", type=int, default=50)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="only print the Markdown table of finished rows")
    args = parser.parse_args()
    if not args.table:
        if not (SHARED / "cifar10-jpeg").is_dir():
            raise SystemExit(f"no data at {SHARED}: set DPRUNER_SHARED_DATA")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        finished = finished_rows(args.out, ("model", "row", "seed"))
        for seed in args.seeds:
            for model_name in args.models:
                for row in args.rows:
                    if (model_name, row, seed) in finished:
                        continue
                    record = run_row(model_name, row, seed, args.recal_batches)
                    append_row(args.out, record)
                    print(f"{model_name:<9} {row:<16} seed {seed}: {record['ratio']['macs']:.2f}x MACs, "
                          f"test {record['test']:.2%}, val {record['val']:.2%} ({record['prune_s']} s)", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
