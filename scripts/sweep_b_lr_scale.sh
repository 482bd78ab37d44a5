#!/usr/bin/env bash
# Which b_lr_scale to give a B trained by momentum SGD (b_optimizer=sgd, issue 14), read from the training
# loss: CLAPP++ on CIFAR-10 (VGG-6 width WIDTH, STEPS steps of 32 images, lr LR, fp32, seed 0) with B in
# AdamW (the default) and with B in SGD at each scale of SCALES; prints the mean loss over the last quarter
# of the steps per run. A proxy chosen for its price (minutes, not hours): SGD's steps scale with the
# gradient and AdamW's do not, so the run's lr is rarely right for both; the scale whose loss comes closest
# to AdamW-B's is the one to take into an accuracy run (scripts/compare_cheapb_cifar10.sh).
# Usage: bash scripts/sweep_b_lr_scale.sh [OUT]; env STEPS, SCALES, RULE_OPTS, WIDTH, LR, DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sweep-b-lr-scale}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-300}
WIDTH=${WIDTH:-0.25}
LR=${LR:-2e-4}
SCALES=${SCALES:-1 10 100 1000}
RULE_OPTS=${RULE_OPTS:-}            # e.g. "b_rank=64" or "b_structure=shared": the B form to sweep
L=.venv/bin/localssl
run() {  # NAME OPTION...
  local out="$OUT/$1"; shift
  local opts=(); [ $# -gt 0 ] && opts=(--rule-opt "$@")
  [ -f "$out/summary.json" ] || $L train --rule clapp++ --dataset cifar10 --data-dir "$DATA" --width "$WIDTH" \
    --epochs 1000 --max-steps "$STEPS" --lr "$LR" --amp off --seed 0 --no-progress --log-every 10 \
    --checkpoint-every "$STEPS" --out "$out" "${opts[@]}" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
}
mkdir -p "$OUT"
# shellcheck disable=SC2086  # RULE_OPTS is a word list
run adamw $RULE_OPTS
for s in $SCALES; do
  # shellcheck disable=SC2086
  run "sgd-x$s" $RULE_OPTS b_optimizer=sgd "b_lr_scale=$s"
done
.venv/bin/python - "$OUT" "$STEPS" <<'PY'
import csv, pathlib, sys
out, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print(f"mean training loss over steps > {3 * steps // 4} (of {steps}), per run:")
for d in sorted(p for p in out.iterdir() if p.is_dir()):
    rows = [r for r in csv.DictReader(open(d / "metrics.csv")) if int(r["step"]) > 3 * steps // 4]
    print(f"  {d.name:12s} {sum(float(r['loss']) for r in rows) / len(rows):.4f}  ({len(rows)} logged steps)")
PY
