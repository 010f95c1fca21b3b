#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and prints the
# executions and time of each (docs/SECURITY.md, "Fuzzing").
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    default 60, all targets
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain; with
# only stable, RUSTC_BOOTSTRAP=1 lets it take the -Z flags. The committed
# corpus (fuzz/corpus/<target>) seeds each run and is not modified: new
# inputs go to a scratch corpus. A crash leaves its input under
# fuzz/artifacts/<target>/ and makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(payload injection control bundle gguf)
fi
if rustup run nightly rustc --version >/dev/null 2>&1; then
  cargo=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo fuzz)
fi
sanitizer=${FUZZ_SANITIZER:-address}
for t in "${targets[@]}"; do
  "${cargo[@]}" build -s "$sanitizer" "$t"
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  if "${cargo[@]}" run -s "$sanitizer" "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
    tail -40 "$log"
  fi
  done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 || true)
  summary+=("$t: $result; ${done_line:-no summary}; ${cov:-}")
done
printf '%s\n' "${summary[@]}"
exit $status
