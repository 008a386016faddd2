#!/usr/bin/env bash
# The test command: install (if needed), then run the whole suite (slow tests included; real-data tests skip with a
# reason when ../shared/data is absent). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
