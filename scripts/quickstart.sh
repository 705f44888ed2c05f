#!/usr/bin/env bash
# The README's first command: the quickstart experiment on CPU with the built-in engine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-minilm.sh
cargo build --release -p colocate
./target/release/colocate lab run examples/quickstart.toml "$@"
