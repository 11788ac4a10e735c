#!/usr/bin/env bash
# Prepare a fresh machine: Fashion-MNIST (Debian package), a venv with CPU torch 2.13.0 and locallearn[dev].
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "setup: warning: could not install dataset-fashion-mnist; real-data tests will be skipped" >&2
  else
    echo "setup: note: run 'sudo apt-get install dataset-fashion-mnist' or set data.root=DIR for the demo" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: the local CPU wheel. A bare 'torch' would pull several GB of CUDA wheels.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, locallearn; print("torch", torch.__version__, "locallearn", locallearn.__version__)'))"
