#!/usr/bin/env bash
# On the GPU machine: one kernel change measured side by side in one call. Runs the same
# `cuda_bench` parts with a binary of the commit before (A) and of the change (B), one after
# the other and then once more in the other order (B, A), so that drift between the runs
# shows; prints each run's RESULT lines, labelled, then a table of step times and B / A.
# Env as cuda_bench's (CUDA_BENCH_*).
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
# The step times side by side: each RESULT's "decode step X ms" or "one step X ms", the
# mean of its two passes, and B / A (below 1: the change is faster).
python3 - "$OUT" <<'PY'
import re, sys, glob, collections
ms = collections.defaultdict(lambda: collections.defaultdict(list))
for f in sorted(glob.glob(f"{sys.argv[1]}/ab-[AB]-[12].log")):
    side = f.rsplit("/", 1)[1][3]
    for line in open(f, errors="replace"):
        m = re.match(r"RESULT (.+?): .*?(?:decode step|one step) ([0-9.]+) ms", line)
        if m:
            ms[m.group(1)][side].append(float(m.group(2)))
print("| workload | A ms | B ms | B / A |\n|---|---:|---:|---:|")
for k, v in ms.items():
    if v["A"] and v["B"]:
        a, b = sum(v["A"]) / len(v["A"]), sum(v["B"]) / len(v["B"])
        print(f"| {k} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
PY
