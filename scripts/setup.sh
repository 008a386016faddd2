#!/usr/bin/env bash
# Create .venv (once) and install dpruner with its test extra, pinned by constraints.txt. Safe to re-run: it
# reinstalls only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.dpruner-installed
if [ ! -f "$stamp" ] || [ constraints.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing dpruner and its pinned dependencies into .venv (first time: a few minutes)" >&2
  # (the grep drops pip's notes about this machine's local package mirrors, which say nothing about dpruner)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
