#!/usr/bin/env bash
# On the GPU machine, after ../shared/vllm's install-on-device.sh put vLLM in /tmp/site and
# the model folders in /tmp/vllm-models: records what colocate's vLLM adapter and the lab's
# /metrics scraper are tested against on CPU (testdata/vllm/):
#   version.txt                  vllm.__version__
#   help-all.txt                 `vllm serve --help=all` (the flag check's reference)
#   models-{gen,embed}.json      GET /v1/models
#   metrics-{gen,embed}-*.txt    GET /metrics idle and after traffic
#   responses.txt                completions (plain, streamed with usage), embeddings
#                                (float, base64), and the error bodies of bad requests
# Both servers run at once (a generator and an embedder, random weights), then the whole
# process group of each is stopped. Everything lands in $OUT/vllm-record.tgz.
#   usage: scripts/gpu/vllm-record.sh [GEN_MODEL] [EMBED_MODEL]
set -uo pipefail
GEN=${1:-qwen3-1.7b}
EMB=${2:-qwen3-embedding-0.6b}
REC=/tmp/vllm-record
rm -rf "$REC" && mkdir -p "$REC"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_USE_DEEP_GEMM=0
VLLM=(python3 -m vllm.entrypoints.cli.main)

python3 -c 'import vllm; print(vllm.__version__)' > "$REC/version.txt" 2>&1
"${VLLM[@]}" serve --help=all > "$REC/help-all.txt" 2>&1
"${VLLM[@]}" serve --help > "$REC/help.txt" 2>&1

# no curl on the GPU machine: a tiny python client
HTTP='import sys,urllib.request as u,urllib.error as e
url,body=sys.argv[1],(sys.argv[2].encode() if len(sys.argv)>2 else None)
r=u.Request(url,body,{"Content-Type":"application/json"} if body is not None else {})
try:
    x=u.urlopen(r,timeout=120); code=x.status; data=x.read()
except e.HTTPError as h:
    code=h.code; data=h.read()
except Exception as ex:
    code=0; data=repr(ex).encode()
sys.stdout.write(data.decode(errors="replace")+"\n### status %d\n" % code)
sys.exit(0 if 200<=code<300 else 1)'
http() { python3 -c "$HTTP" "$@"; }
up() { http "http://localhost:$1/health" > /dev/null 2>&1; }
# One at a time, as colocate's supervisor starts engines: vLLM sizes its KV cache from
# the memory free while it profiles, so a neighbour starting at the same moment makes
# one of them fail with "No available memory for the cache blocks" (seen on the H200).
GPID=0 EPID=0
alive() { [ "$1" != 0 ] && kill -0 -- "-$1" 2>/dev/null; }
stop() {
  for p in $GPID $EPID; do [ "$p" != 0 ] && kill -INT -- "-$p" 2>/dev/null; done
  for _ in $(seq 1 30); do alive $GPID || alive $EPID || break; sleep 1; done
  for p in $GPID $EPID; do [ "$p" != 0 ] && kill -KILL -- "-$p" 2>/dev/null; done
}
trap stop EXIT
wait_up() { # port pid
  local t0; t0=$(date +%s)
  while [ $(( $(date +%s) - t0 )) -lt 400 ]; do
    up "$1" && { echo "port $1 healthy after $(( $(date +%s) - t0 )) s" | tee -a "$REC/startup.txt"; return 0; }
    kill -0 "$2" 2>/dev/null || break
    sleep 2
  done
  echo "port $1 did not come up" | tee -a "$REC/startup.txt"; return 1
}
setsid "${VLLM[@]}" serve "/tmp/vllm-models/$GEN" --served-model-name "$GEN" --load-format dummy \
  --port 8101 --gpu-memory-utilization 0.40 --max-model-len 4096 > "$REC/serve-gen.log" 2>&1 &
GPID=$!
wait_up 8101 $GPID
setsid "${VLLM[@]}" serve "/tmp/vllm-models/$EMB" --served-model-name "$EMB" --load-format dummy \
  --runner pooling --convert embed --port 8201 --gpu-memory-utilization 0.20 --max-model-len 512 \
  > "$REC/serve-embed.log" 2>&1 &
EPID=$!
wait_up 8201 $EPID

get() { http "http://$1"; }
post() { # port path body
  echo "### POST :$1$2 $3" >> "$REC/responses.txt"
  http "http://localhost:$1$2" "$3" >> "$REC/responses.txt" 2>&1
}
get localhost:8101/v1/models > "$REC/models-gen.json"
get localhost:8201/v1/models > "$REC/models-embed.json"
get localhost:8101/metrics > "$REC/metrics-gen-idle.txt"
get localhost:8201/metrics > "$REC/metrics-embed-idle.txt"

post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Write a detailed essay about the history of computing\",\"max_tokens\":16,\"temperature\":0}"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Hello\",\"max_tokens\":4,\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
post 8101 /v1/chat/completions "{\"model\":\"$GEN\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":4,\"stream\":true}"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Hello\",\"max_tokens\":1000000000000}"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Hello\",\"max_tokens\":-1}"
post 8101 /v1/completions "{\"model\":\"nope\",\"prompt\":\"Hello\",\"max_tokens\":4}"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Hello\",\"max_tokens\":\"four\"}"
post 8101 /v1/completions "{not json"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":[999999999],\"max_tokens\":4}"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Hello\",\"max_tokens\":4,\"temperature\":-1}"
post 8101 /v1/completions "{\"model\":\"$GEN\",\"prompt\":\"Hello\",\"max_tokens\":4,\"n\":0}"
post 8101 /v1/embeddings "{\"model\":\"$GEN\",\"input\":\"hello\"}"
post 8201 /v1/embeddings "{\"model\":\"$EMB\",\"input\":[\"hello world\",\"second\"],\"encoding_format\":\"float\"}"
post 8201 /v1/embeddings "{\"model\":\"$EMB\",\"input\":\"hello world\",\"encoding_format\":\"base64\"}"
post 8201 /v1/embeddings "{\"model\":\"$EMB\",\"input\":\"hello world\",\"dimensions\":32}"
post 8201 /v1/embeddings "{\"model\":\"$EMB\",\"input\":\"hello world\",\"dimensions\":0}"
post 8201 /v1/embeddings "{\"model\":\"$EMB\",\"input\":\"\"}"
post 8201 /v1/embeddings "{\"model\":\"$EMB\",\"input\":[]}"
post 8201 /v1/completions "{\"model\":\"$EMB\",\"prompt\":\"hello\",\"max_tokens\":4}"
# some traffic, then the counters again
pids=()
for i in $(seq 1 32); do
  http http://localhost:8101/v1/completions "{\"model\":\"$GEN\",\"prompt\":\"sample $i\",\"max_tokens\":64,\"ignore_eos\":true}" > /dev/null &
  pids+=($!)
  http http://localhost:8201/v1/embeddings "{\"model\":\"$EMB\",\"input\":[\"sentence $i a\",\"sentence $i b\"]}" > /dev/null &
  pids+=($!)
done
sleep 1
get localhost:8101/metrics > "$REC/metrics-gen-busy.txt"
wait "${pids[@]}"
get localhost:8101/metrics > "$REC/metrics-gen-after.txt"
get localhost:8201/metrics > "$REC/metrics-embed-after.txt"
stop
trap - EXIT
sleep 2
echo "left over vllm processes: $(pgrep -fc vllm.entrypoints || true)" | tee -a "$REC/startup.txt"
tar czf "${OUT:-/tmp}/vllm-record.tgz" -C /tmp vllm-record && echo "recorded: ${OUT:-/tmp}/vllm-record.tgz"
