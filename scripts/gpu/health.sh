# Sourced by the GPU scripts: wait_health PORT [SECONDS] waits (120 s by default) for
# http://127.0.0.1:PORT/health to answer 200. The GPU machine has no curl: Python polls.
wait_health() {
  python3 - "$1" "${2:-120}" <<'PY'
import sys, time, urllib.request
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2).status == 200: sys.exit(0)
    except Exception: pass
    time.sleep(0.5)
sys.exit(1)
PY
}
# tokenizer_of FOLDER: `--tokenizer /tmp/vllm-models/FOLDER` when vLLM's carried model folder
# has a tokenizer.json (installed with vLLM, ../shared/vllm/), so that a built-in preset
# counts a prompt as the real model and vLLM do; nothing (and a note on stderr) otherwise:
# the preset then counts one token per byte of text.
tokenizer_of() {
  if [ -f "/tmp/vllm-models/$1/tokenizer.json" ]; then echo "--tokenizer /tmp/vllm-models/$1"
  else echo "note: no /tmp/vllm-models/$1/tokenizer.json: the built-in engine counts bytes as tokens" >&2; fi
}
# scrape PORT FILE: http://127.0.0.1:PORT/metrics into FILE (empty when it does not answer
# within 5 s).
scrape() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read()
except Exception:
    text = b""
open(sys.argv[2], "wb").write(text)
PY
}
# stop_group PID: SIGINT to the process group PID leads (a server started with setsid, vLLM's
# API servers and EngineCore with it), up to 30 s for it to go, then SIGKILL; reaps PID.
stop_group() {
  kill -INT -- "-$1" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 -- "-$1" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$1" 2>/dev/null
  wait "$1" 2>/dev/null
}
