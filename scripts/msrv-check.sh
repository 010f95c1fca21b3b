#!/usr/bin/env bash
# Checks that the workspace, tests included, compiles with the oldest Rust
# it declares (`rust-version` in Cargo.toml) and the locked dependencies.
# scripts/test.sh runs it; it installs that toolchain with rustup if missing.
#
# The check is a `cargo check`, yet llama-cpp-sys-2's build script still
# compiles llama.cpp's C++ (its bindings come from the same build). That
# build is unoptimised here (LLAMA_LIB_PROFILE=None: a CMake build type
# without flags), since nothing of it runs: 527 s of CPU instead of 681 s.
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$msrv" ] || { echo "msrv-check: no rust-version in Cargo.toml" >&2; exit 1; }
# The Yocto recipe skips itself below the same version.
recipe=yocto/meta-slmd/recipes-support/slmd/slmd_0.1.0.bb
recipe_min=$(sed -n 's/^SLMD_MIN_RUST = "\(.*\)"$/\1/p' "$recipe")
[ "$recipe_min" = "$msrv" ] || {
  echo "msrv-check: $recipe says SLMD_MIN_RUST $recipe_min, Cargo.toml rust-version $msrv" >&2
  exit 1
}
rustup run "$msrv" rustc --version >/dev/null 2>&1 ||
  rustup toolchain install "$msrv" --profile minimal
echo "msrv-check: cargo +$msrv check --locked --workspace --all-targets" >&2
# Its own target directory: another toolchain's artifacts would only
# displace the main build's. Lints belong to the main build (clippy-driver
# of the current toolchain would not load into an older rustc).
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS CARGO_TARGET_DIR=target/msrv LLAMA_LIB_PROFILE=None \
  cargo "+$msrv" check --locked --workspace --all-targets
