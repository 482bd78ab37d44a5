#!/usr/bin/env bash
# The README's comparison of the blockwise rules on CIFAR-10 (issue 11): every rule
# trains a ResNet-18 (CIFAR stem, width WIDTH) for STEPS steps of BATCH images with
# the same AdamW lr, seed and precision, then every rule and a random-init encoder
# of the same shape get the same probes: one linear probe per block (stage), the
# last-layer and all-layer linear probes, kNN, and optionally the paper's probe;
# speed and activation memory of every rule come from one process (`localssl
# bench`'s tools). Writes OUT/compare.csv, OUT/compare.md and OUT/compare.png.
# Usage: bash scripts/compare_cifar10.sh [OUT]; env below (defaults in brackets).
# Resumable by construction: run it again and finished runs and up-to-date probes
# are skipped, interrupted runs resume, a larger STEPS resumes every run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare-cifar10}
DATA=${DATA:-../shared/data}        # holds cifar10-jpeg.tar.gz or cifar-10-batches-py/
STEPS=${STEPS:-2000}                # the budget of every rule, in steps
BATCH=${BATCH:-64}                  # images per step (two views each)
WIDTH=${WIDTH:-0.25}
LR=${LR:-1e-3}                      # short budgets: the demo found 2e-4 too slow to move a local rule's top block
SEED=${SEED:-0}
AMP=${AMP:-off}                     # fp32: speed ratios that do not depend on the CPU's bf16 (auto: bf16 where native)
DEVICE=${DEVICE:-auto}
RULES=${RULES:-blockwise-barlow blockwise-vicreg loco blockwise-simclr bp-barlow bp-simclr}
PROBE_EPOCHS=${PROBE_EPOCHS:-100}   # of the fast linear probes (per block, last layer, all layers)
PAPER=${PAPER:-0}                   # 1: also the paper's probe (METHODS 2.5), PAPER_EPOCHS of its 300 epochs
PAPER_EPOCHS=${PAPER_EPOCHS:-3}
PROBES="blocks fast knn"
[ "$PAPER" = 1 ] && PROBES="$PROBES paper"
extra=()
# Optional class-balanced probe subsets (default: all 50,000 train and 10,000 test images).
[ -n "${PROBE_TRAIN:-}" ] && extra+=(--probe-train-subset "$PROBE_TRAIN")
[ -n "${PROBE_TEST:-}" ] && extra+=(--probe-test-subset "$PROBE_TEST")
# shellcheck disable=SC2086  # RULES and PROBES are word lists
exec .venv/bin/localssl compare --rules $RULES --encoder resnet18 --width "$WIDTH" --encoder-opt stem=cifar \
  --dataset cifar10 --data-dir "$DATA" --budget "$STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" \
  --amp "$AMP" --device "$DEVICE" --probes $PROBES --probe-epochs "$PROBE_EPOCHS" --paper-epochs "$PAPER_EPOCHS" \
  --checkpoint-every 250 "${extra[@]}" --out "$OUT"
