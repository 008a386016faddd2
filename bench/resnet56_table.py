"""Render the runs of bench/resnet56_tolerance.sh as one Markdown table (the numbers in docs/benchmarks.md).

Usage: python bench/resnet56_table.py [OUT_DIR]   (default bench-out/r56). Wall time is read from the files
themselves: a run's .err is created when it starts and its .json written when it ends.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def _minutes(out: Path, name: str) -> str:
    """Minutes from the creation of NAME.err to the last write of NAME.json (birth time: GNU `stat -c %W`)."""
    err, doc = out / f"{name}.err", out / f"{name}.json"
    try:
        began = float(subprocess.run(["stat", "-c", "%W", str(err)], capture_output=True, text=True,
                                     check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "?"
    if began <= 0:  # the file system does not record birth times
        return "?"
    return f"{(doc.stat().st_mtime - began) / 60:.0f} min"


def _k(n: float) -> str:
    return f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.1f}M"


def rows(out: Path) -> list[str]:
    """One Markdown row per finished run, after the original model's row."""
    tol, ratio, tp, dense = (_load(out, n) for n in ("tol", "ratio", "tp", "dense"))
    if tol is None:
        return ["(the tolerance run has not finished yet)"]
    b = tol["before"]
    lines = ["| run | params | MACs | validation top-1 | test top-1 | budget used | wall time |",
             "|---|---|---|---|---|---|---|",
             f"| original (as downloaded) | {_k(b['params'])} | {_k(b['macs'])} | {b['accuracy']:.2%} | "
             f"{b['test_accuracy']:.2%} | - | - |"]

    def dpruner_row(label: str, doc: dict, name: str) -> str:
        a, r = doc["after"], doc["ratio"]
        return (f"| {label} | {_k(a['params'])} ({r['params']:.2f}x) | {_k(a['macs'])} ({r['macs']:.2f}x) | "
                f"{a['accuracy']:.2%} | {a['test_accuracy']:.2%} | {doc['epochs_used']:g} epochs | "
                f"{_minutes(out, name)} |")

    lines.append(dpruner_row("(1) dpruner `--tolerance 1%`", tol, "tol"))
    if ratio is not None:
        lines.append(dpruner_row(f"(2) dpruner `--ratio {ratio['requested']['ratio']:g}x` (L2, one shot)",
                                 ratio, "ratio"))
    if tp is not None:
        r = tp["ratio"]
        params, macs = b["params"] / r["params"], b["macs"] / r["macs"]
        lines.append(f"| (3) Torch-Pruning magnitude at the same MACs | {_k(params)} ({r['params']:.2f}x) | "
                     f"{_k(macs)} ({r['macs']:.2f}x) | {tp['after']['val']:.2%} | {tp['after']['test']:.2%} | "
                     f"{tp['budget_epochs']:g} epochs | {_minutes(out, 'tp')} |")
    if dense is not None:
        a = dense["after"]
        lines.append(f"| (4) dense, fine-tuned (adapted baseline) | {_k(b['params'])} (1.00x) | {_k(b['macs'])} "
                     f"(1.00x) | {a['val']['accuracy']:.2%} | {a['test']['accuracy']:.2%} | "
                     f"{dense['train']['epochs']:g} epochs | {_minutes(out, 'dense')} |")
    gate = _load(out, "gate")
    if gate is not None:
        lines.append(dpruner_row("(5) dpruner `--method gate --tolerance 1%`", gate, "gate"))
    early = _load(out, "gate-final06")  # the same before the tolerance-only default became --gate-final 0.3
    if early is not None:
        lines.append(dpruner_row("(5') the same with `--gate-final 0.6`", early, "gate-final06"))
    return lines


if __name__ == "__main__":
    print("\n".join(rows(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/r56"))))
