#!/usr/bin/env bash
# On the GPU machine (carry .gpu, made by scripts/gpu/prepare.sh): do green contexts
# confine kernels to their SMs, alone and inside an MPS client (issue 18,
# docs/design/green-contexts.md)? Runs .gpu/green_probe (crates/engine/examples) without
# MPS, then as a client of a private MPS daemon with no thread limit and with
# CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of 50 and 25. Quits the daemon it started, whatever
# happens; never touches clocks, power, compute mode or MIG.
#   scripts/gpu/green-probe.sh [BIN_DIR] [OUT_DIR]
set -uo pipefail
BIN=${1:-.gpu}; OUT=${2:-gpu-out}
mkdir -p "$OUT"
P=$BIN/green_probe
D=$(mktemp -d /tmp/mps-green.XXXX)
export CUDA_MPS_PIPE_DIRECTORY=$D/pipe CUDA_MPS_LOG_DIRECTORY=$D/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
quit() { [ -S "$CUDA_MPS_PIPE_DIRECTORY/control" ] && echo quit | nvidia-cuda-mps-control; }
trap quit EXIT INT TERM
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv,noheader
  env -u CUDA_MPS_PIPE_DIRECTORY -u CUDA_MPS_LOG_DIRECTORY "$P"
  nvidia-cuda-mps-control -d && sleep 1
  "$P"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 "$P"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25 "$P"
} 2>&1 | tee "$OUT/green-probe.log"
