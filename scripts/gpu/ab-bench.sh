#!/usr/bin/env bash
# On the GPU machine: one kernel change measured side by side in one call. Runs the same
# `cuda_bench` parts with a binary of the commit before (A) and of the change (B), one after
# the other and then once more in the other order (B, A), so that drift between the runs
# shows; prints each run's RESULT lines, labelled. Env as cuda_bench's (CUDA_BENCH_*).
#   CUDA_BENCH_MOE_BATCHES=64,512 CUDA_BENCH_PROFILE=0 \
#     scripts/gpu/ab-bench.sh .gpu-old/cuda_bench .gpu/cuda_bench moe,prefill8
# Logs: $OUT/ab-{A,B}-{1,2}.log.
set -uo pipefail
a=$1 b=$2 parts=$3
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
for x in "$a" "$b"; do [ -x "$x" ] || { echo "ab-bench: $x is not an executable" >&2; exit 2; }; done
run() { # label, binary, pass
  "$2" "$parts" > "$OUT/ab-$1-$3.log" 2>&1
  echo "== $1 ($2), pass $3: exit $?"
  grep '^RESULT' "$OUT/ab-$1-$3.log" | grep -v 'RESULT bandwidth' | sed "s/^/$1 /"
}
run A "$a" 1; run B "$b" 1; run B "$b" 2; run A "$a" 2
