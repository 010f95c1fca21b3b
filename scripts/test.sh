#!/usr/bin/env bash
# The whole test suite, with its set-up: system packages, the model (fetched
# and verified through its manifest), build, format and lint checks, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
# Lint while building, as `cargo clippy --all-targets -- -D warnings` would:
# clippy-driver compiles our own crate (that is all `cargo clippy` does), so
# the test build is the lint. A separate `cargo clippy` run is a check build,
# which runs llama.cpp's CMake build a second time (about 6.5 minutes).
RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver)"
CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
export RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
cargo build --locked --workspace --all-targets
# The declared minimum Rust (rust-version) with the locked dependencies:
# about 9 minutes of wall time here with other builds running, 527 s of CPU.
scripts/msrv-check.sh
# Tests run against the real model; fetch it once into .cache/.
target/debug/slmd model fetch smollm2-135m-instruct-q4_1 --state-dir .cache/state --manifests models
for t in home-assistant-intents-en home-assistant-intents-de; do
  target/debug/slmd model fetch "$t" --state-dir .cache/state --manifests models
done
# The Yocto recipe's linter (a bitbake parser; tests/integration/packaging.rs).
oelint=.cache/tools/oelint
[ -x "$oelint/bin/oelint-adv" ] || {
  python3 -m venv "$oelint" && "$oelint/bin/pip" install -q oelint-adv==9.11.2
}
cargo test --locked --workspace
# Tests that measure memory and disk growth need the machine to themselves
# (a backlog behind other tests is not steady traffic): run alone, after.
cargo test --locked --test integration -- --ignored
# Third-party clients and brokers (rhasspy-hermes, paho-mqtt 3.1.1 and 5,
# mosquitto_rr as the README prints it, amqtt) against the built daemon.
tests/conformance/run.sh
