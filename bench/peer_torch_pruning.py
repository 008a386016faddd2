"""dpruner vs Torch-Pruning (DepGraph), side by side in one run: graph + prune time at 2x MACs with L2 magnitude,
and coverage over torchvision's classification models.

    bash bench/setup.sh && .venv-bench/bin/python bench/peer_torch_pruning.py [--coverage] [--size 224]

Timing: for each model, the channel fraction that gives 2x MACs is found first for each tool (untimed), then each
tool builds its dependency graph and prunes a fresh copy at that fraction; the median of --repeats runs is reported
with the ratio dpruner/peer (< 1: dpruner faster). dpruner's full `prune(ratio=2.0)` (its own MAC search included)
is timed too. Coverage: prune at 30% channel sparsity, then run a forward pass; a tool "prunes" a model when it
removed parameters and the forward still works with the original output shape.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torchvision

import dpruner
from dpruner.graph.groups import channel_groups
from dpruner.graph.build import build_graph
from dpruner.methods.api import prune as dp_prune, score_groups
from dpruner.methods.oneshot import Allocation, select
from dpruner.metrics import count_macs
from dpruner.surgery.plan import apply_plan, make_plan

warnings.filterwarnings("ignore")
TIMED = ["resnet50", "densenet121", "mobilenet_v2", "efficientnet_b0", "regnet_y_800mf", "convnext_tiny"]


def classifier_layers(model):
    """The last Linear (the classifier): both tools must leave its outputs alone."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1:] if linears else []


def tp_prune(model, x, fraction):
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=fraction, ignored_layers=classifier_layers(model))
    pruner.step()
    return model


def dp_sparsity(model, x, fraction):
    graph = build_graph(model, x)
    index = channel_groups(graph)
    scores = score_groups(model, graph, index, "l2")
    apply_plan(model, make_plan(graph, index, index.roots[select(index, scores, Allocation(), fraction)]))
    return model


def fraction_for(tool, model, x, goal_ratio=2.0):
    """Bisection on the channel fraction so that MACs shrink by goal_ratio (untimed)."""
    base = count_macs(model, x).total
    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        macs = count_macs(tool(copy.deepcopy(model), x, mid), x).total
        lo, hi = (lo, mid) if base / macs >= goal_ratio else (mid, hi)
    return hi


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_speed(size: int, repeats: int) -> None:
    print(f"## Graph + prune time at 2x MACs, L2, input 1x3x{size}x{size}, median of {repeats}")
    print(f"{'model':<18} {'dp frac':>7} {'tp frac':>7} {'dp MACs x':>9} {'tp MACs x':>9} "
          f"{'dpruner s':>9} {'TP s':>7} {'dp/TP':>6} {'dp prune(ratio=2) s':>20}")
    for name in TIMED:
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, size, size)
        base = count_macs(model, x).total
        f_dp, f_tp = fraction_for(dp_sparsity, model, x), fraction_for(tp_prune, model, x)
        r_dp = base / count_macs(dp_sparsity(copy.deepcopy(model), x, f_dp), x).total
        r_tp = base / count_macs(tp_prune(copy.deepcopy(model), x, f_tp), x).total
        copies = [copy.deepcopy(model) for _ in range(3 * repeats)]
        t_dp = timed(lambda: dp_sparsity(copies.pop(), x, f_dp), repeats)
        t_tp = timed(lambda: tp_prune(copies.pop(), x, f_tp), repeats)
        t_full = timed(lambda: dp_prune(copies.pop(), x, ratio=2.0), repeats)
        print(f"{name:<18} {f_dp:>7.3f} {f_tp:>7.3f} {r_dp:>9.2f} {r_tp:>9.2f} {t_dp:>9.2f} {t_tp:>7.2f} "
              f"{t_dp / t_tp:>6.2f} {t_full:>20.2f}", flush=True)


def works(tool, model, x, fraction=0.3) -> tuple[bool, str]:
    with torch.no_grad():
        shape = model(x).shape
    before = sum(p.numel() for p in model.parameters())
    try:
        pruned = tool(model, x, fraction)
        with torch.no_grad():
            ok_shape = pruned(x).shape == shape
    except Exception as exc:  # the peer's failures are data here, not errors
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    after = sum(p.numel() for p in pruned.parameters())
    if not ok_shape:
        return False, "output shape changed"
    return after < before, "" if after < before else "nothing removed"


def coverage_models(max_params: float) -> list[str]:
    """The CIFAR ResNet-56 plus every torchvision classification model up to max_params parameters."""
    names = ["dpruner.zoo:resnet56"]
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                n_params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        except NotImplementedError:  # builders that compute on tensors (RegNet) cannot run on meta
            n_params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        if n_params <= max_params:
            names.append(name)
    return names


def coverage_one(name: str, tool: str) -> None:
    """Child process: prune one model with one tool and print one JSON line (ok, why)."""
    if name.startswith("dpruner.zoo:"):
        model, size = dpruner.build_model(name).eval(), 32
    else:
        model = torchvision.models.get_model(name, weights=None).eval()
        size = 299 if name.startswith("inception") else 224 if name.startswith(("vit", "swin", "maxvit")) else 128
    ok, why = works(dp_sparsity if tool == "dp" else tp_prune, model, torch.randn(1, 3, size, size))
    print(json.dumps({"ok": ok, "why": why}))


def run_isolated(name: str, tool: str, timeout: float, mem_gb: float) -> tuple[bool, str]:
    """Run coverage_one in a child with a memory cap and a time limit, so one stuck model cannot stall the sweep."""
    def limit():
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, __file__, "--one", name, "--tool", tool]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
        return False, f"crashed (exit {proc.returncode}, memory cap {mem_gb:g} GB): {tail}"
    result = json.loads(lines[-1])
    return result["ok"], result["why"]


def bench_coverage(max_params: float, timeout: float, mem_gb: float, only: list[str] | None) -> None:
    print("\n## Coverage at 30% channel sparsity (forward must still run with the same output shape)")
    print(f"each tool and model in its own process, limits: {timeout:.0f} s, {mem_gb:g} GB address space")
    both = only_dp = only_tp = neither = 0
    names = only or coverage_models(max_params)
    for name in names:
        dp_ok, dp_why = run_isolated(name, "dp", timeout, mem_gb)
        tp_ok, tp_why = run_isolated(name, "tp", timeout, mem_gb)
        both += dp_ok and tp_ok
        only_dp += dp_ok and not tp_ok
        only_tp += tp_ok and not dp_ok
        neither += not (dp_ok or tp_ok)
        print(f"{name:<24} dpruner {'ok' if dp_ok else 'FAIL ' + dp_why:<40} torch-pruning {'ok' if tp_ok else 'FAIL ' + tp_why}",
              flush=True)
    print(f"\nmodels: {len(names)}; both prune: {both}; only dpruner: {only_dp}; only Torch-Pruning: {only_tp}; "
          f"neither: {neither}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coverage", action="store_true", help="also run the coverage sweep (slow)")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--timeout", type=float, default=600, help="coverage: seconds per model and tool")
    parser.add_argument("--mem-gb", type=float, default=12, help="coverage: address-space cap per model and tool")
    parser.add_argument("--models", nargs="*", help="coverage: only these models")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=["dp", "tp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        coverage_one(args.one, args.tool)
        return
    import torch_pruning

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning {torch_pruning.__version__}, "
          f"dpruner {dpruner.__version__}, threads {torch.get_num_threads()}")
    if args.speed:
        bench_speed(args.size, args.repeats)
    if args.coverage:
        bench_coverage(args.max_params, args.timeout, args.mem_gb, args.models)


if __name__ == "__main__":
    main()
