"""Trace `--soft` on ResNet-56 with the methods benchmark's settings (bench/methods_finetune.py, row "fpgm soft" or
the same with another criterion): validation top-1 on 8 batches before and after every round's zeroing, after the
final choice is removed, after BatchNorm recalibration, and the final test/val top-1. Prints; writes nothing.

    .venv-bench/bin/python bench/soft_trace.py [fpgm|l1|...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import methods_finetune as mf

    from dpruner.methods import soft
    from dpruner.train import api as train_api
    from dpruner.train.evaluate import evaluate

    criterion = sys.argv[1] if len(sys.argv) > 1 else "fpgm"
    state: dict = {}

    def accuracy(model) -> float:
        was = model.training
        model.eval()
        value = evaluate(model, [b for _, b in zip(range(8), state["data"].val)]).accuracy
        model.train(was)
        return round(value, 3)

    zero = soft.SoftZeroing.zero

    def traced_zero(self, model, final=False):
        before = accuracy(model)
        zero(self, model, final)
        print(f"round {self.rounds}{' (final)' if final else ''}: val before zeroing {before}, after {accuracy(model)}",
              flush=True)

    recalibrate = train_api.recalibrate

    def traced_recalibrate(model, data, env, **kw):
        print(f"removed: val {accuracy(model)}", flush=True)
        recalibrate(model, data, env, **kw)
        print(f"BatchNorm recalibrated: val {accuracy(model)}", flush=True)

    subset = mf.subset_bundle

    def kept_subset(bundle, size, seed):
        state["data"] = subset(bundle, size, seed)
        return state["data"]

    soft.SoftZeroing.zero = traced_zero
    train_api.recalibrate = traced_recalibrate
    mf.subset_bundle = kept_subset
    args = type("Args", (), {"train_subset": 10_000, "budget_epochs": 1.0})()
    mf.ROWS["trace"] = ("soft", {"criterion": criterion, "soft": True, "soft_every": 0.25})
    row = mf.run_row("trace", 0, args)
    print(json.dumps({"test": row["test"], "val": row["val"]}))


if __name__ == "__main__":
    main()
