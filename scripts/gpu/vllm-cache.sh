#!/usr/bin/env bash
# vLLM's compile caches across GPU-machine sessions (issue 15): a cold vLLM start spends
# 30-50 s in torch.compile per engine (the seeds' pair: 32 s for the generator's EngineCore,
# 28 s for the embedder's), which the cache in ~/.cache/vllm (and Triton's in ~/.triton)
# saves on the next start with the same model and settings. The machine is fresh each
# session, so the cache travels: `save` packs it into $OUT at the end of a call, and a later
# session carries the file back (ignored folder .vllm/) and `restore`s it before the study.
#   scripts/gpu/vllm-cache.sh save "$OUT/vllm-cache.tgz"     # on the GPU machine, last call
#   scripts/gpu/vllm-cache.sh restore .vllm/vllm-cache.tgz   # on the GPU machine, before vLLM starts
# One call returns files of at most 16 MiB: `save` splits a larger archive into FILE.part-aa,
# -ab, ... of 15 MiB (the seeds' pair with Triton's cache came to 20 MiB on 2026-12-02),
# and `restore` joins FILE.part-* when FILE itself is not there.
set -euo pipefail
cmd=${1:-}; file=${2:-}
[ -n "$cmd" ] && [ -n "$file" ] || { echo "usage: $0 save|restore FILE" >&2; exit 2; }
case "$cmd" in
  save)
    dirs=(); for d in .cache/vllm .triton; do [ -d "$HOME/$d" ] && dirs+=("$d"); done
    [ ${#dirs[@]} -gt 0 ] || { echo "vllm-cache: nothing to save in $HOME" >&2; exit 1; }
    tar czf "$file" -C "$HOME" "${dirs[@]}"
    echo "vllm-cache: saved ${dirs[*]} ($(du -h "$file" | cut -f1)) to $file"
    if [ "$(stat -c %s "$file")" -gt $((15 << 20)) ]; then
      rm -f "$file".part-*; split -b 15M "$file" "$file.part-" && rm "$file"
      echo "vllm-cache: split into $(ls "$file".part-* | wc -l) parts of at most 15 MiB: $file.part-*"
    fi
    ;;
  restore)
    if [ ! -f "$file" ] && compgen -G "$file.part-*" > /dev/null; then
      cat "$file".part-* > "/tmp/vllm-cache-joined.tgz"; file=/tmp/vllm-cache-joined.tgz
    fi
    [ -f "$file" ] || { echo "vllm-cache: no $file nor its parts (carry them from .vllm/)" >&2; exit 1; }
    tar xzf "$file" -C "$HOME"
    echo "vllm-cache: restored $(tar tzf "$file" | wc -l) entries into $HOME"
    ;;
  *) echo "usage: $0 save|restore FILE" >&2; exit 2 ;;
esac
