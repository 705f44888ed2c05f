#!/usr/bin/env bash
# The client benchmark of docs/bench/bench-client.md: can one `colocate bench` process on
# 2 cores drive 512 streams (22,000 tok/s and beyond) plus 500 embed seq/s?
# The mock server gets its own cores (taskset), the client exactly 2.
# Usage: crates/bench/scripts/client-bench.sh [path/to/client_bench]
# (needs >= 6 cores; default binary: target/release/examples/client_bench, built if missing)
set -euo pipefail
cd "$(dirname "$0")/../../.."
BIN=${1:-target/release/examples/client_bench}
[ -x "$BIN" ] || cargo build --release -p bench --example client_bench
NCPU=$(nproc)
SERVER_CPUS="2-$((NCPU - 1))"
DUR=${DUR:-15s}
WARM=${WARM:-3s}
run_case() { # token delay (us), label
  local delay=$1 label=$2
  taskset -c "$SERVER_CPUS" "$BIN" serve --port 18100 --threads $((NCPU - 2)) --token-delay-us "$delay" >/dev/null 2>&1 &
  local gen=$!
  taskset -c "$SERVER_CPUS" "$BIN" serve --port 18200 --threads 2 --embed-delay-ms 50 --embed-dim 4096 >/dev/null 2>&1 &
  local emb=$!
  sleep 1
  echo "=== $label: gen 512 streams, token pause ${delay} us; embed open loop 8 req/s x 64 seq (dim 4096) ==="
  taskset -c 0,1 "$BIN" client \
    --workload "gen:url=http://127.0.0.1:18100,model=mock,concurrency=512,input=128,output=512" \
    --workload "embed:url=http://127.0.0.1:18200,model=mock,rate=8,batch=64,input=512" \
    --warmup "$WARM" --duration "$DUR" --seed 1 | grep -E "^(RESULT|client process|whole run)"
  kill "$gen" "$emb"; wait "$gen" "$emb" 2>/dev/null || true
}
echo "device: $(lscpu | grep 'Model name' | sed 's/.*: *//'), $NCPU cores; $(date -u +%FT%TZ)"
run_case 23000 "seed load (~22k tok/s)"
run_case 10000 "2.3x seed load"
run_case 4000 "5.8x seed load"
run_case 0 "as fast as the server streams"
