#!/usr/bin/env bash
# On the GPU machine (no network), from the repo root: the A100 study's other decoders as model
# folders for vLLM (issue 20), /tmp/vllm-models/{gpt2,distilgpt2,llama-3.2-3b,mistral-7b}/.
# Unpacks the tarball scripts/gpu/vllm-tokenizers.sh made here (carry .vllm/extra-models.tar.xz
# with the run) and checks every file against the SHA256SUMS inside it. Each folder holds the
# released config.json and the published tokenizer files (see vllm-tokenizers.sh):
#   gpt2, distilgpt2  vocab.json, merges.txt, tokenizer_config.json  (50,257 tokens)
#   llama-3.2-3b      tokenizer.json, tokenizer_config.json          (128,256 tokens)
#   mistral-7b        tokenizer.json, tokenizer.model(.v3), tokenizer_config.json (32,768, v0.3)
# Serve them with random weights like the Qwen ones: --load-format dummy. No folder has a chat
# template (GPT-2 never had one; the Llama and Mistral ones are left out): /v1/completions
# works, /v1/chat/completions needs --chat-template. `--tokenizer-mode mistral` also works for
# mistral-7b (tokenizer.model.v3, through mistral-common).
#   usage: vllm-extra-models.sh [TARBALL]   (default .vllm/extra-models.tar.xz)
#   env:   MODELS=/tmp/vllm-models
set -euo pipefail
MODELS=${MODELS:-/tmp/vllm-models}
TARBALL=${1:-.vllm/extra-models.tar.xz}
NAMES="gpt2 distilgpt2 llama-3.2-3b mistral-7b"
[ -f "$TARBALL" ] || { echo "no $TARBALL: run scripts/gpu/vllm-tokenizers.sh here and carry it" >&2; exit 1; }
mkdir -p "$MODELS"
for n in $NAMES; do rm -rf "${MODELS:?}/$n"; done
tar -xmJf "$TARBALL" -C "$MODELS" SHA256SUMS $NAMES
(cd "$MODELS" && sha256sum -c --quiet SHA256SUMS && rm SHA256SUMS)
for n in $NAMES; do
  echo "$MODELS/$n: $(cd "$MODELS/$n" && ls | tr '\n' ' ')"
done
