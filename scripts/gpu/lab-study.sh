#!/usr/bin/env bash
# On the GPU machine (carry .gpu, made by scripts/gpu/prepare.sh): runs or resumes the GPU
# study's lab runs one after another inside one device call's time limit, and packs each
# run folder into $OUT/<name>.tgz so that the results come back even when time runs out.
#   LIMIT=560 scripts/gpu/lab-study.sh examples/h100-gen-embed.toml:pair-a examples/h100-gen-embed-8b.toml:pair-b
# A run folder lives in .gpu/runs/<name>: unpack the returned .tgz there (here) and carry
# .gpu again; the next call resumes it (`colocate lab run --resume`). An interrupted window
# is measured again on resume; the lab stops its engines and quits its MPS daemon on SIGINT.
# Env: BIN (default .gpu: colocate and runs/), LAB_ARGS (extra `lab run` arguments for a new
# run, e.g. "--repetitions 1 --warmup 15s --duration 30s"; a resumed run keeps its own),
# RETRY=1 (a resumed run measures its failed conditions again: `--retry-failed`), REDO=TEXT
# (a resumed run measures again the conditions whose id contains TEXT: `--redo`), REPS=N (a
# resumed run gains repetitions up to N, each deployment's measured after one start:
# `--repetitions`), ONLY="A B"
# (new and resumed runs measure only the conditions whose id contains A or B: `--only`,
# which a run folder does not keep), GPUS=N
# (the studies need N GPUs: stop at once on a machine with fewer, before any engine starts),
# VLLM_CACHE=FILE (vLLM's compile caches saved by scripts/gpu/vllm-cache.sh, restored before
# the first start: about a minute of each cold vLLM start; carry .vllm/vllm-cache.tgz).
# Two GPUs (issue 19, device kind nvidia-h200-x2), e.g. the four TP layouts:
#   GPUS=2 LIMIT=560 LAB_ARGS="--repetitions 1 --warmup 15s --duration 30s" \
#       scripts/gpu/lab-study.sh examples/h200x2-tp2.toml:h200x2-tp2
# device.txt then lists every GPU and their interconnect (`nvidia-smi topo -m`). NVLink
# multicast stays off for everything started here (the lent machines require it; deploy
# also sets it on every engine across GPUs).
set -uo pipefail
LIMIT=${LIMIT:-560}; OUT=${OUT:-gpu-out}; BIN=${BIN:-.gpu}; C=$BIN/colocate
mkdir -p "$BIN/runs" "$OUT"
end=$(( $(date +%s) + LIMIT ))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
have=$(nvidia-smi -L | grep -c '^GPU ')
if [ "$have" -gt 1 ]; then nvidia-smi topo -m >> "$OUT/device.txt" 2>&1; fi
if [ -n "${GPUS:-}" ] && [ "$have" -lt "$GPUS" ]; then
  echo "lab-study: these studies need $GPUS GPUs and this machine has $have (use the nvidia-h200-x$GPUS kind)" | tee -a "$OUT/device.txt" >&2
  exit 2
fi
if [ -n "${VLLM_CACHE:-}" ]; then
  "$(dirname "$0")/vllm-cache.sh" restore "$VLLM_CACHE" || echo "lab-study: no compile cache restored; vLLM starts cold"
fi
for spec in "$@"; do
  exp=${spec%%:*}; name=${spec##*:}; run=$BIN/runs/$name
  left=$(( end - $(date +%s) ))
  if [ "$left" -lt 60 ]; then echo "== $name: not started (${left}s left)"; continue; fi
  if [ -f "$run/results.json" ]; then args=(--resume "$run"); [ "${RETRY:-0}" = 1 ] && args+=(--retry-failed); [ -n "${REDO:-}" ] && args+=(--redo "$REDO"); [ -n "${REPS:-}" ] && args+=(--repetitions "$REPS"); else read -ra extra <<< "${LAB_ARGS:-}"; args=("$exp" --out "$run" "${extra[@]}"); fi
  for o in ${ONLY:-}; do args+=(--only "$o"); done
  echo "== $name: ${args[*]} (${left}s left)"
  # SIGINT lets the lab finish the current window and clean up; KILL 90 s later at worst.
  timeout -s INT -k 90 "$left" "$C" lab run "${args[@]}" --quiet > "$OUT/$name.log" 2>&1
  echo "   exit $?"; tail -n 4 "$OUT/$name.log"
  tar czf "$OUT/$name.tgz" -C "$BIN/runs" "$name" 2>/dev/null
done
# Nothing of ours may outlive the call: MPS daemons and engines.
pgrep -a nvidia-cuda-mps | grep -v defunct && echo "WARNING: an MPS daemon is still running" || echo "no MPS daemon left"
pgrep -af "colocate serve" && echo "WARNING: an engine is still running" || echo "no engine left"
