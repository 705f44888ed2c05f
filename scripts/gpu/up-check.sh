#!/usr/bin/env bash
# On the GPU machine (carry .gpu): brings up each recommended deployment with `colocate up`,
# sends one completion and one embedding through its gateway, shows `colocate status`, then
# stops it with SIGTERM and checks that no engine or MPS daemon is left.
#   scripts/gpu/up-check.sh examples/up-h100-gen-embed.toml examples/up-h100-gen-embed-8b.toml
#   UP_WAIT=480 scripts/gpu/up-check.sh examples/deploy-h200-vllm.toml   # vLLM: 70-150 s per engine
set -uo pipefail
UP_WAIT=${UP_WAIT:-120}; export UP_WAIT
C=${COLOCATE:-.gpu/colocate}; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; status=0
gw() { # path, json body
  python3 - "$1" "$2" <<'PY'
import json, sys, urllib.request
import os
req = urllib.request.Request("http://" + os.environ["GW"] + sys.argv[1], data=sys.argv[2].encode(),
                             headers={"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=60))
if "data" in r: print("embedding: %d vectors of %d floats" % (len(r["data"]), len(r["data"][0]["embedding"])), "usage", r["usage"])
else: print("completion:", repr(r["choices"][0]["text"][:40]), "usage", r["usage"])
PY
}
for f in "$@"; do
  name=$(basename "$f" .toml); run=/tmp/up-$name; rm -rf "$run"
  export GW=$(grep -m1 '^address' "$f" | cut -d'"' -f2); GW=${GW:-127.0.0.1:8000}
  echo "== $f"
  "$C" up "$f" --run-dir "$run" --quiet > "$OUT/$name.log" 2>&1 &
  up=$!
  # up to UP_WAIT s for the gateway to list both models
  if python3 - <<'PY'
import json, sys, time, urllib.request
import os
for _ in range(2 * int(os.environ["UP_WAIT"])):
    try:
        if len(json.load(urllib.request.urlopen("http://" + __import__("os").environ["GW"] + "/v1/models", timeout=2))["data"]) >= 2: sys.exit(0)
    except Exception: pass
    time.sleep(0.5)
sys.exit(1)
PY
  then
    model_gen=$(grep -m1 '^served_model_name' "$f" | cut -d'"' -f2)
    model_emb=$(grep '^served_model_name' "$f" | sed -n 2p | cut -d'"' -f2)
    gw /v1/completions "{\"model\":\"$model_gen\",\"prompt\":\"hello\",\"max_tokens\":16}" || status=1
    gw /v1/embeddings "{\"model\":\"$model_emb\",\"input\":[\"a\",\"b c\"]}" || status=1
    "$C" status "$run"
  else echo "gateway did not list both models"; tail -n 20 "$OUT/$name.log"; status=1; fi
  kill -TERM $up; wait $up; echo "up exit $?"
  sleep 2
  pgrep -af "colocate serve|vllm.entrypoints|EngineCore" && { echo "WARNING: engine left"; status=1; } || echo "no engine left"
  pgrep -a nvidia-cuda-mps | grep -v defunct && { echo "WARNING: MPS daemon left"; status=1; } || echo "no MPS daemon left"
done
exit $status
