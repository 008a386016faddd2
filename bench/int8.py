"""INT8 after pruning on the pretrained CIFAR ResNet-56 (CIFAR-10 JPEG copy): float vs INT8 top-1, file size and
ONNX Runtime latency for the dense and the pruned model, through `dpruner export --int8` itself.

    .venv/bin/python bench/int8.py            # restartable: finished steps are skipped
    .venv/bin/python bench/int8.py --table    # print the table from bench/results/int8/

The pruned models: `l1` uniform to 2x MACs, and to 3x fewer parameters (for the disk-size goal), BatchNorm
recalibrated, then 1 epoch of fine-tuning over a seeded 10,000-image subset of the training split with distillation
(the methods benchmark's budget, bench/methods_finetune.py), decisions on half of the test split (`--val-from test`);
saved as a dpruner checkpoint under bench-out/ (not committed). Each model is then exported twice by the CLI:
float ONNX, and `--int8` (calibrated on 8 training batches, checked on the other half of the test split).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SHARED = Path(os.environ.get("DPRUNER_SHARED_DATA", ROOT.parent / "shared" / "data"))
CHECKPOINT = SHARED / "cifar-resnet" / "resnet56-4bfd9763.th"
OUT = ROOT / "bench" / "results" / "int8"
MODELS = ROOT / "bench-out" / "int8"
IMAGENET = ("0.485,0.456,0.406", "0.229,0.224,0.225")
DATA = ["--data", f"imagefolder:{SHARED / 'cifar10-jpeg'}", "--val-from", "test", "--mean", IMAGENET[0], "--std",
        IMAGENET[1], "--batch-size", "128"]
ARCH = ["--arch", "dpruner.zoo:resnet56", "--num-classes", "10", "--input-shape", "3,32,32"]


VARIANTS = {"pruned": ("resnet56-l1-2x.pt", 2.0, "macs"), "pruned-params3x": ("resnet56-l1-3xparams.pt", 3.0, "params")}


def pruned_model(name: str = "pruned", seed: int = 0) -> Path:
    """Prune + fine-tune once (skipped when the checkpoint exists)."""
    filename, ratio, target = VARIANTS[name]
    path = MODELS / filename
    if path.exists():
        return path
    import torch

    import dpruner
    from dpruner.data.loaders import load_data
    from dpruner.io.dpruner_format import save_checkpoint
    from dpruner.train.config import TrainConfig
    from dpruner.train.evaluate import recalibrate_bn
    from dpruner.train.loop import fit
    from methods_finetune import subset_bundle

    torch.manual_seed(seed)
    full = load_data(f"imagefolder:{SHARED / 'cifar10-jpeg'}", batch_size=128, seed=seed, val_from="test",
                     mean=tuple(map(float, IMAGENET[0].split(","))), std=tuple(map(float, IMAGENET[1].split(","))))
    data = subset_bundle(full, 10000, seed)
    original = dpruner.load_model(CHECKPOINT, arch="dpruner.zoo:resnet56").eval()
    model = copy.deepcopy(original)
    result = dpruner.prune(model, torch.randn(1, 3, 32, 32), ratio=ratio, target=target, method="l1", seed=seed)
    recalibrate_bn(model, data.train, batches=50)
    fit(model, data, TrainConfig(epochs=1.0, seed=seed, quiet=True), teacher=original, description="fine-tune")
    MODELS.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.eval(), arch="dpruner.zoo:resnet56", num_classes=10, input_shape=[1, 3, 32, 32],
                    plan=[result.plan], meta={"bench": "int8", "seed": seed})
    return path


def export(name: str, model: Path, int8: bool, baseline: Path | None) -> dict:
    out = OUT / f"{name}.json"
    if out.exists():
        return json.loads(out.read_text())
    onnx = MODELS / f"{name}.onnx"
    cmd = [sys.executable, "-m", "dpruner", "export", str(model), "--onnx", str(onnx), *DATA,
           "--batches", "1,8", "--threads", "2", "--json"]
    cmd += ARCH
    cmd += ["--int8"] if int8 else []
    cmd += ["--baseline", str(baseline)] if baseline else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    doc = json.loads(proc.stdout)
    OUT.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def table() -> str:
    rows = ["| model | format | params | MACs | .onnx file | vs original .th file | ORT b1 ms | ORT b8 ms | "
            "test top-1 | int8 vs float |", "|---|---|---|---|---|---|---|---|---|---|"]
    th = CHECKPOINT.stat().st_size
    for name in ("dense", *VARIANTS):
        for fmt in ("float", "int8"):
            path = OUT / f"{name}-{fmt}.json"
            if not path.exists():
                continue
            doc = json.loads(path.read_text())
            side = doc["int8"]["model"] if fmt == "int8" else doc["after"]
            lat = side["latency_ms"]["onnxruntime"]
            size = side["file_bytes"]["onnx"]
            acc = side["accuracy"]["test"]
            check = doc["int8"]["check"] if fmt == "int8" else None
            note = (f"{100 * check['drop']:+.2f} pt drop, agreement {100 * check['top1_agreement']:.1f}%"
                    if check else "-")
            rows.append(f"| {name} | {fmt} | {side['params'] / 1e6:.3f}M | {side['macs'] / 1e6:.1f}M | "
                        f"{size / 2**20:.2f} MiB | {th / size:.2f}x smaller | {lat['1']['median']:.2f} | "
                        f"{lat['8']['median']:.2f} | {100 * acc:.2f} | {note} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if not args.table:
        if not CHECKPOINT.exists():
            raise SystemExit(f"{CHECKPOINT} is missing: this benchmark needs ../shared/data (see its README).")
        export("dense-float", CHECKPOINT, False, None)
        export("dense-int8", CHECKPOINT, True, None)
        for name in VARIANTS:
            pruned = pruned_model(name)
            export(f"{name}-float", pruned, False, CHECKPOINT)
            export(f"{name}-int8", pruned, True, CHECKPOINT)
    print(table())


if __name__ == "__main__":
    main()
