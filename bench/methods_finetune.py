"""Pruning methods side by side on the pretrained CIFAR ResNet-56 with the same fine-tuning budget: dpruner's
criteria and allocations, its `--tolerance` controller, and Torch-Pruning 1.6.1's magnitude and Taylor importances,
all in one run of one script.

Protocol (every row): `--val-from test` (the test split halved by seed; decisions on the "val" half, the "test"
half reported), the original training's ImageNet normalisation, 2x MACs (tolerance rows stop where the controller
stops), BatchNorm recalibrated on 50 training batches right after pruning (the "pruned" column), then the same
fine-tuning budget for every row: `--budget-epochs` epochs over a fixed, seeded subset of `--train-subset` training
images (dpruner's loop: SGD Nesterov, cosine, label smoothing 0.1, distillation from the unpruned model, batch
128). Data criteria score on 10 training batches; sensitivity scans read 8 validation batches.

Restartable: each finished (row, seed) is one JSON line in bench/results/methods/finetune-v2.jsonl, skipped next
time. Data criteria score on 10 batches of the full training loader (as bench/methods.py does); recalibration and
fine-tuning read the subset.

    .venv-bench/bin/python bench/methods_finetune.py [--rows ...] [--seeds 0 1] [--table]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from pathlib import Path

from rows import append_row, finished as finished_rows, read_rows  # bench/rows.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPRUNER_SHARED_DATA", ROOT.parent / "shared" / "data"))
# v2: data criteria and Torch-Pruning's Taylor score on the full training loader (the one-shot table's batches);
# v1 (finetune-v1.jsonl, docs/benchmarks.md) scored them on the fine-tuning subset and per-member Taylor squares
OUT = ROOT / "bench" / "results" / "methods" / "finetune-v2.jsonl"
CHECKPOINT = "resnet56-4bfd9763.th"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# row -> how it prunes: ("dense",), ("dpruner", prune kwargs), ("tolerance", criterion), ("tp", importance),
# ("modelopt", channel divisor), ("spp" / "gate", the method's config: learned while fine-tuning within the same
# budget)
ROWS = {
    "dense": ("dense", None),
    "random": ("dpruner", {"method": "random"}),
    "l1": ("dpruner", {"method": "l1"}),
    "fpgm": ("dpruner", {"method": "fpgm"}),
    "fpgm soft": ("soft", {"criterion": "fpgm", "soft": True, "soft_every": 0.25}),
    "taylor": ("dpruner", {"method": "taylor"}),
    "activation": ("dpruner", {"method": "activation"}),
    "pca-gm": ("dpruner", {"method": "pca-gm"}),
    "l1 + sensitivity": ("dpruner", {"method": "l1", "allocation": "sensitivity"}),
    "taylor + sensitivity": ("dpruner", {"method": "taylor", "allocation": "sensitivity"}),
    "tp magnitude": ("tp", "magnitude"),
    "tp taylor": ("tp", "taylor"),
    "modelopt fastnas": ("modelopt", 8),
    "spp": ("spp", {}),  # A auto: 6/39 here (the phase holds 39 rank updates)
    "spp A=0.05": ("spp", {"A": 0.05}),  # the paper's A (the default before auto A)
    "spp A=0.2": ("spp", {"A": 0.2}),
    "coarse": ("coarse", {"candidates": 20, "eval_batches": 8}),
    # candidates judged on the stale running BatchNorm statistics (the default before --bn-statistics batch)
    "coarse running BN": ("coarse", {"candidates": 20, "eval_batches": 8, "bn_statistics": "running"}),
    # the paper's procedure: random candidates only (the default before the criterion's candidate joined the pool)
    "coarse random only": ("coarse", {"candidates": 20, "eval_batches": 8, "criterion_candidate": False,
                                      "bn_statistics": "running"}),
    "coarse kernel 0.5": ("coarse", {"granularity": "kernel", "sparsity": 0.5, "candidates": 20, "eval_batches": 8,
                                     "bn_statistics": "running"}),
    # its baseline: one random kernel mask per layer (no choice), same sparsity and retrain
    "random kernel 0.5": ("coarse", {"granularity": "kernel", "sparsity": 0.5, "candidates": 1, "eval_batches": 8}),
    # a removal every tenth of the budget in a gating phase of 40% of it (four removals), the final 60% fine-tunes
    # the plain model; logit ranking, progressive schedule; zero pull (the default until 2026-12-07: today's
    # default is the target pull, row "gate early target")
    "gate": ("gate", {"ratio": 2.0, "pull": "zero", "sparsity_weight": 2.0}),
    # the rows below ran with the gating phase the default before --gate-final 0.6 (80% of the budget, a removal
    # every fifth of it); each names what it varies
    "gate late": ("gate", {"ratio": 2.0, "prune_every": 0.2, "final_fraction": 0.2, "pull": "zero",
                           "sparsity_weight": 2.0}),
    # channels ranked by their interval mean score (the default before --gate-rank logit)
    "gate score-rank": ("gate", {"ratio": 2.0, "prune_every": 0.2, "final_fraction": 0.2, "rank": "score",
                                 "pull": "zero", "sparsity_weight": 2.0}),
    # the sparsity term pulls each group's mean score to the share of channels the goal keeps (not toward 0), so
    # the scores cannot all fall together; 20: the quadratic term is weak near the target
    "gate target pull": ("gate", {"ratio": 2.0, "prune_every": 0.2, "final_fraction": 0.2, "pull": "target",
                                  "sparsity_weight": 20.0}),
    # the target pull with today's schedule: today's defaults (pull target, weight 20)
    "gate early target": ("gate", {"ratio": 2.0, "pull": "target", "sparsity_weight": 20.0}),
    # the whole ratio forced in the last interval (the default before the progressive schedule)
    "gate last": ("gate", {"ratio": 2.0, "prune_every": 0.2, "final_fraction": 0.2, "schedule": "last",
                           "pull": "zero", "sparsity_weight": 2.0}),
    # diagnosis: no sparsity or binarisation pull (the gates only follow the task loss): what the gating costs
    "gate no pull": ("gate", {"ratio": 2.0, "prune_every": 0.2, "final_fraction": 0.2, "sparsity_weight": 0.0,
                              "pull": "zero",
                              "binary_weight": 0.0}),
    # --tolerance alone: Play-and-Prune's rate controller sets each removal's size; zero pull (the default until
    # 2026-12-07)
    "gate tolerance 1%": ("gate", {"tolerance": 0.01, "pull": "zero", "sparsity_weight": 2.0, "final_fraction": 0.6}),
    # the same with the target pull (each group's mean score pulled to the share the interval's step keeps)
    "gate tolerance 1% target": ("gate", {"tolerance": 0.01, "pull": "target", "sparsity_weight": 20.0,
                                          "final_fraction": 0.6}),
    # the same with a gating phase of 70% of the budget, as the tolerance controller's steps get: today's defaults
    "gate tolerance 1% long": ("gate", {"tolerance": 0.01, "final_fraction": 0.3, "pull": "target",
                                        "sparsity_weight": 20.0}),
    # ten times the default sparsity pull: the default (2.0, tuned on digits) barely moves ResNet-56's scores in
    # the 47 gating steps of this budget (mean score 0.95 -> 0.90), so the last interval forces the removal
    "gate sparsity 20": ("gate", {"ratio": 2.0, "prune_every": 0.2, "final_fraction": 0.2, "sparsity_weight": 20.0,
                                  "pull": "zero",
                                  "schedule": "last"}),
    "tolerance 1% l1": ("tolerance", "l1"),
    "tolerance 1% taylor": ("tolerance", "taylor"),
    # the same capped by latency measured in ONNX Runtime (batch 1, 2 threads): stops once at most 0.8x the original's
    "tolerance 1% l1 max-latency 0.8x": ("tolerance", {"criterion": "l1", "max_latency": 0.8}),
}


def subset_bundle(bundle, size: int, seed: int):
    """The same bundle with its training loader reading a fixed, seeded subset of `size` training images."""
    import torch
    from torch.utils.data import DataLoader, Subset

    dataset = bundle.train.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1000 + seed))[:size].tolist()
    loader = DataLoader(Subset(dataset, order), batch_size=bundle.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=0, drop_last=True)
    return dataclasses.replace(bundle, train=loader)


def tp_prune(model, example, kind: str, batches, goal_ratio: float = 2.0):
    """Torch-Pruning at `goal_ratio` MACs (bisection over its uniform pruning ratio). Its result runs only with the
    residual stream ignored (option-A F.pad shortcuts), so stem, every block's conv2 and the classifier are
    ignored layers: it prunes the blocks' inner channels. Taylor: GroupTaylorImportance on the gradients of
    `batches` (cross-entropy, accumulated), computed once on the original and given to each candidate copy."""
    import torch.nn.functional as F
    import torch_pruning as tp

    from dpruner.metrics import count_macs

    grads = {}
    if kind == "taylor":
        probe = copy.deepcopy(model).eval()
        for x, y in batches:
            F.cross_entropy(probe(x), y).backward()
        grads = {name: p.grad.clone() for name, p in probe.named_parameters() if p.grad is not None}

    def prune_copy(fraction: float):
        m = copy.deepcopy(model)
        ignored = [m.linear, m.conv1] + [b.conv2 for stage in (m.layer1, m.layer2, m.layer3) for b in stage]
        imp = tp.importance.MagnitudeImportance(p=2) if kind == "magnitude" else tp.importance.GroupTaylorImportance()
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=fraction, ignored_layers=ignored)
        for name, p in m.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m

    base = count_macs(model, example).total
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        ratio = base / count_macs(prune_copy(mid), example).total
        lo, hi = (lo, mid) if ratio >= goal_ratio else (mid, hi)
    return prune_copy(hi), {"fraction": hi, "torch_pruning": tp.__version__}


def modelopt_prune(model, example, data, divisor: int, goal_ratio: float = 2.0):
    """NVIDIA ModelOpt's FastNAS at 1/goal_ratio of the FLOPs: its per-layer sensitivity scan and search score
    candidates by top-1 on 8 batches of the decision ("val") half, the budget dpruner's sensitivity scans get, and
    recalibrate BatchNorm on 20 training batches per candidate (the bench recalibrates the result on 50, as for
    every row). Channel divisor `divisor` (its default 32 cannot reach 2x on these
    16-64 channel layers). Like Torch-Pruning, it leaves the option-A (F.pad) residual stream whole."""
    import tempfile

    import modelopt
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.fastnas import FastNASConfig

    from dpruner.train.evaluate import evaluate

    probe = [b for _, b in zip(range(8), data.val)]
    config = FastNASConfig()
    config["nn.Conv2d"]["*"]["channel_divisor"] = divisor
    config["nn.BatchNorm2d"]["*"]["feature_divisor"] = divisor
    with tempfile.TemporaryDirectory() as tmp:
        pruned, _ = mtp.prune(model, mode=[("fastnas", config)],
                              constraints={"flops": f"{100 / goal_ratio:g}%"}, dummy_input=example,
                              config={"data_loader": data.train, "max_iter_data_loader": 20,
                                      "score_func": lambda m: evaluate(m, probe).accuracy,
                                      "checkpoint": f"{tmp}/search.pth", "verbose": False})
    return pruned, {"channel_divisor": divisor, "modelopt": modelopt.__version__}


def run_row(row: str, seed: int, args) -> dict:
    import torch

    import dpruner
    from dpruner.data.loaders import load_data
    from dpruner.metrics import count_macs, count_params
    from dpruner.train.config import TrainConfig
    from dpruner.train.evaluate import evaluate, recalibrate_bn
    from dpruner.train.loop import fit

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    spec = f"imagefolder:{SHARED / 'cifar10-jpeg'}"
    full = load_data(spec, batch_size=128, seed=seed, val_from="test", mean=IMAGENET[0], std=IMAGENET[1])
    data = subset_bundle(full, args.train_subset, seed)
    original = dpruner.load_model(SHARED / "cifar-resnet" / CHECKPOINT, arch="dpruner.zoo:resnet56").eval()
    example = torch.randn(1, 3, 32, 32)
    kind, spec_row = ROWS[row]
    config = TrainConfig(epochs=args.budget_epochs, seed=seed, quiet=True)
    extra: dict = {}
    start = time.perf_counter()
    fine_tune_s = None
    if kind == "tolerance":
        from dpruner.methods.tolerance import ToleranceConfig, prune_to_tolerance

        options = {"criterion": spec_row} if isinstance(spec_row, str) else dict(spec_row)
        if "max_latency" in options:
            from dpruner.runtime.latency import LatencySpec

            options["latency"] = LatencySpec(runtime="onnxruntime", batch=1, threads=2)
        controller = ToleranceConfig(tolerance=0.01, budget_epochs=args.budget_epochs,
                                     step_epochs=args.budget_epochs / 10, **options)
        result = prune_to_tolerance(original, example, data, controller, config)
        model = result.model
        extra = {"steps": len(result.history), "met": result.met, "epochs_used": result.epochs_used}
        if "max_latency" in options:  # the measured latency ratio of the last accepted step, and why it stopped
            accepted = [h for h in result.history if h.get("accepted") and "ratio_latency" in h]
            extra["latency"] = {"ratio": accepted[-1]["ratio_latency"] if accepted else 1.0,
                                "stopped": [h["reason"] for h in result.history if h.get("action") == "stop"]}
        prune_s = time.perf_counter() - start
        pruned_acc = None  # the controller interleaves pruning and fine-tuning
    elif kind == "soft":
        from dpruner.methods.run import OneShotConfig, run

        result = run("one-shot", original, example, OneShotConfig(ratio=2.0, seed=seed, **spec_row), data=data,
                     train=config)
        model = result.model
        extra = {"soft": result.details["soft"], "target_met": result.target_met}
        prune_s = time.perf_counter() - start
        pruned_acc = None  # channels are re-chosen while fine-tuning
    elif kind == "coarse" and spec_row.get("granularity") == "kernel":
        from dpruner.methods.coarse import CoarseConfig
        from dpruner.methods.run import run

        # zeroed kernels must stay zero while retraining, so the method retrains (KernelMasks) within the budget
        result = run("coarse", original, example, CoarseConfig(seed=seed, **spec_row), data=data, train=config)
        model = result.model
        extra = {"coarse": {k: v for k, v in result.details["coarse"].items() if k != "layers"},
                 "target_met": result.target_met}
        prune_s = time.perf_counter() - start
        pruned_acc = None  # retrained inside the method
    elif kind == "coarse":
        from dpruner.methods.coarse import CoarseConfig
        from dpruner.methods.run import run

        result = run("coarse", original, example, CoarseConfig(ratio=2.0, seed=seed, **spec_row), data=data,
                     train=None)  # pruned here; the bench recalibrates and fine-tunes it like every other row
        model = result.model
        extra = {"coarse": result.details["coarse"], "target_met": result.target_met}
        prune_s = time.perf_counter() - start
        recalibrate_bn(model, data.train, batches=50)
        pruned_acc = {"val": evaluate(model, data.val).accuracy, "test": evaluate(model, data.test).accuracy}
        began = time.perf_counter()
        fit(model, data, config, teacher=copy.deepcopy(original).eval(), description="fine-tune")
        fine_tune_s = time.perf_counter() - began
    elif kind == "gate":
        from dpruner.methods.gate import GateConfig
        from dpruner.methods.run import run

        # prune_every is a share of the budget (0.2: every fifth of it), so a longer budget keeps the schedule's shape
        # (without it, the method's default: a tenth of the budget)
        if "prune_every" in spec_row:
            spec_row = {**spec_row, "prune_every": spec_row["prune_every"] * args.budget_epochs}
        result = run("gate", original, example, GateConfig(seed=seed, **spec_row), data=data, train=config)
        model = result.model
        extra = {"gate": result.details["gate"], "target_met": result.target_met,
                 "steps": [{k: h.get(k) for k in ("removed", "forced", "action", "mean_score")} for h in result.history]}
        prune_s = time.perf_counter() - start
        pruned_acc = None  # gates decide while fine-tuning
    elif kind == "spp":
        from dpruner.methods.run import run
        from dpruner.methods.spp import SPPConfig

        result = run("spp", original, example, SPPConfig(ratio=2.0, seed=seed, **spec_row), data=data, train=config)
        model = result.model
        extra = {"spp": result.details["spp"], "target_met": result.target_met}
        prune_s = time.perf_counter() - start
        pruned_acc = None  # masks are learned while fine-tuning
    else:
        model = copy.deepcopy(original)
        if kind == "dpruner":
            result = dpruner.prune(model, example, ratio=2.0, seed=seed, data=full.train, val_data=data.val,
                                   data_key=f"bench|{spec}|seed={seed}|subset={args.train_subset}", **spec_row)
            extra = {"target_met": result.target_met, **({"sensitivity": result.sensitivity}
                                                         if result.sensitivity else {})}
        elif kind == "tp":
            batches = [b for _, b in zip(range(10), full.train)]
            model, extra = tp_prune(model, example, spec_row, batches)
        elif kind == "modelopt":
            model, extra = modelopt_prune(model, example, data, spec_row)
        prune_s = time.perf_counter() - start
        recalibrate_bn(model, data.train, batches=50)
        pruned_acc = {"val": evaluate(model, data.val).accuracy, "test": evaluate(model, data.test).accuracy}
        began = time.perf_counter()
        fit(model, data, config, teacher=copy.deepcopy(original).eval(), description="fine-tune")
        fine_tune_s = time.perf_counter() - began
    macs0, params0 = count_macs(original, example).total, count_params(original)
    return {
        "row": row, "seed": seed, "ratio": {"macs": macs0 / count_macs(model, example).total,
                                            "params": params0 / count_params(model)},
        "pruned": pruned_acc, "val": evaluate(model, data.val).accuracy, "test": evaluate(model, data.test).accuracy,
        "prune_s": round(prune_s, 1), "fine_tune_s": None if fine_tune_s is None else round(fine_tune_s, 1),
        "wall_s": round(time.perf_counter() - start, 1), "budget_epochs": args.budget_epochs,
        "train_subset": args.train_subset, **extra,
    }


def table(path: Path) -> str:
    rows = read_rows(path)
    lines = ["| row | MACs x | params x | test after pruning (BN recal.) | test after fine-tuning | val after "
             "fine-tuning | wall time (prune + fine-tune) |", "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        found = sorted((r for r in rows if r["row"] == name), key=lambda r: r["seed"])
        if not found:
            continue

        def cell(values):
            return " / ".join("-" if v is None else f"{100 * v:.1f}" for v in values)

        sparsity = (found[0].get("coarse") or {}).get("kernel_sparsity")
        label = name if sparsity is None else f"{name} (kernel sparsity {sparsity:.2f}, not in MACs x)"
        lines.append(f"| {label} | {found[0]['ratio']['macs']:.2f} | {found[0]['ratio']['params']:.2f} | "
                     f"{cell([r['pruned']['test'] if r['pruned'] else None for r in found])} | "
                     f"{cell([r['test'] for r in found])} | {cell([r['val'] for r in found])} | "
                     + " / ".join(f"{r['wall_s'] / 60:.1f} min" for r in found) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget-epochs", type=float, default=1.0)
    parser.add_argument("--train-subset", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="only print the Markdown table of finished rows")
    args = parser.parse_args()
    if not args.table:
        if not (SHARED / "cifar10-jpeg").is_dir():
            raise SystemExit(f"no data at {SHARED}: set DPRUNER_SHARED_DATA")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        finished = finished_rows(args.out, ("row", "seed"))
        for seed in args.seeds:
            for row in args.rows:
                if (row, seed) in finished:
                    continue
                record = run_row(row, seed, args)
                append_row(args.out, record)
                print(f"{row:<22} seed {seed}: {record['ratio']['macs']:.2f}x MACs, test {record['test']:.2%} "
                      f"(pruned {record['pruned']['test'] if record['pruned'] else float('nan'):.2%}), "
                      f"{record['wall_s']:.0f} s", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
