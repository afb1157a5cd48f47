#!/usr/bin/env bash
# Issue 24, item 2: does the batched augmentation train differently from the per-image one?
# clusterkit only (no official code), the parity setting of benchmarks/parity.py, ProPos and CC,
# data.pipeline=batched vs per_image, seeds 0 1 2, epochs 0-6, one run at a time, 1 torch thread,
# niced (the machine is shared).  Seed-major order: every configuration gets seed 0 before any gets
# seed 1, so an interrupted sweep stays balanced; each call reuses the seeds already recorded in its
# --work folder and rewrites its --out with all seeds so far.
# Usage (repo root, clusterkit's venv): bash benchmarks/pipeline_parity.sh [SEEDS...]   (default 0 1 2)
# A subset: METHODS="cc" PIPES="batched" bash benchmarks/pipeline_parity.sh 0 1
# WAIT_PID=<pid>: start only after that process has exited (queue behind a running sweep).
set -euo pipefail
seeds=("${@:-0 1 2}"); seeds=(${seeds[*]})
work=${PIPELINE_PARITY_WORK:-/tmp/pipeline-parity}
out=benchmarks/results/pipeline_parity
mkdir -p "$out"
done_seeds=()
if [ -n "${WAIT_PID:-}" ]; then while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done; fi
for seed in "${seeds[@]}"; do
  done_seeds+=("$seed")
  for method in ${METHODS:-propos cc}; do
    sched=30; [ "$method" = cc ] && sched=6
    for pipe in ${PIPES:-batched per_image}; do
      nice -n 15 python benchmarks/parity.py --methods "$method" --systems clusterkit \
        --seeds "${done_seeds[@]}" --epochs 6 --schedule-epochs "$sched" --threads 1 \
        --extra-set "data.pipeline=$pipe" \
        --out "$out/${method}_${pipe}.md" --work "$work/${method}_${pipe}"
    done
  done
done
