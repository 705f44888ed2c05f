#!/usr/bin/env bash
# The test command of the README and of CI: fetches test models, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-minilm.sh
cargo test --workspace --locked "$@"
