#!/usr/bin/env bash
# On-device check of `colocate up` under MPS (issue 6), run from the repository root on
# the GPU machine with a colocate binary built elsewhere:
#   strip -o .gpu/deploy/colocate target/debug/colocate     (here; carry .gpu/deploy)
#   crates/deploy/tests/gpu/mps-up.sh [BIN]                  (there)
# Brings up FILE (default tests/gpu/mps-torch.toml: two torch CUDA clients, MPS 60/40;
# FILE=examples/deploy-h100-builtin-mps.toml MODEL_A=qwen3-0.6b MODEL_B=qwen3-embedding-0.6b
# once the built-in engine has its CUDA backend in `serve`),
# serves both models through the gateway, kills one engine with SIGKILL and checks that
# both are restarted (the MPS shared-fault rule), then SIGTERMs `up` and checks that no
# engine and no MPS daemon is left. Never touches clocks, power, compute mode or MIG.
set -uo pipefail
BIN=${1:-.gpu/deploy/colocate}
OUT=${OUT:-/tmp/deploy-gpu-out}
RUN=/tmp/deploy-mps-run
FILE=${FILE:-crates/deploy/tests/gpu/mps-torch.toml}
MODEL_A=${MODEL_A:-gen}; MODEL_B=${MODEL_B:-embed}
mkdir -p "$OUT"; rm -rf "$RUN"
export COLOCATE_BIN="$PWD/$BIN" RUST_LOG=info
fails=0
check() { if eval "$1"; then echo "PASS: $2"; else echo "FAIL: $2"; fails=$((fails + 1)); fi; }
js() { python3 -c "import json,sys; s=json.load(open('$RUN/state.json')); print($1)"; }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step device; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv
step plan; "$BIN" plan "$FILE"
step up
"$BIN" up "$FILE" --run-dir "$RUN" --quiet > "$OUT/up.log" 2>&1 &
UP=$!
for i in $(seq 1 300); do
  [ -f "$RUN/state.json" ] && [ "$(js 's["phase"]')" = running ] && break
  kill -0 $UP 2>/dev/null || break
  sleep 1
done
check '[ "$(js "s[\"phase\"]")" = running ]' "up reached running in ${i}s"
if [ "$(js 's["phase"]')" != running ]; then tail -30 "$OUT/up.log"; exit 1; fi
"$BIN" status "$RUN"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee "$OUT/apps-before.csv"
curl -s 127.0.0.1:8001/v1/completions -d '{}' | tee "$OUT/client-a.json"; echo
curl -s 127.0.0.1:8002/v1/completions -d '{}' | tee "$OUT/client-b.json"; echo
# The pinned limit is enforced (issue 15): each client allocated up to its limit and no
# further (it tried 1 GiB past it), while cudaMemGetInfo's total stays the whole GPU.
for c in a b; do
  f=$OUT/client-$c.json
  v() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$f" "$1"; }
  lim=$(v pinned_limit_mib); got=$(v allocatable_mib); tot=$(v total_mib)
  check '[ "$lim" != None ] && [ "$got" -le "$lim" ] && [ "$got" -ge $((lim / 2)) ]' \
    "client $c allocated $got MiB under its pinned limit of $lim MiB (tried $((lim + 1024)))"
  check '[ "$tot" -gt $((lim * 4)) ]' "client $c: cudaMemGetInfo total $tot MiB is the whole GPU, not the limit"
done
step gateway
curl -s 127.0.0.1:8000/v1/models; echo
C=$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
  -d "{\"model\":\"$MODEL_A\",\"prompt\":\"Hello\",\"max_tokens\":8,\"temperature\":0}")
check '[ "$C" = 200 ]' "completion through the gateway ($C)"
E=$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8000/v1/embeddings -H 'content-type: application/json' \
  -d "{\"model\":\"$MODEL_B\",\"input\":[\"a\",\"b\"]}")
check '[ "$E" = 200 ]' "embeddings through the gateway ($E)"
step "kill -9 gen under MPS"
GEN=$(js 's["instances"][0]["pid"]'); EMB=$(js 's["instances"][1]["pid"]')
kill -9 "$GEN"
for i in $(seq 1 300); do
  [ "$(js 'all(x["restarts"]==1 and x["state"]=="healthy" for x in s["instances"])')" = True ] && break
  sleep 1
done
"$BIN" status "$RUN"
check '[ "$(js "all(x[\"restarts\"]==1 for x in s[\"instances\"])")" = True ]' "both engines restarted after ${i}s"
check '! kill -0 $EMB 2>/dev/null' "the innocent client was stopped before the restart"
C=$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
  -d "{\"model\":\"$MODEL_A\",\"prompt\":\"Hello\",\"max_tokens\":8,\"temperature\":0}")
check '[ "$C" = 200 ]' "completion after the restart ($C)"
PIDS="$GEN $EMB $(js '" ".join(str(x["pid"]) for x in s["instances"])')"
step "SIGTERM up"
kill -TERM $UP; wait $UP; echo "up exited with $?"
check '[ "$(js "s[\"phase\"]")" = stopped ]' "state phase stopped"
for p in $PIDS; do check '! kill -0 $p 2>/dev/null' "engine $p gone"; done
check '! pgrep -f "nvidia-cuda-mps-control|nvidia-cuda-mps-server" >/dev/null' "no MPS daemon left"
pgrep -af nvidia-cuda-mps || true
cp "$RUN/state.json" "$OUT/"; cp "$RUN"/logs/*.log "$OUT/" 2>/dev/null; cp "$RUN/mps/log/control.log" "$RUN/mps/log/server.log" "$OUT/" 2>/dev/null
echo; echo "== summary: $fails failed =="
exit $fails
