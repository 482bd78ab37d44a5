#!/usr/bin/env bash
# Set up .venv (first run only) and run the offline demo on the embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/localssl demo "$@"
