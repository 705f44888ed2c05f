#!/usr/bin/env bash
# On-device check that the supervisor hears MPS faults (issue 13, item 5), run from the
# repository root on the GPU machine with a colocate binary built elsewhere:
#   strip -o .gpu/deploy/colocate target/debug/colocate     (here; carry .gpu/deploy)
#   crates/deploy/tests/gpu/mps-fault.sh [BIN]               (there)
# Brings up tests/gpu/mps-torch.toml (two torch CUDA clients under one MPS daemon), makes
# `gen` write through a wild pointer (POST /fault), and checks: the fault is in the MPS
# server log, the supervisor recorded it naming both engines, stopped the clients (their
# processes live on after the sticky error, /health still 200) and restarted both; the
# gateway serves again; `colocate status` shows the fault; SIGTERM leaves nothing behind.
# Never touches clocks, power, compute mode or MIG.
set -uo pipefail
BIN=${1:-.gpu/deploy/colocate}
OUT=${OUT:-/tmp/deploy-gpu-out}
RUN=/tmp/deploy-mps-fault-run
FILE=crates/deploy/tests/gpu/mps-torch.toml
mkdir -p "$OUT"; rm -rf "$RUN"
export COLOCATE_BIN="$PWD/$BIN" RUST_LOG=info
fails=0
check() { if eval "$1"; then echo "PASS: $2"; else echo "FAIL: $2"; fails=$((fails + 1)); fi; }
js() { python3 -c "import json,sys; s=json.load(open('$RUN/state.json')); f=[x for x in s.get('mps_faults', []) if x['kind']=='client_fault']; print($1)"; }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step device; nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv,noheader
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
GEN=$(js 's["instances"][0]["pid"]'); EMB=$(js 's["instances"][1]["pid"]')
check '[ "$(js "s[\"mps_faults_total\"]")" = 0 ]' "no fault before"

step "wild write in gen"
curl -s -m 60 -X POST 127.0.0.1:8001/fault -d '{}'; echo
for i in $(seq 1 120); do
  [ "$(js 'all(x["restarts"]==1 and x["state"]=="healthy" for x in s["instances"]) and len(f)>=1 and (f[0]["action"] or "").endswith("restarted")')" = True ] && break
  sleep 1
done
"$BIN" status "$RUN" | tee "$OUT/status.txt"
check '[ "$(js "s[\"mps_faults_total\"]")" = 1 ] && [ "$(js "len(f)")" = 1 ]' "the supervisor recorded one fault, a client fault"
check '[ "$(js "\",\".join(sorted(set(c[\"engine\"] or \"-\" for c in f[0][\"clients\"])))")" = embed,gen ]' "the fault names both engines"
check '[ "$(js "\",\".join(c[\"engine\"] or \"-\" for c in f[0][\"clients\"] if c[\"culprit\"])")" = gen ]' "gen, which wrote through the wild pointer, is named as the culprit"
check '[ "$(js "[x[\"failures\"] for x in s[\"instances\"]]")" = "[1, 0]" ]' "only the culprit is charged a failure"
check '[ "$(js "all(x[\"restarts\"]==1 for x in s[\"instances\"])")" = True ]' "both engines restarted after ${i}s"
check '! kill -0 $GEN 2>/dev/null && ! kill -0 $EMB 2>/dev/null' "both faulted clients were stopped"
check 'grep -q "MPS faults: " "$OUT/status.txt" && grep -q "action: every engine of the GPU (gen, embed) restarted" "$OUT/status.txt"' "status shows the fault and the restart"
check 'grep -q "sticky error" "$RUN/mps/log/server.log"' "the MPS server logged the sticky error"
C=$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d '{"model":"gen","prompt":"Hello"}')
check '[ "$C" = 200 ]' "gen answers through the gateway after the restart ($C)"
E=$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d '{"model":"embed","prompt":"Hello"}')
check '[ "$E" = 200 ]' "embed answers through the gateway after the restart ($E)"
PIDS="$GEN $EMB $(js '" ".join(str(x["pid"]) for x in s["instances"])')"
step "SIGTERM up"
kill -TERM $UP; wait $UP; echo "up exited with $?"
check '[ "$(js "s[\"phase\"]")" = stopped ]' "state phase stopped"
for p in $PIDS; do check '! kill -0 $p 2>/dev/null' "engine $p gone"; done
check '! pgrep -f "nvidia-cuda-mps-control -d|nvidia-cuda-mps-server" >/dev/null' "no MPS daemon left"
cp "$RUN/state.json" "$OUT/"; cat "$RUN"/logs/*.log > "$OUT/engines.log" 2>/dev/null
cp "$RUN/mps/log/control.log" "$RUN/mps/log/server.log" "$OUT/" 2>/dev/null
echo; echo "== summary: $fails failed =="
exit $fails
