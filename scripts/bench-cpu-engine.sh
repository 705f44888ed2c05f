#!/usr/bin/env bash
# CPU throughput of the built-in engine through its HTTP API:
#   - qwen3-tiny (dummy weights) generation: closed loop at several concurrencies,
#     fixed output length (ignore_eos), output tokens counted from `usage`;
#   - all-MiniLM-L6-v2 embeddings: closed loop, batches of sentences per request.
# Prints a markdown table (paste into docs/bench/cpu-engine.md).
#
# Usage: scripts/bench-cpu-engine.sh [seconds-per-point]   (default 10)
# Env:   BIN=path/to/colocate (default target/debug/colocate, built if missing)
#        CONCURRENCY="1 4 16 64"  PROMPT_LEN=128  OUTPUT_LEN=128  EMBED_BATCH=32
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
BIN=${BIN:-target/debug/colocate}
CONCURRENCY=${CONCURRENCY:-"1 4 16 64"}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
EMBED_BATCH=${EMBED_BATCH:-32}
[ -x "$BIN" ] || cargo build -p colocate
scripts/fetch-minilm.sh

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_health() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on port $1 never became healthy" >&2; exit 1
}

GEN_PORT=$(free_port)
"$BIN" serve --model preset:qwen3-tiny --load-format dummy --port "$GEN_PORT" \
  --served-model-name tiny --kv-cache-memory 256Mi 2>/tmp/bench-cpu-gen.log &
pids+=($!)
EMB_PORT=$(free_port)
"$BIN" serve --model models/all-minilm-l6-v2 --task embed --port "$EMB_PORT" \
  --served-model-name minilm 2>/tmp/bench-cpu-embed.log &
pids+=($!)
wait_health "$GEN_PORT"
wait_health "$EMB_PORT"

# Closed-loop driver: N threads each send a request as soon as the previous one returns;
# counts what finished inside the window (non-streamed requests, so the client does almost
# no work per token and stays far from being the bottleneck on 2 cores).
python3 - "$GEN_PORT" "$EMB_PORT" "$DURATION" "$PROMPT_LEN" "$OUTPUT_LEN" "$EMBED_BATCH" $CONCURRENCY <<'EOF'
import http.client, json, sys, threading, time
gen_port, emb_port, dur, plen, olen, ebatch = map(int, sys.argv[1:7])
concs = [int(c) for c in sys.argv[7:]]

def closed_loop(port, path, body, conc, duration, count):
    stop = time.monotonic() + duration
    totals = []
    lat = []
    lock = threading.Lock()
    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        n = 0
        while time.monotonic() < stop:
            t0 = time.monotonic()
            c.request("POST", path, body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                raise SystemExit(f"HTTP {r.status}: {data[:200]}")
            t1 = time.monotonic()
            if t1 <= stop:
                n += count(json.loads(data))
                with lock:
                    lat.append(t1 - t0)
        with lock:
            totals.append(n)
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(conc)]
    for t in ts: t.start()
    for t in ts: t.join()
    lat.sort()
    p50 = lat[len(lat) // 2] if lat else float("nan")
    return sum(totals) / duration, len(lat), p50

prompt = "x" * plen  # byte-level tokenizer: one token per byte
gen_body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": olen,
                       "ignore_eos": True, "temperature": 0})
# Warm-up.
closed_loop(gen_port, "/v1/completions", gen_body, 2, 1, lambda v: 0)
print(f"| workload | concurrency | throughput | requests | p50 latency |")
print(f"|---|---|---|---|---|")
for c in concs:
    tps, n, p50 = closed_loop(gen_port, "/v1/completions", gen_body, c, dur,
                              lambda v: v["usage"]["completion_tokens"])
    print(f"| qwen3-tiny gen {plen}+{olen} | {c} | {tps:,.0f} output tok/s | {n} | {p50*1000:.0f} ms |", flush=True)
sentences = [f"The quick brown fox number {i} jumps over the lazy dog near the river bank." for i in range(ebatch)]
emb_body = json.dumps({"model": "minilm", "input": sentences})
closed_loop(emb_port, "/v1/embeddings", emb_body, 1, 1, lambda v: 0)
for c in [1, 4]:
    sps, n, p50 = closed_loop(emb_port, "/v1/embeddings", emb_body, c, dur, lambda v: len(v["data"]))
    print(f"| MiniLM embed, batch {ebatch} (~19 tokens each) | {c} | {sps:,.0f} seq/s | {n} | {p50*1000:.0f} ms |", flush=True)
EOF
