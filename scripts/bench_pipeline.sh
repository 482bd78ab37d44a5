#!/usr/bin/env bash
# Issue 13's benchmark: one process with 2 threads against a 2-stage pipeline (torchrun, 2 ranks of 1 thread
# each, gloo on loopback) on the same training run, for VGG-6 and ResNet-18, plus `localssl stages`' per-block
# costs, its split and predicted speedup for 2/4/8 stages. images/s: the median of the logged windows after
# the first (warm-up), from each run's metrics.jsonl. Run it on a quiet machine: every other job on the cores
# changes the ratio. Writes OUT/*.json and OUT/bench-pipeline.md.
# Usage: bash scripts/bench_pipeline.sh [OUT]; env: DATA, DATASET, STEPS, BATCH, WIDTH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-pipeline}
DATASET=${DATASET:-cifar10}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-60}
BATCH=${BATCH:-32}
WIDTH=${WIDTH:-0.25}
mkdir -p "$OUT"
common=(--dataset "$DATASET" --data-dir "$DATA" --width "$WIDTH" --batch-size "$BATCH" --max-steps "$STEPS"
        --log-every 10 --amp off --no-progress --checkpoint-every 100000)
run() {  # NAME ENCODER RULE ENCODER_OPTS...
  local name=$1 enc=$2 rule=$3; shift 3
  rm -rf "$OUT/$name-seq" "$OUT/$name-pipe"
  .venv/bin/localssl train --rule "$rule" --encoder "$enc" "$@" "${common[@]}" --threads 2 --out "$OUT/$name-seq" >/dev/null
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m localssl train --pipeline --rule "$rule" --encoder "$enc" \
    "$@" "${common[@]}" --threads 1 --out "$OUT/$name-pipe" >/dev/null
  .venv/bin/localssl stages --rule "$rule" --encoder "$enc" "$@" --width "$WIDTH" --batch-size "$BATCH" \
    --dataset "$DATASET" --data-dir "$DATA" --ranks 2 4 8 --json > "$OUT/$name-stages.json"
}
run vgg6 vgg6 clapp++global
run resnet18 resnet18 blockwise-barlow --encoder-opt stem=cifar cut=units
.venv/bin/python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def ips(run):
    rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in rows[1:] or rows)
lines = ["| encoder, rule | 1 process, 2 threads, img/s | 2-stage pipeline, 1 thread each, img/s | ratio | "
         "stages' predicted speedup (2 / 4 / 8) |", "|---|---|---|---|---|"]
for name, rule in (("vgg6", "clapp++global"), ("resnet18", "blockwise-barlow")):
    seq, pipe = ips(f"{name}-seq"), ips(f"{name}-pipe")
    st = json.loads((out / f"{name}-stages.json").read_text())
    pred = " / ".join(f"{s['speedup']:.2f}x" if s.get("speedup") else "-" for s in st.get("splits", []))
    lines.append(f"| {name}, {rule} | {seq:.1f} | {pipe:.1f} | {pipe / seq:.2f}x | {pred} |")
(out / "bench-pipeline.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
