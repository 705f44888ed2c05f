#!/usr/bin/env bash
# On the GPU machine: the seeds' generator, Qwen3-30B-A3B-FP8 with random weights, served
# by the built-in CUDA engine and (when vLLM is installed, ../shared/vllm/README.md) by
# vLLM 0.26, one after the other in the same call, driven by the same `colocate bench`
# clients: the seeds' workload (one ~30-token prompt, 512 tokens, ignore_eos) at each
# concurrency of $CONCS, and 128 + 128 at 64 concurrent. The built-in engine reads Qwen3's
# tokenizer from vLLM's model folder (`--tokenizer`, health.sh's tokenizer_of), so both
# engines count the seeds' prompt as 32 tokens; without it the preset counted 185 (bytes of
# the chat-templated text), as in every run up to 2026-12-03.
#   usage: scripts/gpu/moe-bench.sh BIN_DIR OUT_DIR      (ENGINES="builtin vllm" by default)
# Each engine's results: $OUT/moe-$ENGINE-seed-$CONC.json, moe-$ENGINE-128x128.json, its
# /metrics before and after each concurrency (moe-$ENGINE-seed-$CONC.{before,after}.prom)
# and its log; a summary table last, and for the built-in engine where a served step's time
# went over each run (its step-time and host-gap histograms, after minus before).
set -uo pipefail
BIN=${1:-.gpu}; OUT=${2:-gpu-out}; C="$BIN/colocate"
ENGINES=${ENGINES:-builtin vllm}
CONCS=${CONCS:-64 512 1024}
WARM=${WARM:-20s}; DUR=${DUR:-40s}
MEM=${MEM:-0.85}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_DEEP_GEMM=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

. "$(dirname "$0")/health.sh"

status=0
for engine in $ENGINES; do
  log="$OUT/moe-$engine.log"
  case $engine in
    builtin)
      # shellcheck disable=SC2046
      setsid "$C" serve --device cuda --model preset:qwen3-30b-a3b-fp8 --load-format dummy --port 8100 \
        $(tokenizer_of qwen3-30b-a3b-fp8) --served-model-name gen --max-num-seqs 1024 --max-num-batched-tokens 8192 --max-model-len 1024 \
        --gpu-memory-utilization "$MEM" > "$log" 2>&1 &
      wait_s=240 ;;
    vllm)
      python3 -c 'import vllm' 2>/dev/null || { echo "vllm: not installed, skipped"; continue; }
      setsid python3 -m vllm.entrypoints.cli.main serve /tmp/vllm-models/qwen3-30b-a3b-fp8 --load-format dummy \
        --port 8100 --served-model-name gen --max-num-seqs 1024 --max-num-batched-tokens 8192 --max-model-len 1024 \
        --gpu-memory-utilization "$MEM" > "$log" 2>&1 &
      wait_s=400 ;;
    *) echo "unknown engine $engine"; status=1; continue ;;
  esac
  pid=$!
  t0=$(date +%s)
  if wait_health 8100 $wait_s; then
    echo "$engine: healthy after $(( $(date +%s) - t0 )) s"
    for c in $CONCS; do
      scrape 8100 "$OUT/moe-$engine-seed-$c.before.prom"
      "$C" bench --workload "seed-gen:url=http://127.0.0.1:8100,model=gen,concurrency=$c" \
        --warmup "$WARM" --duration "$DUR" --out "$OUT/moe-$engine-seed-$c.json" > "$OUT/moe-$engine-seed-$c.txt" 2>&1 || status=1
      scrape 8100 "$OUT/moe-$engine-seed-$c.after.prom"
    done
    "$C" bench --workload "completions:url=http://127.0.0.1:8100,model=gen,concurrency=64,input=128,output=128" \
      --warmup 5s --duration 20s --out "$OUT/moe-$engine-128x128.json" > "$OUT/moe-$engine-128x128.txt" 2>&1 || status=1
  else
    echo "$engine: not healthy"; tail -n 30 "$log"; status=1
  fi
  stop_group "$pid"
done

python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
print("| engine | workload | output tok/s | TPOT p50 ms | TTFT p50 ms | TTFT p99 ms | errors |")
print("|---|---|---:|---:|---:|---:|---:|")
for f in sorted(glob.glob(os.path.join(out, "moe-*.json"))):
    eng, _, rest = os.path.basename(f)[4:-5].partition("-")
    try:
        w = json.load(open(f))["workloads"][0]
        g = w["gen"]
        p = lambda s, k: s["median"] if k == "p50" else s["percentiles"].get(k, float("nan"))
        print(f"| {eng} | {rest} | {g['output_throughput']:.0f} | {p(g['tpot_ms'], 'p50'):.1f} | "
              f"{p(g['ttft_ms'], 'p50'):.0f} | {p(g['ttft_ms'], 'p99'):.0f} | {sum(w['errors'].values())} |")
    except Exception as e:
        print(f"| {eng} | {rest} | unreadable: {e!r} |")

# The built-in engine's own account of each run (warm-up included): decode steps, steps
# with prompts, and the host's gap between steps, as means over the run.
def totals(path):
    t = {}
    for line in open(path):
        for name in ("colocate:engine_step_seconds", "colocate:engine_step_gap_seconds"):
            for part in ("_sum", "_count"):
                if line.startswith(name + part):
                    key, _, val = line.rpartition(" ")
                    t[key.strip()] = float(val)
    return t
rows = []
for after in sorted(glob.glob(os.path.join(out, "moe-builtin-seed-*.after.prom"))):
    before = after.replace(".after.", ".before.")
    try:
        a, b = totals(after), totals(before)
    except OSError:
        continue
    d = lambda k: a.get(k, 0.0) - b.get(k, 0.0)
    def mean(base, label=""):
        n = d(f"{base}_count{label}")
        return (f"{1e3 * d(f'{base}_sum{label}') / n:.2f} ms ({n:.0f})" if n else "-")
    step = "colocate:engine_step_seconds"
    rows.append((after.split("-seed-")[1].split(".")[0],
                 mean(step, '{kind="decode"}'), mean(step, '{kind="mixed"}'),
                 mean("colocate:engine_step_gap_seconds")))
if rows:
    print()
    print("| built-in, concurrency | decode step (count) | step with prompts (count) | host gap (count) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
PY
exit $status
