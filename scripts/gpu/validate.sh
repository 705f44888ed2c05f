#!/usr/bin/env bash
# On the GPU machine, the first call of a session after kernel work: the GPU tests, then
# what the change needs measured, inside one device call's ten minutes (each step has its
# own time limit, so a slow one cannot take the others' time). Here, before it:
# scripts/gpu/prepare.sh, and the previous commit's cuda_bench copied to .gpu-old/; carry
# both .gpu and .gpu-old.
#   scripts/gpu/validate.sh [BIN_DIR] [OLD_CUDA_BENCH] [OUT_DIR]
# Steps (logs OUT_DIR/<step>.log, all of them in OUT_DIR/validate.tgz):
#   tests    the engine's GPU tests (`cuda_engine`, one thread);
#   attn     the decode attention kernels against the host reference (ATTNCHECK lines);
#   splits   the seeds' generator with one prompt at batches 64 and 512, the split decode
#            attention through registers and through the shared-memory ring
#            (CUDA_BENCH_DECODE=splits; the same binary, side by side);
#   long     the same two kernels on Qwen3-8B's long contexts (32 sequences of 8,192
#            tokens: the decode step is mostly attention);
#   ab       the previous commit's cuda_bench (A) against this one's (B): the MoE at 64
#            and 512 and dense 8B at batch 64 (scripts/gpu/ab-bench.sh);
#   profile  where a 512-sequence one-prompt MoE decode step goes, per op (eager).
# Env: STEPS (default "tests attn splits long ab profile") runs some of them; LIMIT (560 s)
# is the whole call's: a step gets what is left of it when that is less than its own.
set -uo pipefail
BIN=${1:-.gpu}; OLD=${2:-.gpu-old/cuda_bench}; OUT=${3:-gpu-out}
HERE=$(dirname "$0")
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
[ -f "$BIN/COMMIT" ] && echo "binaries of $(cat "$BIN/COMMIT")" | tee -a "$OUT/device.txt"

END=$(( $(date +%s) + ${LIMIT:-560} ))
# step NAME SECONDS COMMAND...: runs it with a time limit, its output in OUT/NAME.log.
step() {
  local name=$1 secs=$2; shift 2
  [[ " ${STEPS:-tests attn splits long ab profile} " == *" $name "* ]] || return 0
  local left=$(( END - $(date +%s) - 15 ))
  if [ "$left" -lt 30 ]; then echo "== $name: not run (${left} s left)"; return 0; fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "== $name (at most $secs s)"
  timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?"
}

step tests 150 env QWEN3_TINY_DIR="$BIN/qwen3-tiny" "$BIN/cuda_engine" --test-threads=1
step attn 60 "$BIN/cuda_bench" attn
step splits 150 env CUDA_BENCH_DECODE=splits CUDA_BENCH_PROMPTS=same CUDA_BENCH_MOE_BATCHES=64,512 \
  CUDA_BENCH_PROFILE=0 "$BIN/cuda_bench" moe
step long 120 env CUDA_BENCH_DECODE=splits CUDA_BENCH_PROFILE=0 "$BIN/cuda_bench" long8
if [ -x "$OLD" ]; then
  step ab 200 env OUT="$OUT/ab" CUDA_BENCH_MOE_BATCHES=64,512 CUDA_BENCH_PROFILE=0 \
    "$HERE/ab-bench.sh" "$OLD" "$BIN/cuda_bench" moe,gen8-64
else
  echo "== ab: skipped ($OLD is not an executable)"
fi
step profile 90 env CUDA_BENCH_PROMPTS=same CUDA_BENCH_MOE_BATCHES=512 "$BIN/cuda_bench" moe

echo "== summary"
[ -f "$OUT/tests.log" ] && grep -E "^test .*(FAILED|ignored)|^test result" "$OUT/tests.log"
[ -f "$OUT/attn.log" ] && grep -c "^ATTNCHECK" "$OUT/attn.log" | sed 's/^/ATTNCHECK lines: /' &&
  grep "^ATTNCHECK.*FAIL" "$OUT/attn.log"
for f in splits long profile; do [ -f "$OUT/$f.log" ] && grep -h "^RESULT gen\|^RESULT long\|^CHECK" "$OUT/$f.log"; done
[ -f "$OUT/ab.log" ] && sed -n '/^| workload/,$p' "$OUT/ab.log"
tar czf "$OUT/validate.tgz" -C "$OUT" --exclude=validate.tgz .
