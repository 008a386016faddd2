#!/usr/bin/env bash
# The methods benchmark of docs/benchmarks.md ("Pruning methods side by side"), restartable: every finished row is
# a JSON line under bench/results/methods/ and is skipped when the script runs again.
#   bash bench/setup.sh && bash bench/methods.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
# one-shot table (ResNet-20 and ResNet-56, no fine-tuning)
$PY bench/methods.py
# fine-tuned table (ResNet-56, the same budget for every row), most important rows first
$PY bench/methods_finetune.py --seeds 0 --rows dense random l1 "taylor + sensitivity" "tp magnitude" "tp taylor" \
  taylor "l1 + sensitivity" fpgm activation pca-gm "tolerance 1% l1" "tolerance 1% taylor" "modelopt fastnas"
# two more seeds for the rows the comparison rests on: dpruner's best and the peer's best
$PY bench/methods_finetune.py --seeds 1 2 --rows "l1 + sensitivity" "tp magnitude"
# methods that learn while fine-tuning (same budget), next to the random and l1 rows above
$PY bench/methods_finetune.py --seeds 0 --rows gate "gate early target" "gate late" "gate score-rank" "gate last" \
  "gate no pull" "gate tolerance 1%" "gate sparsity 20" spp "spp A=0.05" \
  "spp A=0.2" coarse "coarse running BN" "coarse random only" "coarse kernel 0.5" \
  "random kernel 0.5" "fpgm soft"
# the remaining seeds of the comparison
$PY bench/methods_finetune.py --seeds 1 2 --rows "taylor + sensitivity" "tp taylor" random l1
$PY bench/methods_finetune.py --seeds 1 --rows gate coarse
# a 3-epoch budget for random, l1 and the gate (the gates need steps to separate)
$PY bench/methods_finetune.py --seeds 0 --budget-epochs 3 --out bench/results/methods/finetune-3ep.jsonl \
  --rows random l1 gate "gate early target" "gate late" "gate target pull"
# pruning to a 1% tolerance with the same 3-epoch budget: the gate's rate controller next to Play-and-Prune's l1,
# and l1 capped by latency measured in ONNX Runtime (keep the machine idle for that row)
$PY bench/methods_finetune.py --seeds 0 --budget-epochs 3 --out bench/results/methods/finetune-3ep.jsonl \
  --rows "gate tolerance 1%" "gate tolerance 1% long" "gate tolerance 1% target" "tolerance 1% l1" \
  "tolerance 1% l1 max-latency 0.8x"
$PY bench/methods_finetune.py --seeds 1 --budget-epochs 3 --out bench/results/methods/finetune-3ep.jsonl \
  --rows random gate
