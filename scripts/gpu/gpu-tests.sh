#!/usr/bin/env bash
# On-device part of the `gpu` crate's tests and the `colocate gpu` CLI tests: runs on the
# GPU machine from the repository root, with binaries built by scripts/gpu/prepare.sh and
# carried in $BIN (default .gpu): gpu-unit, gpu-device, gpu-cli and colocate. The GPU
# tests are #[ignore]d elsewhere; here every test runs (--include-ignored), so the CLI's
# plain-answer test checks the GPU case too.
# It never changes clocks, power, compute mode, persistence or MIG, and quits every MPS
# daemon it started (the tests do; the trap below is the last resort for /tmp/mps*).
# Output goes to stdout and, when $OUT is set, to $OUT/gpu-tests.log and friends.
set -uo pipefail
BIN=${BIN:-.gpu}
OUT=${OUT:-/tmp/gpu-tests-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-tests.log"
export PYTHONUNBUFFERED=1 COLOCATE_BIN="$BIN/colocate" RUST_LOG=${RUST_LOG:-info}
fails=0

cleanup() {
  for p in /tmp/mps*/pipe /tmp/mps*/mps/pipe; do
    [ -S "$p/control" ] || continue
    if [ -f "$p/nvidia-cuda-mps-control.pid" ] && kill -0 "$(cat "$p/nvidia-cuda-mps-control.pid")" 2>/dev/null; then
      echo "cleanup: quitting MPS daemon of $p"
      echo quit | CUDA_MPS_PIPE_DIRECTORY="$p" nvidia-cuda-mps-control
    fi
  done
}
trap cleanup EXIT INT TERM

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
run() { "$@" || { echo "FAILED: $*"; fails=$((fails + 1)); }; }

{
  step "device"
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=index,driver_version,compute_mode,mig.mode.current --format=csv
  # several GPUs (nvidia-h200-x2): their interconnect; every_gpu_and_their_totals then checks
  # each GPU apart (a GEMM on the last one only) and the totals per tick
  [ "$(nvidia-smi -L | grep -c '^GPU ')" -gt 1 ] && nvidia-smi topo -m
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'

  step "colocate gpu info"
  run "$BIN/colocate" gpu info
  "$BIN/colocate" gpu info --json > "$OUT/gpu-info.json"
  run "$BIN/colocate" gpu mig list

  step "unit tests on the GPU machine"
  run "$BIN/gpu-unit" --test-threads=2

  step "GPU tests (ignored in CI)"
  run "$BIN/gpu-device" --include-ignored --nocapture --test-threads=1

  step "CLI: plain answers and the round trip"
  run "$BIN/gpu-cli" --include-ignored --nocapture --test-threads=1

  step "monitor during a GEMM loop: live view cost and CSV"
  python3 crates/gpu/tests/gemm_loop.py 8 > "$OUT/gemm-monitor.txt" 2>&1 &
  g=$!
  run "$BIN/colocate" gpu monitor --interval 500ms --duration 10s --out "$OUT/monitor.csv"
  wait $g; cat "$OUT/gemm-monitor.txt"
  echo "monitor.csv: $(wc -l < "$OUT/monitor.csv") lines; SM active column (4) of the busiest rows:"
  sort -t, -k4 -g -r "$OUT/monitor.csv" | head -n 3

  step "sampler cost at 100ms, idle GPU"
  run "$BIN/colocate" gpu monitor --interval 100ms --duration 10s --out "$OUT/monitor-100ms.jsonl"

  step "no MPS process left"
  left=$(ps -eo pid,comm | grep nvidia-cuda-mps || true)
  if [ -n "$left" ]; then echo "MPS processes still running:"; echo "$left"; fails=$((fails + 1)); else echo "none"; fi

  step "summary"
  echo "failures: $fails"
  exit "$fails"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
