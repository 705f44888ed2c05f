#!/usr/bin/env bash
# The README's first command: the quickstart experiment on CPU with the built-in engine.
# The embedding model is fetched while `colocate` builds (the `quickstart` profile of
# Cargo.toml: release figures, a shorter cold build, no CUDA backend); then the experiment runs and prints
# its headline table and where the report is. Arguments go to `colocate lab run`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-minilm.sh &
fetch=$!
cargo build --profile quickstart -p colocate --no-default-features
if ! wait "$fetch"; then
    echo "quickstart: fetching the embedding model failed (scripts/fetch-minilm.sh)" >&2
    exit 1
fi
"${CARGO_TARGET_DIR:-target}/quickstart/colocate" lab run examples/quickstart.toml "$@"
