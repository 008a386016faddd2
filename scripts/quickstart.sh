#!/usr/bin/env bash
# The quick start: install (if needed), then run dpruner on the sample models shipped in sample_models/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set -x
.venv/bin/dpruner --help
.venv/bin/dpruner analyze sample_models/digits_resnet.pt
