#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv and install
# localssl into it with its dev and plot extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Ask for the CPU build of torch by exact version first: on machines that
# keep it on disk this installs in seconds instead of pulling a multi-GB CUDA
# build. Elsewhere it is an ordinary install; a newer torch is fine too
# (pyproject asks for torch>=2.4), so a failure here is not fatal.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${LOCALSSL_TORCH:-2.13.0}" || true
fi
.venv/bin/pip install -q -e ".[dev,plots]"
