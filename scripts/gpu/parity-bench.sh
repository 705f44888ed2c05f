#!/usr/bin/env bash
# On the GPU machine (issue 16): the dense models served by the built-in CUDA engine and by
# vLLM 0.26 at its best setting (--api-server-count 4, CUDA graphs, async scheduling; when
# installed: ../shared/vllm/README.md), one after the other in the same call, driven by the
# same `colocate bench` clients, with the copy bandwidth of the same call and, with HF=1,
# transformers' static-cache generate (compiled, CUDA graphs) at the same decode shape.
#   usage: LIMIT=540 scripts/gpu/parity-bench.sh BIN_DIR OUT_DIR
#   env:   MODELS="gen8 gen17 emb06 emb8" (default gen8 gen17), ENGINES="builtin vllm" (or
#          builtin-tiles: the built-in engine with its flash prefill off,
#          COLOCATE_PREFILL_FLASH_MIN=0, every prompt chunk on the 8-query tiles),
#          WORKLOADS="p2k p8k" (only these of each model's workloads; default all),
#          WARM=5s DUR=15s (LONG_WARM=10s LONG_DUR=30s for p2k, p8k), MEM=0.85, HF=1 (transformers at batch 64, 128 + 128; HF_TIMEOUT=240 s each)
# Workloads (issue 16's table): gen8 Qwen3-8B 128+128 at 64 and 256 concurrent, 2,048+128 and
# 8,192+128 at 32; gen17 Qwen3-1.7B 128+128 at 64 and 256; emb06 Qwen3-Embedding-0.6B
# 512-token inputs, batch 64, 4 concurrent; emb8 Qwen3-Embedding-8B 25-token inputs, batch 8,
# 64 concurrent. Random weights in the real shapes (--load-format dummy), ignore_eos.
# Results: parity-$MODEL-$ENGINE-$WORKLOAD.json, .txt and .metrics (the server's /metrics
# after the workload) and logs in OUT_DIR/parity.tgz, and
# a table (OUT_DIR/parity.md) with each workload's colocate / vLLM ratio.
# The 8B's max-model-len leaves room over 8,192 + 128: the bench's prompts land within a
# few % of the asked length by each server's own tokenizer (vLLM answered 400 to 3,535
# requests of the 8,192-token point at --max-model-len 8448, 2026-12-02). Time: gen8 and
# gen17 took about 8 minutes on the H200 with vLLM's compile cache cold; keep the call's
# limit above that, and HF=1 adds about 1.5 minutes a model.
set -uo pipefail
BIN=${1:-.gpu}; FINAL=${2:-gpu-out}; C="$BIN/colocate"
# Files go to a work folder, packed at the end into $FINAL/parity.tgz beside parity.md (a
# device call returns at most 8 files). LIMIT (seconds, default 540) is the call's budget:
# an engine is not started with less than 150 s left, nor transformers with less than 120.
LIMIT=${LIMIT:-540}; end=$(( $(date +%s) + LIMIT )); left() { echo $(( end - $(date +%s) )); }
OUT=/tmp/parity-run; rm -rf "$OUT"; mkdir -p "$FINAL"
MODELS=${MODELS:-gen8 gen17}; ENGINES=${ENGINES:-builtin vllm}
WARM=${WARM:-5s}; DUR=${DUR:-15s}; MEM=${MEM:-0.85}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_DEEP_GEMM=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
. "$(dirname "$0")/health.sh"

# The device-to-device copy rate of this call: the bandwidth a decode step is held to.
python3 - <<'PY' | tee "$OUT/parity-bandwidth.txt"
import torch, time
n = 4 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize(); t = time.time()
for _ in range(20): b.copy_(a)
torch.cuda.synchronize(); dt = time.time() - t
print(f"BANDWIDTH copy {2 * n * 20 / dt / 1e9:.0f} GB/s ({torch.cuda.get_device_name()})")
PY

# model -> "vLLM folder|preset|serve args|workloads (name=spec;...)"
model_spec() {
  case $1 in
    gen8) echo "qwen3-8b|qwen3-8b|--max-num-seqs 256 --max-model-len 9216|c64=completions:concurrency=64,input=128,output=128;c256=completions:concurrency=256,input=128,output=128;p2k=completions:concurrency=32,input=2048,output=128;p8k=completions:concurrency=32,input=8192,output=128" ;;
    gen17) echo "qwen3-1.7b|qwen3-1.7b|--max-num-seqs 256 --max-model-len 1024|c64=completions:concurrency=64,input=128,output=128;c256=completions:concurrency=256,input=128,output=128" ;;
    emb06) echo "qwen3-embedding-0.6b|qwen3-embedding-0.6b|--max-model-len 1024|b64=embed:concurrency=4,batch=64,input=512" ;;
    emb8) echo "qwen3-embedding-8b|qwen3-embedding-8b|--max-model-len 512|b8=embed:concurrency=64,batch=8,input=25" ;;
    *) return 1 ;;
  esac
}

status=0
for model in $MODELS; do
  spec=$(model_spec "$model") || { echo "unknown model $model"; status=1; continue; }
  IFS='|' read -r folder preset args workloads <<< "$spec"
  task=generate; [[ $model == emb* ]] && task=embed
  for engine in $ENGINES; do
    if [ "$(left)" -lt 150 ]; then echo "$model $engine: not started ($(left) s left of LIMIT)"; continue; fi
    log="$OUT/parity-$model-$engine.log"
    case $engine in
      builtin|builtin-tiles)
        # builtin: the engine's defaults (prompt chunks of 16 tokens and more on the flash
        # prefill kernel); builtin-tiles: every chunk on the 8-query tiles.
        flash=16; [ "$engine" = builtin-tiles ] && flash=0
        # shellcheck disable=SC2086,SC2046
        COLOCATE_PREFILL_FLASH_MIN=$flash setsid "$C" serve --device cuda --model "preset:$preset" --load-format dummy --port 8100 \
          $(tokenizer_of "$folder") --served-model-name m --task "$task" --max-num-batched-tokens 8192 \
          --gpu-memory-utilization "$MEM" $args > "$log" 2>&1 &
        wait_s=300 ;;
      vllm)
        python3 -c 'import vllm' 2>/dev/null || { echo "vllm: not installed, skipped"; continue; }
        extra=(--api-server-count 4); [ "$task" = embed ] && extra+=(--runner pooling --convert embed)
        # shellcheck disable=SC2086
        setsid python3 -m vllm.entrypoints.cli.main serve "/tmp/vllm-models/$folder" --load-format dummy \
          --port 8100 --served-model-name m --gpu-memory-utilization "$MEM" "${extra[@]}" $args > "$log" 2>&1 &
        wait_s=400 ;;
      *) echo "unknown engine $engine"; status=1; continue ;;
    esac
    pid=$!; t0=$(date +%s)
    [ "$wait_s" -gt $(( $(left) - 60 )) ] && wait_s=$(( $(left) - 60 ))
    if wait_health 8100 $wait_s; then
      echo "$model $engine: healthy after $(( $(date +%s) - t0 )) s"
      IFS=';' read -ra wls <<< "$workloads"
      k=0
      for wl in "${wls[@]}"; do
        # Each workload's own prompt texts (the same for every engine): a server's prefix
        # cache must not reuse the previous workload's prompts (vLLM's reused 31% of the
        # tokens at 256 concurrent on 2026-12-03, when every workload drew the same texts).
        k=$((k + 1))
        name=${wl%%=*}; w=${wl#*=}; kind=${w%%:*}; params=${w#*:}
        [ -n "${WORKLOADS:-}" ] && [[ " $WORKLOADS " != *" $name "* ]] && continue
        # The prompt-heavy points (p2k, p8k) take seconds a request: longer windows.
        warm=$WARM; dur=$DUR; [[ $name == p* ]] && { warm=${LONG_WARM:-10s}; dur=${LONG_DUR:-30s}; }
        "$C" bench --workload "$kind:url=http://127.0.0.1:8100,model=m,$params" \
          --warmup "$warm" --duration "$dur" --prompt-seed "$k" --out "$OUT/parity-$model-$engine-$name.json" \
          > "$OUT/parity-$model-$engine-$name.txt" 2>&1 || status=1
        # The server's own counters after the workload (cumulative since its start): for
        # colocate the step times by kind and the host's gaps between steps.
        # (no curl on the GPU machine)
        python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8100/metrics", timeout=5).read().decode())' \
          > "$OUT/parity-$model-$engine-$name.metrics" 2>&1 || true
      done
    else
      echo "$model $engine: not healthy"; tail -n 30 "$log"; status=1
    fi
    stop_group "$pid"
  done
done

if [ "${HF:-0}" = 1 ]; then
  for model in $MODELS; do
    [[ $model == gen* ]] || continue
    [ "$(left)" -ge 120 ] || { echo "transformers $model: not started ($(left) s left)"; continue; }
    t=$(( $(left) - 60 )); [ "$t" -gt "${HF_TIMEOUT:-240}" ] && t=${HF_TIMEOUT:-240}
    timeout "$t" python3 "$(dirname "$0")/hf-static-decode.py" "$model" 64 2>&1 | grep -v Warning |
      tee -a "$OUT/parity-hf.txt"
  done
fi

python3 - "$OUT" <<'PY' | tee "$OUT/parity.md"
import glob, json, os, re, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "parity-*-*-*.json"))):
    parts = os.path.basename(f)[7:-5].split("-")
    model, engine, wl = parts[0], "-".join(parts[1:-1]), parts[-1]
    try:
        w = json.load(open(f))["workloads"][0]
        if "gen" in w and w["gen"]:
            rate, unit = w["gen"]["output_throughput"], "tok/s"
        else:
            rate, unit = w["embed"]["seq_throughput"], "seq/s"
        rows.setdefault((model, wl), {})[engine] = (rate, unit, sum(w["errors"].values()))
    except Exception as e:
        rows.setdefault((model, wl), {})[engine] = (float("nan"), f"unreadable: {e!r}", 0)
hf = {}
if os.path.exists(os.path.join(out, "parity-hf.txt")):
    for line in open(os.path.join(out, "parity-hf.txt")):
        m = re.match(r"HF (\S+) B=64 .* (\d+) tok/s", line)
        if m: hf[m.group(1)] = float(m.group(2))
print(open(os.path.join(out, "parity-bandwidth.txt")).read().strip())
print()
# One column per colocate engine that ran (builtin, builtin-tiles), each with its ratio.
ours = sorted({eng for e in rows.values() for eng in e if eng != "vllm"})
fmt = lambda x: f"{x[0]:,.0f} {x[1]}" if x else "-"
head = "".join(f" {o} | {o} / vLLM |" for o in ours)
print(f"| model | workload |{head} vLLM 0.26 | transformers | errors ({', '.join(ours + ['vllm'])}) |")
print("|---|---|" + "---:|---:|" * len(ours) + "---:|---:|---|")
for (model, wl), e in rows.items():
    v = e.get("vllm")
    cells = ""
    for o in ours:
        b = e.get(o)
        ratio = f"{b[0] / v[0]:.2f}x" if b and v and v[0] > 0 else "-"
        cells += f" {fmt(b)} | {ratio} |"
    t = f"{hf[model]:.0f}" if wl == "c64" and model in hf else "-"
    errs = ", ".join(str(e[k][2]) if k in e else "-" for k in ours + ["vllm"])
    print(f"| {model} | {wl} |{cells} {fmt(v)} | {t} | {errs} |")
PY
cp "$OUT/parity.md" "$FINAL/parity.md"
tar czf "$FINAL/parity.tgz" -C /tmp parity-run && echo "results: $FINAL/parity.tgz, $FINAL/parity.md"
# (the pattern in brackets does not match this script's own command line)
pgrep -af "[v]llm.entrypoints|[c]olocate serve" && echo "WARNING: an engine is still running"
exit $status
