#!/usr/bin/env bash
# The test command of the README and of CI: fetches the test model, installs the Python
# clients the tests drive the servers with (.venv, the official openai client), runs every
# test, checks that the quickstart's build without CUDA compiles, and ends with one line counting them all (cargo's own last line is a crate's doc
# tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-minilm.sh
./scripts/setup-python.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
# The quickstart builds colocate without the engine's `cuda` feature: that build must compile.
cargo check -p colocate --no-default-features --locked
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?/) p += $i; if ($(i+1) ~ /^failed;?/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
