#!/usr/bin/env bash
# Set up .venv (first run only) and run the offline demo on the embedded data:
# CLAPP++ (local) and BP-InfoNCE (end-to-end) trained with the same budget, and a
# random-init encoder, probed alike; a few minutes on 2 CPU cores. Arguments go
# to `localssl demo` (e.g. --seed 1, --amp auto for bf16 where the CPU has it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/localssl demo "$@"
