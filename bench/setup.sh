#!/usr/bin/env bash
# A separate environment for benchmarks: dpruner (pinned as in constraints.txt) plus the peers and model zoos in
# requirements.txt (and requirements-nodeps.txt, installed without their dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
.venv-bench/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e . -r bench/requirements.txt \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv-bench/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r bench/requirements-nodeps.txt \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
