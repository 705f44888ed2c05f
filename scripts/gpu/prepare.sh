#!/usr/bin/env bash
# Here (no GPU needed): builds everything the GPU run needs and gathers it in .gpu/
# (ignored by git) so that one device call carries it:
#   scripts/gpu/prepare.sh            # then, on the GPU machine (carry .gpu):
#   scripts/gpu/run-all.sh            # all GPU tests and benchmarks, summary table last
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu
rm -rf "$out" && mkdir -p "$out"
cargo build --release -p colocate
cargo build --release -p engine --example cuda_bench --example green_probe
# Test binaries: the path of each comes from cargo's JSON messages. The engine's GPU tests
# are compiled in by its `gpu-tests` feature (without it they are ignored); the gpu and
# colocate crates mark theirs #[ignore] and gpu-tests.sh runs them with --include-ignored.
exe() { # package, test target, extra cargo flags... -> executable path
  local pkg=$1 target=$2; shift 2
  cargo test --release -p "$pkg" "$@" --test "$target" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$target" | tail -n 1
}
cp target/release/colocate "$out/colocate"
cp target/release/examples/cuda_bench "$out/cuda_bench"
cp target/release/examples/green_probe "$out/green_probe"
cp "$(exe engine cuda_engine --features gpu-tests)" "$out/cuda_engine"
cp "$(exe gpu device)" "$out/gpu-device"
cp "$(exe colocate gpu_cli)" "$out/gpu-cli"
cp "$(cargo test --release -p gpu --lib --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["lib"]: print(m["executable"])' | tail -n 1)" "$out/gpu-unit"
strip "$out"/colocate "$out"/cuda_engine "$out"/cuda_bench "$out"/green_probe "$out"/gpu-*
cp -r testdata/qwen3-tiny "$out/qwen3-tiny"
base=../shared/baselines
[ -d "$base" ] || { echo "prepare: $base not found (the baselines live beside the checkout)" >&2; exit 1; }
cp "$base"/hf_static.py "$base"/hf_baseline.py "$base"/gpm.py "$out/"
du -sh "$out"
