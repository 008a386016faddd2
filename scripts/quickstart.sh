#!/usr/bin/env bash
# The quick start: install (if needed), then run dpruner's main job on a sample model shipped in sample_models/:
# analyze it, prune it to the smallest model within 1 point of validation accuracy (fine-tuning on scikit-learn's
# digits, which ship inside scikit-learn), export the result to a verified ONNX file with a before/after report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
set -x
.venv/bin/dpruner analyze sample_models/digits_vgg.pt
.venv/bin/dpruner prune sample_models/digits_vgg.pt --data digits --tolerance 1% --seed 0 -o out/digits_vgg_small.pt
.venv/bin/dpruner export out/digits_vgg_small.pt --onnx out/digits_vgg_small.onnx --baseline sample_models/digits_vgg.pt \
  --data digits --markdown out/report.md
