"""`--target latency` vs `--target macs`, side by side in one run: resnet18, resnet50 and mobilenet_v2 at 224x224
(random weights: latency does not depend on their values), ONNX Runtime CPU, batch 1, two threads.

    .venv/bin/python bench/latency_target.py            # restartable: finished rows are skipped
    .venv/bin/python bench/latency_target.py --table

Per model and requested latency ratio R: `dpruner.prune(target="latency", ratio=R)` (round-to auto, as the CLI
defaults), its measured latency ratio, MACs ratio, prediction and table time; then the same model pruned by
`target="macs"` to the MACs ratio the latency run reached, with round-to 1 (what MACs pruning gives without
runtime knowledge) and with the same round-to, each timed the same way. Efficiency = latency ratio / MACs ratio.
Keep the machine idle while it runs: every number is a wall-clock median.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import dpruner
from dpruner.runtime.latency import LatencySpec
from dpruner.runtime.widths import auto_round_to

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "latency-target.jsonl"
MODELS = ("resnet18", "resnet50", "mobilenet_v2")
RATIOS = (1.5, 2.0)


def done() -> set:
    if not OUT.exists():
        return set()
    return {(r["model"], r["requested"]) for r in map(json.loads, OUT.read_text().splitlines())}


def row(name: str, requested: float, threads: int) -> dict:
    torch.manual_seed(0)
    original = dpruner.build_model(f"torchvision:{name}").eval()
    x = torch.randn(1, 3, 224, 224)
    spec = LatencySpec(runtime="onnxruntime", batch=1, threads=threads)
    multiple = auto_round_to(runtime="onnxruntime").multiple
    began = time.perf_counter()
    by_latency = dpruner.prune(copy.deepcopy(original), x, ratio=requested, target="latency", round_to=multiple,
                               latency=spec)
    seconds = time.perf_counter() - began
    info = by_latency.latency
    before_ms = info["before_ms"]
    out = {"model": name, "requested": requested, "threads": threads, "multiple": multiple,
           "latency": {"latency_ratio": by_latency.ratio["latency"], "macs_ratio": by_latency.ratio["macs"],
                       "after_ms": info["after_ms"], "predicted_ms": info["predicted_ms"], "before_ms": before_ms,
                       "met": by_latency.target_met, "tries": len(info["tries"]), "seconds": round(seconds, 1),
                       "table": info["table"]}}
    for label, round_to in (("macs", 1), ("macs_rounded", multiple)):
        model = copy.deepcopy(original)
        pruned = dpruner.prune(model, x, ratio=by_latency.ratio["macs"], target="macs", round_to=round_to)
        after_ms = spec.measure(model, tuple(x.shape))
        out[label] = {"round_to": round_to, "macs_ratio": pruned.ratio["macs"], "after_ms": after_ms,
                      "latency_ratio": before_ms / after_ms}
    return out


def table() -> str:
    lines = ["| model | requested | `--target latency`: measured latency x (predicted) | MACs x | eff. | "
             "table s (points) | `--target macs` round-to 1: latency x | eff. | `--target macs` round-to 16: "
             "latency x | eff. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in map(json.loads, OUT.read_text().splitlines()):
        lat, m1, m16 = r["latency"], r["macs"], r["macs_rounded"]
        predicted = lat["before_ms"] / lat["predicted_ms"]
        lines.append(
            f"| {r['model']} | {r['requested']:.1f}x | {lat['latency_ratio']:.2f}x ({predicted:.2f}x){'' if lat['met'] else ' not met'} | "
            f"{lat['macs_ratio']:.2f} | **{lat['latency_ratio'] / lat['macs_ratio']:.2f}** | "
            f"{lat['table']['seconds']:.0f} ({lat['table']['points_timed']}) | "
            f"{m1['latency_ratio']:.2f}x at {m1['macs_ratio']:.2f} MACs x | {m1['latency_ratio'] / m1['macs_ratio']:.2f} | "
            f"{m16['latency_ratio']:.2f}x at {m16['macs_ratio']:.2f} | {m16['latency_ratio'] / m16['macs_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    if not args.table:
        finished = done()
        for name in args.models:
            for requested in RATIOS:
                if (name, requested) in finished:
                    continue
                record = row(name, requested, args.threads)
                OUT.parent.mkdir(parents=True, exist_ok=True)
                with OUT.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps({k: record[k] for k in ("model", "requested")}), flush=True)
    print(table())


if __name__ == "__main__":
    main()
