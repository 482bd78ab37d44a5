#!/usr/bin/env bash
# The README's CIFAR-10 accuracy figure: the same encoder (VGG-6, width 0.25),
# data, precision (fp32, on every CPU) and budget (STEPS steps of 32 images;
# 3125 = 2 epochs, 9375 = 6) for CLAPP++, CLAPP++ without spatial dependence
# and BP-InfoNCE, then the same probes on each and on a random-init encoder of
# the same shape: fast + kNN on all the data, and the paper's probe (METHODS
# 2.5: raw features, RandomResizedCrop 0.08-1 + flip, final and best) for
# PAPER_EPOCHS of its 300 epochs on PAPER_TRAIN train images.
# Usage: bash scripts/cifar10_figure.sh [OUT]; env STEPS, DATA, PAPER_EPOCHS, PAPER_TRAIN.
# A run that was stopped, or trained for fewer steps, is resumed from its
# checkpoint (the learning rate is constant, so that equals a longer run), and
# its probes are redone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cifar10}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-3125}
PAPER_EPOCHS=${PAPER_EPOCHS:-3}
PAPER_TRAIN=${PAPER_TRAIN:-10000}  # the paper protocol re-encodes every epoch: a train subset keeps it in minutes
L=.venv/bin/localssl
for rule in clapp++ clapp++global bp-infonce; do
  done_steps=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"])' \
    "$OUT/$rule/summary.json" 2>/dev/null || echo 0)
  if [ "$done_steps" -ge "$STEPS" ]; then
    :  # trained already
  elif [ -f "$OUT/$rule/checkpoint.pt" ]; then
    rm -f "$OUT/$rule"/probe*.json  # they described the shorter run
    $L train --resume --out "$OUT/$rule" --epochs 1000 --max-steps "$STEPS" --no-progress --checkpoint-every 500
  else  # --max-steps sets the budget; --epochs only bounds it
    $L train --rule "$rule" --dataset cifar10 --data-dir "$DATA" --width 0.25 --epochs 1000 --max-steps "$STEPS" \
      --amp off --out "$OUT/$rule" --no-progress --log-every 50 --checkpoint-every 500
  fi
done
probe() {  # RUN [--random-init]: fast + kNN on all data, then the paper protocol on a subset
  local name=probe; [ $# -gt 1 ] && name=probe-random-init
  [ -f "$1/$name.json" ] || $L probe "$@" --amp off --protocols fast knn
  [ -f "$1/$name-paper.json" ] || $L probe "$@" --amp off --protocols paper --epochs-paper "$PAPER_EPOCHS" \
    --train-subset "$PAPER_TRAIN" --out "$1/$name-paper.json"
}
for rule in clapp++ clapp++global bp-infonce; do probe "$OUT/$rule"; done
probe "$OUT/clapp++" --random-init
$L report "$OUT" | tee "$OUT/table.md"
