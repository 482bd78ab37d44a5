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
# (pyproject asks for torch>=2.4). In CI (CI=true) a failure here is an error:
# going on would let the next step pull a different, multi-GB torch and the
# suite would test something else than it says.
TORCH=${LOCALSSL_TORCH:-2.13.0}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if ! .venv/bin/pip install -q "torch==$TORCH"; then
    if [ "${CI:-}" = "true" ]; then
      echo "setup: pip could not install torch==$TORCH (the CPU build this machine keeps on disk)" >&2
      exit 1
    fi
    echo "setup: torch==$TORCH is not available here; pip will pick a torch>=2.4 (may be a large CUDA build)" >&2
  fi
fi
.venv/bin/pip install -q -e ".[dev,plots]"
.venv/bin/python -c "import torch, kornia; print(f'setup: torch {torch.__version__}, kornia {kornia.__version__}')"
