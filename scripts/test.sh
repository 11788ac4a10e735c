#!/usr/bin/env bash
# The test command (README and CI): lint, then the whole suite on CPU. Usage: bash scripts/test.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
.venv/bin/ruff check src tests || exit 1
.venv/bin/ruff format --check src tests || { echo "test: run '.venv/bin/ruff format src tests'" >&2; exit 1; }
.venv/bin/python -m pytest -q -m "not slow" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
