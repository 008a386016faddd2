#!/usr/bin/env bash
# Issue evidence: the pretrained CIFAR ResNet-56 on the lossy CIFAR-10 JPEG copy in ../shared/data, four runs with
# the same fine-tuning budget (BUDGET epochs, SGD lr 0.01 Nesterov, cosine, label smoothing 0.1, batch 128, seed 0):
#   1. dpruner prune --tolerance 1%            (Play-and-Prune; distillation from the original)
#   2. dpruner prune --ratio R --data          (R = the MACs ratio run 1 reached; one-shot L2, then fine-tune)
#   3. Torch-Pruning magnitude pruner at R     (bench/peer_finetune.py; same loop, budget and distillation)
#   4. dpruner finetune of the dense model      (the adapted baseline the data's README asks for)
#   5. dpruner prune --method gate --tolerance 1%  (D-Pruner's scorers, Play-and-Prune's rate controller; added later)
# Usage: bash bench/resnet56_tolerance.sh [OUT_DIR] [BUDGET]; results as JSON in OUT_DIR (default bench-out/r56).
# On a 2-core CPU, BUDGET=4 took 37-44 min per run (2 h 40 min for all four) on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out/r56}
BUDGET=${2:-4}
SHARED=${DPRUNER_SHARED_DATA:-../shared/data}
CK=$SHARED/cifar-resnet/resnet56-4bfd9763.th
DATA=imagefolder:$SHARED/cifar10-jpeg
PY=${PYTHON:-.venv/bin/python}
COMMON=(--arch dpruner.zoo:resnet56 --input-shape 3,32,32 --data "$DATA" --workers 1 --seed 0)
mkdir -p "$OUT"
set -x
[ -s "$OUT/tol.json" ] || "$PY" -m dpruner prune "$CK" "${COMMON[@]}" --tolerance 1% --budget-epochs "$BUDGET" \
  --step-epochs 0.5 -o "$OUT/tol.pt" --json > "$OUT/tol.json" 2> "$OUT/tol.err"
R=$("$PY" -c "import json,sys; print(round(json.load(open(sys.argv[1]))['ratio']['macs'], 2))" "$OUT/tol.json")
[ -s "$OUT/ratio.json" ] || "$PY" -m dpruner prune "$CK" "${COMMON[@]}" --ratio "${R}x" --budget-epochs "$BUDGET" \
  -o "$OUT/ratio.pt" --json > "$OUT/ratio.json" 2> "$OUT/ratio.err"
[ -s "$OUT/tp.json" ] || .venv-bench/bin/python bench/peer_finetune.py --checkpoint "$CK" --data "$DATA" \
  --ratio "$R" --budget-epochs "$BUDGET" > "$OUT/tp.json" 2> "$OUT/tp.err"
[ -s "$OUT/dense.json" ] || "$PY" -m dpruner finetune "$CK" "${COMMON[@]}" --epochs "$BUDGET" \
  -o "$OUT/dense.pt" --json > "$OUT/dense.json" 2> "$OUT/dense.err"
[ -s "$OUT/gate.json" ] || "$PY" -m dpruner prune "$CK" "${COMMON[@]}" --method gate --tolerance 1% \
  --budget-epochs "$BUDGET" -o "$OUT/gate.pt" --json > "$OUT/gate.json" 2> "$OUT/gate.err"
