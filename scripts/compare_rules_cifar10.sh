#!/usr/bin/env bash
# The README's comparison of the rest of the field on CIFAR-10 (issue 12): CLAPP++, CLAPP++DFB, fixed random
# feedback (dfa), Forward-Forward (ff), SCFF, predictive coding (pc) and Greedy InfoMax (gim) against
# BP-InfoNCE and a random-init encoder, all on VGG-6 (width WIDTH) for STEPS steps of BATCH images with the
# same AdamW lr, seed and precision, probed alike (one linear probe per block, last-layer and all-layer linear
# probes, kNN). GIM reads patches: its own recipe (stated in compare.md), VGG-6 run per 16 px patch at stride 8
# on CIFAR-10 upsampled to 64 px (a 7x7 grid, GIM's STL-10 geometry), one view per image (a random 64 px crop
# after 8 px of reflection, and a flip), with its own random-init row and its speed read against bp-cpc on the
# same recipe. Writes OUT/compare.csv, OUT/compare.md and OUT/compare.png.
# Usage: bash scripts/compare_rules_cifar10.sh [OUT]; env below (defaults in brackets). Resumable: run it
# again and finished runs and up-to-date probes are skipped, interrupted runs resume.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare-rules-cifar10}
DATA=${DATA:-../shared/data}        # holds cifar10-jpeg.tar.gz or cifar-10-batches-py/
STEPS=${STEPS:-1500}                # the budget of every rule, in steps
BATCH=${BATCH:-32}                  # images per step (the paper's batch, METHODS 2.4)
WIDTH=${WIDTH:-0.25}
LR=${LR:-1e-3}
SEED=${SEED:-0}
AMP=${AMP:-off}                     # fp32: speed ratios that do not depend on the CPU's bf16
DEVICE=${DEVICE:-auto}
RULES=${RULES:-clapp++ clapp++dfb dfa ff scff pc gim bp-infonce}
PC_ITERATIONS=${PC_ITERATIONS:-20}  # predictive coding's inference iterations per step (each a forward + backward)
PROBE_EPOCHS=${PROBE_EPOCHS:-100}
extra=()
[ -n "${PROBE_TRAIN:-}" ] && extra+=(--probe-train-subset "$PROBE_TRAIN")
[ -n "${PROBE_TEST:-}" ] && extra+=(--probe-test-subset "$PROBE_TEST")
opts=()
case " $RULES " in *" pc "*) opts+=(--rule-opt "pc:iterations=$PC_ITERATIONS");; esac
case " $RULES " in *" gim "*) opts+=(--recipe gim:encoder=vgg6-patches gim:resize=64 --rule-opt gim:crop=64 gim:crop_padding=8);; esac
# shellcheck disable=SC2086  # RULES is a word list
exec .venv/bin/localssl compare --rules $RULES --encoder vgg6 --width "$WIDTH" \
  --dataset cifar10 --data-dir "$DATA" --budget "$STEPS" --batch-size "$BATCH" --lr "$LR" --seed "$SEED" \
  --amp "$AMP" --device "$DEVICE" --probes blocks fast knn --probe-epochs "$PROBE_EPOCHS" \
  --checkpoint-every 250 "${opts[@]}" "${extra[@]}" --out "$OUT"
