"""How long `dpruner --help` takes, side by side with `python -c "import torch"` (what a non-lazy CLI would pay).

Run: python bench/cli_startup.py [--runs 10]. Prints medians and their ratio; the target is --help under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache once
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    helper = median_seconds([sys.executable, "-m", "dpruner", "--help"], args.runs)
    torch_import = median_seconds([sys.executable, "-c", "import torch"], args.runs)
    print(f"dpruner --help      median {helper:.3f} s over {args.runs} runs")
    print(f"python -c 'import torch'  median {torch_import:.3f} s over {args.runs} runs")
    print(f"ratio help/import-torch: {helper / torch_import:.2f}; target --help < 1 s: {'met' if helper < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
