#!/usr/bin/env bash
# On the GPU machine, from the repository root, after scripts/gpu/prepare.sh here and with
# .gpu carried: every GPU test and benchmark in one call, a short table last.
#   scripts/gpu/run-all.sh            # PARTS=gpu,cuda,serve,moe,green (default: all)
# moe: the seeds' generator (Qwen3-30B-A3B-FP8) in cuda_bench and served beside vLLM when
# vLLM is installed (scripts/gpu/moe-bench.sh; ../shared/vllm/README.md).
# green: which SMs green contexts confine kernels to, alone and in MPS clients
# (scripts/gpu/green-probe.sh; it starts and quits its own MPS daemon).
# Never changes clocks, power, compute mode, persistence or MIG; quits every MPS daemon.
set -uo pipefail
BIN=.gpu; PARTS=${PARTS:-gpu,cuda,serve,moe,green}
# Everything goes to one folder, packed into one file under $OUT at the end (the device
# tool brings back at most 8 files).
FINAL=${OUT:-gpu-out}; OUT=/tmp/gpu-run; rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL"
declare -A rc
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has gpu; then BIN=$BIN OUT=$OUT bash scripts/gpu/gpu-tests.sh > "$OUT/part-gpu.log" 2>&1; rc[gpu]=$?; fi
if has cuda; then OUT=$OUT BASELINES=1 PARTS=gen17,embed,gen8 bash scripts/gpu/cuda-bench.sh "$BIN" > "$OUT/part-cuda.log" 2>&1; rc[cuda]=$?; fi
if has serve; then bash scripts/gpu/serve-bench.sh "$BIN" "$OUT" > "$OUT/part-serve.log" 2>&1; rc[serve]=$?; fi
if has moe; then
  { "$BIN/cuda_bench" moe && bash scripts/gpu/moe-bench.sh "$BIN" "$OUT/moe"; } > "$OUT/part-moe.log" 2>&1; rc[moe]=$?
fi
if has green; then bash scripts/gpu/green-probe.sh "$BIN" "$OUT" > "$OUT/part-green.log" 2>&1; rc[green]=$?; fi
echo "== GPU run $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
for p in "${!rc[@]}"; do echo "part $p: exit ${rc[$p]} (log $OUT/part-$p.log)"; done
grep -h "failures:" "$OUT/part-gpu.log" 2>/dev/null
grep -h "test result\|^RESULT" "$OUT/part-cuda.log" 2>/dev/null
grep -h "tok/s\|seq/s" "$OUT/baselines.log" 2>/dev/null
for f in "$OUT"/serve-*.txt; do [ -f "$f" ] && { echo "-- $f"; tail -n 25 "$f"; }; done
grep -h "^RESULT gen qwen3-30b\|^| " "$OUT/part-moe.log" 2>/dev/null
grep -h "^GREEN" "$OUT/part-green.log" 2>/dev/null
tar czf "$FINAL/gpu-run.tgz" -C /tmp gpu-run && echo "logs: $FINAL/gpu-run.tgz"
