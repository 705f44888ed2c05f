#!/usr/bin/env bash
# The on-device part of the CUDA engine's tests and benchmarks, run on the GPU machine from
# the repository root in one call, after scripts/gpu/prepare.sh here:
#   scripts/gpu/cuda-bench.sh [BIN_DIR]
# BIN_DIR (default .gpu) holds the release test binary `cuda_engine` (the engine's GPU
# tests, compiled in by its `gpu-tests` feature), the benchmark `cuda_bench` (the engine's
# example of that name), the qwen3-tiny fixture in `qwen3-tiny/`, and the baselines
# `hf_static.py` / `hf_baseline.py`.
# Env: PARTS (bench parts: attn,gemm,gen17,embed,gen8,long8), DECODE (the decode attention
# kernel of the gen/long parts: split, paged or both), GEMM (their GEMMs: tuned, the
# algorithms timed fastest at load, cublas, cublasGemmEx everywhere, or both); with two
# or more combinations each workload runs with all of them on the same loaded model and
# compares their logits. BASELINES=1 runs the transformers baselines in the same call,
# TESTS=0 skips the numerics tests, FLASH_BLOCKS="3 2" runs the bench once per value of
# COLOCATE_FLASH_MIN_BLOCKS (the flash kernels' register cap: blocks per multiprocessor).
# The tests run twice: as built (prompt chunks of 16 tokens and more on the flash prefill),
# then with decode work items of 16 keys (COLOCATE_DECODE_MIN_CHUNK=16) and every prompt
# chunk on the flash prefill (COLOCATE_PREFILL_FLASH_MIN=1), so that the tiny model's short
# contexts are split too and both paths are checked against transformers and the CPU. Logs go to $OUT (or
# ./gpu-out).
# Never touches clocks, power, compute mode or MIG.
set -uo pipefail
BIN=${1:-.gpu}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export QWEN3_TINY_DIR="$PWD/$BIN/qwen3-tiny"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } | tee "$OUT/device.txt"
status=0
if [ "${TESTS:-1}" = 1 ]; then
  "$BIN/cuda_engine" --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log" || status=1
  echo "== again with COLOCATE_DECODE_MIN_CHUNK=16 COLOCATE_PREFILL_FLASH_MIN=1 ==" | tee -a "$OUT/tests.log"
  COLOCATE_DECODE_MIN_CHUNK=16 COLOCATE_PREFILL_FLASH_MIN=1 "$BIN/cuda_engine" --test-threads=1 --nocapture 2>&1 |
    tee -a "$OUT/tests.log" || status=1
fi
: > "$OUT/bench.log"
for fb in ${FLASH_BLOCKS:-default}; do
  if [ "$fb" != default ]; then export COLOCATE_FLASH_MIN_BLOCKS=$fb; echo "== COLOCATE_FLASH_MIN_BLOCKS=$fb ==" | tee -a "$OUT/bench.log"; fi
  CUDA_BENCH_DECODE="${DECODE:-split}" CUDA_BENCH_GEMM="${GEMM:-tuned}" "$BIN/cuda_bench" "${PARTS:-gen17,embed,gen8}" 2>&1 |
    tee -a "$OUT/bench.log" || status=1
done
unset COLOCATE_FLASH_MIN_BLOCKS
if [ "${BASELINES:-0}" = 1 ]; then
  export PYTHONUNBUFFERED=1
  python3 "$BIN/hf_static.py" 64 256 2>&1 | grep -v Warning | tee "$OUT/baselines.log"
  python3 "$BIN/hf_baseline.py" embed 20 64 2>&1 | grep -v Warning | tee -a "$OUT/baselines.log"
fi
echo "== summary =="
grep -h "test result\|^test .*\(ok\|FAILED\)$" "$OUT/tests.log" 2>/dev/null
grep -h "^== COLOCATE\|^RESULT\|^CHECK\|^ATTN\|^GEMM \|^GEMMCHECK" "$OUT/bench.log"
grep -h "tok/s\|seq/s" "$OUT/baselines.log" 2>/dev/null
exit $status
