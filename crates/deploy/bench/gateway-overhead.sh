#!/usr/bin/env bash
# What the gateway adds to a request: one built-in engine (qwen3-tiny, dummy weights, CPU)
# under `colocate up`, 300 sequential completions of one token each (after 20 warm-up
# ones) on one keep-alive connection, directly and through the gateway; p50 and p99.
#   crates/deploy/bench/gateway-overhead.sh [path/to/colocate]
set -euo pipefail
BIN=${1:-target/debug/colocate}
DIR=$(mktemp -d)
cat > "$DIR/d.toml" <<TOML
name = "gwbench"
gpu = "cpu"
[gateway]
address = "127.0.0.1:18080"
[[engines]]
name = "gen"
model = "preset:qwen3-tiny"
served_model_name = "tiny"
load_format = "dummy"
port = 18101
TOML
"$BIN" up "$DIR/d.toml" --run-dir "$DIR/run" -q 2>/dev/null &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do curl -sf 127.0.0.1:18080/health >/dev/null && break; sleep 0.2; done
python3 "$(dirname "$0")/gateway_overhead.py"
