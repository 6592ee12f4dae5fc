#!/usr/bin/env bash
# The project's test command: builds every binary (integration tests run the real
# ones) and runs the whole suite with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/check-machine.sh
cargo build --workspace --bins
cargo nextest run --workspace "$@"
