#!/usr/bin/env bash
# The test command (README, CI): sets up .venv/, checks the generated stubs are fresh, lints,
# type-checks and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/ruff check services scripts tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
