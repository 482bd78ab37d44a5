#!/usr/bin/env bash
# Issue 13's benchmark: one process with 2 threads and with 1 thread against a 2-stage pipeline (torchrun, 2
# ranks of 1 thread each, gloo on loopback) on the same training run, for VGG-6 and ResNet-18, plus `localssl
# stages`' per-block costs, its split and predicted speedup for 2/4/8 stages (each stage on a device of its
# own: against the 1-thread process here). images/s: the median of the logged windows after the first
# (warm-up), from each run's metrics.jsonl. Run it on a quiet machine: every other job on the cores changes
# the ratio. Writes OUT/*-stages.json and OUT/bench-pipeline.md; the run folders go to RUNS.
# Usage: bash scripts/bench_pipeline.sh [OUT]; env: DATA, DATASET, STEPS, BATCH, WIDTH, RUNS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results/bench-pipeline}
RUNS=${RUNS:-runs/bench-pipeline}
DATASET=${DATASET:-cifar10}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-60}
BATCH=${BATCH:-32}
WIDTH=${WIDTH:-0.25}
mkdir -p "$OUT" "$RUNS"
common=(--dataset "$DATASET" --data-dir "$DATA" --width "$WIDTH" --batch-size "$BATCH" --max-steps "$STEPS"
        --log-every 10 --amp off --no-progress --checkpoint-every 100000)
run() {  # NAME ENCODER RULE ENCODER_OPTS...
  local name=$1 enc=$2 rule=$3; shift 3
  rm -rf "$RUNS/$name-seq" "$RUNS/$name-seq1" "$RUNS/$name-pipe"
  .venv/bin/localssl train --rule "$rule" --encoder "$enc" "$@" "${common[@]}" --threads 2 --out "$RUNS/$name-seq" >/dev/null
  .venv/bin/localssl train --rule "$rule" --encoder "$enc" "$@" "${common[@]}" --threads 1 --out "$RUNS/$name-seq1" >/dev/null
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m localssl train --pipeline --rule "$rule" --encoder "$enc" \
    "$@" "${common[@]}" --threads 1 --out "$RUNS/$name-pipe" >/dev/null
  .venv/bin/localssl stages --rule "$rule" --encoder "$enc" "$@" --width "$WIDTH" --batch-size "$BATCH" \
    --dataset "$DATASET" --data-dir "$DATA" --ranks 2 4 8 --json > "$OUT/$name-stages.json"
}
run vgg6 vgg6 clapp++global
run resnet18 resnet18 blockwise-barlow --encoder-opt stem=cifar cut=units
.venv/bin/python - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), Path(sys.argv[2])
def ips(run):
    rows = [json.loads(x) for x in (runs / run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in rows[1:] or rows)
lines = ["| encoder, rule | 1 process, 2 threads | 1 process, 1 thread | 2-stage pipeline, 1 thread per rank | "
         "pipeline vs 2 threads | vs 1 thread | split | stages' predicted speedup (2 / 4 / 8 stages) |",
         "|---|---|---|---|---|---|---|---|"]
for name, rule in (("vgg6", "clapp++global"), ("resnet18", "blockwise-barlow")):
    seq, seq1, pipe = ips(f"{name}-seq"), ips(f"{name}-seq1"), ips(f"{name}-pipe")
    st = json.loads((out / f"{name}-stages.json").read_text())
    pred = " / ".join(f"{s['speedup']:.2f}x" if s.get("speedup") else "-" for s in st.get("splits", []))
    split = next((s["stages"] for s in st.get("splits", []) if s.get("ranks") == 2), None)
    lines.append(f"| {name}, {rule} | {seq:.1f} | {seq1:.1f} | {pipe:.1f} | {pipe / seq:.2f}x | {pipe / seq1:.2f}x | "
                 f"{split} | {pred} |")
lines.append("")
lines.append("images/s (median of the logged windows after the first); the pipeline's split is measured on the "
             "first batch by the trainer, the stages' split by `localssl stages`.")
(out / "bench-pipeline.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
