#!/usr/bin/env bash
# The grouped-GEMM tile sweep of the seeds' generator (Qwen3-30B-A3B-FP8, dummy weights) on
# the GPU machine, after scripts/gpu/prepare.sh here (carry .gpu):
#   scripts/gpu/moe-tiles.sh [BIN_DIR] [OUT_DIR]
# Every tile of TILES (moe_kernels::MoeTile names, `auto` the engine's pick; a tile must be in
# moe_kernels::COMPILED) runs every MoE step at every batch of BATCHES, on one loaded model
# per batch, without the per-op breakdown (PROFILE=1 keeps it); the logits of one decode
# step are compared with the first tile's (CHECK lines). Made the tile tables in
# docs/bench/cuda-moe.md. CUDA_BENCH_PROMPTS=same (passed through) gives every sequence one
# prompt, as the seeds' client does: the whole batch then routes to the same experts.
set -uo pipefail
BIN=${1:-.gpu}
OUT=${2:-gpu-out}
mkdir -p "$OUT"
TILES=${TILES:-auto,16x128x64s3w1,32x128x64s3w1,64x128x64s2w1}
CUDA_BENCH_MOE_TILES=$TILES CUDA_BENCH_MOE_BATCHES=${BATCHES:-64,256,512} \
  CUDA_BENCH_PROFILE=${PROFILE:-0} "$BIN/cuda_bench" moe 2>&1 | grep -v "^GEMMTUNE" | tee "$OUT/moe-tiles.log"
echo "== summary =="
grep -h "^RESULT\|^CHECK" "$OUT/moe-tiles.log"
