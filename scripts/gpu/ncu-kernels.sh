#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's full set (stall reasons, memory charts, per-SASS
# samples) for a few kernels of one `cuda_bench` part, without touching the clocks
# (--clock-control none, METHOD.md). Writes NAME-details.txt and NAME-sass.csv to $OUT.
#   scripts/gpu/ncu-kernels.sh NAME PART REGEX SKIP COUNT [BIN]
#   e.g. CUDA_BENCH_MOE_BATCHES=512 CUDA_BENCH_PROFILE=0 \
#        scripts/gpu/ncu-kernels.sh moe512 moe moe_gemm 1000 2 .gpu
# SKIP launches of kernels matching REGEX go by first (the prompts' steps), so the COUNT
# profiled are decode steps' (graph nodes are profiled one by one).
set -uo pipefail
name=$1 part=$2 regex=$3 skip=$4 count=$5 bin=${6:-.gpu}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
ncu=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
[ -x "$ncu" ] || { echo "ncu-kernels: no ncu on this machine" >&2; exit 2; }
rep=/tmp/ncu-$name
timeout "${NCU_TIMEOUT:-150}" "$ncu" --clock-control none --set full --import-source no \
  -k "regex:$regex" --launch-skip "$skip" --launch-count "$count" -f -o "$rep" \
  "$bin/cuda_bench" "$part" > "$OUT/$name-run.log" 2>&1
echo "ncu $name: exit $?"; grep -E "^RESULT|==PROF==|==ERROR==" "$OUT/$name-run.log" | tail -n 6
"$ncu" --import "$rep.ncu-rep" --page details > "$OUT/$name-details.txt" 2>&1
"$ncu" --import "$rep.ncu-rep" --page source --print-source sass --csv > "$OUT/$name-sass.csv" 2>&1
ls -la "$OUT" | grep "$name"
