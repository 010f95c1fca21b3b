#!/usr/bin/env bash
# The whole test suite, with its set-up: system packages, the model (fetched
# and verified through its manifest), build, format and lint checks, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo build --locked --bins
# Tests run against the real model; fetch it once into .cache/.
target/debug/slmd model fetch smollm2-135m-instruct-q4_1 --state-dir .cache/state --manifests models
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --workspace
