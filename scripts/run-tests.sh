#!/bin/bash
# The whole suite: linters, the hermetic tier and the real tier, with line
# coverage over both and per-module timings (printed by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
rm -f .coverage .coverage.*
# In CI nothing may be skipped: conftest turns capability skips into failures.
python -m pytest -m "" \
  --cov=bcvk --cov-report=term --cov-report=xml:build/coverage.xml \
  --durations=15 -p no:cacheprovider "$@"
