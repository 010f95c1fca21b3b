#!/usr/bin/env bash
# End-to-end latency (publish -> result, one message at a time, N messages)
# and the daemon's peak RSS, against a local mosquitto, release build.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
cargo build --release --locked --bins --examples -q
port=$((20000 + RANDOM % 20000))
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n' "$port" >"$work/m.conf"
$(command -v mosquitto || echo /usr/sbin/mosquitto) -c "$work/m.conf" 2>/dev/null &
target/release/slmd model fetch smollm2-135m-instruct-q4_1 --config configs/demo.toml >/dev/null 2>&1
target/release/slmd run --config configs/demo.toml --broker "mqtt://127.0.0.1:$port" 2>"$work/slmd.log" &
pid=$!
until grep -q "subscribed to" "$work/slmd.log"; do sleep 0.2; done
target/release/examples/e2e_latency "$port" "$n"
echo "peak_rss_kib=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)"
