#!/usr/bin/env bash
# On the GPU machine: the CUDA engine through its HTTP server, driven by `colocate bench`
# (issue 8's targets: Qwen3-1.7B 128+128 at 64 and 256 concurrent; Qwen3-Embedding-0.6B,
# 512-token inputs, batch 64). Usage: scripts/gpu/serve-bench.sh BIN_DIR OUT_DIR
set -uo pipefail
BIN=${1:-.gpu}; OUT=${2:-gpu-out}; C="$BIN/colocate"
WARM=${WARM:-5s}; DUR=${DUR:-20s}
mkdir -p "$OUT"
. "$(dirname "$0")/health.sh"
status=0
"$C" serve --device cuda --model preset:qwen3-1.7b --load-format dummy --port 8100 \
  --served-model-name gen --max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 512 \
  --gpu-memory-utilization 0.8 > "$OUT/serve-gen.log" 2>&1 &
gp=$!
if wait_health 8100; then
  for c in 64 256; do
    "$C" bench --workload "completions:url=http://127.0.0.1:8100,model=gen,concurrency=$c,input=128,output=128" \
      --warmup "$WARM" --duration "$DUR" --out "$OUT/serve-gen-$c.json" 2>&1 | tee "$OUT/serve-gen-$c.txt" || status=1
  done
else echo "gen server did not become healthy"; tail -n 30 "$OUT/serve-gen.log"; status=1; fi
kill -INT $gp; wait $gp
"$C" serve --device cuda --model preset:qwen3-embedding-0.6b --load-format dummy --port 8200 \
  --served-model-name emb --max-num-batched-tokens 32768 --gpu-memory-utilization 0.5 > "$OUT/serve-embed.log" 2>&1 &
ep=$!
if wait_health 8200; then
  "$C" bench --workload "embed:url=http://127.0.0.1:8200,model=emb,concurrency=4,batch=64,input=512" \
    --warmup "$WARM" --duration "$DUR" --out "$OUT/serve-embed.json" 2>&1 | tee "$OUT/serve-embed.txt" || status=1
else echo "embed server did not become healthy"; tail -n 30 "$OUT/serve-embed.log"; status=1; fi
kill -INT $ep; wait $ep
exit $status
