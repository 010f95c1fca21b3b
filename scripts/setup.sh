#!/usr/bin/env bash
# Installs what building, testing and running slmd need on Debian (and
# Raspberry Pi OS), only what is missing: cmake and clang/libclang for
# llama.cpp's build and bindgen, mosquitto for the broker and its clients.
# Debian packages named as arguments are installed with them when missing
# (scripts/cross-check.sh passes its cross compilers this way).
set -euo pipefail

need=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
have() { command -v "$1" >/dev/null 2>&1; }
have cmake || need+=(cmake)
have clang || need+=(clang)
have c++ || need+=(g++)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
[ -x /usr/sbin/mosquitto ] || have mosquitto || need+=(mosquitto)
have mosquitto_pub || need+=(mosquitto-clients)
have curl || need+=(curl)
have openssl || need+=(openssl) # the TLS test makes its certificates with it
have systemd-analyze || need+=(systemd) # the unit is verified by the tests
have minisign || need+=(minisign) # bundle signatures are checked against the minisign tool
# The test script installs the Yocto recipe linter into a Python venv.
have python3 || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)

if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! have cargo; then
  echo "setup: Rust (cargo) is needed; install it with rustup, then run this again" >&2
  exit 1
fi
# The test build lints with clippy-driver (scripts/test.sh).
rustup which clippy-driver >/dev/null 2>&1 || rustup component add clippy rustfmt
