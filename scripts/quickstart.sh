#!/usr/bin/env bash
# The quick start: install (if needed), then run dpruner on a sample model shipped in sample_models/:
# analyze it, prune it to half its MACs, and analyze the pruned checkpoint (which loads with no other argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
set -x
.venv/bin/dpruner analyze sample_models/digits_resnet.pt
.venv/bin/dpruner prune sample_models/digits_resnet.pt --ratio 2x --method fpgm -o out/digits_resnet_2x.pt
.venv/bin/dpruner analyze out/digits_resnet_2x.pt
