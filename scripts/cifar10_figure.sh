#!/usr/bin/env bash
# The README's first CIFAR-10 accuracy figure: the same encoder (VGG-6, width
# 0.25) and budget for CLAPP++, CLAPP++ without spatial dependence and
# BP-InfoNCE, then the same probes on each and on a random-init encoder.
# Usage: bash scripts/cifar10_figure.sh [OUT] ; env EPOCHS, SUBSET, DATA, PAPER_EPOCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cifar10}
DATA=${DATA:-../shared/data}
EPOCHS=${EPOCHS:-2}
PAPER_EPOCHS=${PAPER_EPOCHS:-3}
SUBSET_FLAG=${SUBSET:+--subset $SUBSET}
L=.venv/bin/localssl
for rule in clapp++ clapp++global bp-infonce; do
  if [ ! -f "$OUT/$rule/summary.json" ]; then
    rm -rf "$OUT/$rule"
    $L train --rule "$rule" --dataset cifar10 --data-dir "$DATA" --width 0.25 --epochs "$EPOCHS" $SUBSET_FLAG \
      --out "$OUT/$rule" --no-progress --log-every 50
  fi
  $L probe "$OUT/$rule" --protocols fast knn paper --epochs-paper "$PAPER_EPOCHS"
done
$L probe "$OUT/clapp++" --random-init --protocols fast knn paper --epochs-paper "$PAPER_EPOCHS"
$L report "$OUT" | tee "$OUT/table.md"
