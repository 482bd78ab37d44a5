#!/usr/bin/env bash
# What each cheaper B of CLAPP++ costs in accuracy (issue 14), at the budget of the README's first CIFAR-10
# figure (scripts/cifar10_figure.sh: VGG-6 width 0.25, 3125 steps = 2 epochs of 32 images, AdamW lr 2e-4,
# fp32, seed 0): dense CLAPP++ and every variant below side by side with BP-InfoNCE and a random-init
# encoder, the same probes on each (fast linear probes on all layers and the last, kNN, and the paper's
# probe for PAPER_EPOCHS of its 300 epochs), and each rule's images/s and memory from one process.
# Variants are `RULE@KEY=VALUE[,KEY=VALUE]` labels (README, "The rules"): each its own run folder.
# Usage: bash scripts/compare_cheapb_cifar10.sh [OUT]; env below (defaults in brackets). Resumable: run it
# again and finished runs and up-to-date probes are skipped, interrupted runs resume from their checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare-cheapb-cifar10}
DATA=${DATA:-../shared/data}        # holds cifar10-jpeg.tar.gz or cifar-10-batches-py/
STEPS=${STEPS:-3125}                # the README figure's budget (2 epochs of 32 images)
BATCH=${BATCH:-32}
WIDTH=${WIDTH:-0.25}
LR=${LR:-2e-4}                      # the paper's (METHODS 2.4), as the README figure
SEED=${SEED:-0}
AMP=${AMP:-off}                     # fp32: b_dtype=bf16 is then the only bf16 in its run
PAPER_EPOCHS=${PAPER_EPOCHS:-3}
PROBE_EPOCHS=${PROBE_EPOCHS:-100}
RULES=${RULES:-bp-infonce clapp++ clapp++@b_rank=64 clapp++@b_rank=64,b_optimizer=sgd clapp++@b_structure=shared clapp++@b_structure=shared,b_rank=64 clapp++@b_dtype=bf16}
extra=()
[ -n "${PROBE_TRAIN:-}" ] && extra+=(--probe-train-subset "$PROBE_TRAIN")
[ -n "${PROBE_TEST:-}" ] && extra+=(--probe-test-subset "$PROBE_TEST")
# shellcheck disable=SC2086  # RULES is a word list
exec .venv/bin/localssl compare --rules $RULES --encoder vgg6 --width "$WIDTH" \
  --dataset cifar10 --data-dir "$DATA" --budget "$STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" \
  --amp "$AMP" --probes fast knn paper --probe-epochs "$PROBE_EPOCHS" --paper-epochs "$PAPER_EPOCHS" \
  --checkpoint-every 500 "${extra[@]}" --out "$OUT"
