#!/usr/bin/env bash
# Tokens per second as the metrics endpoint reports it: the release daemon
# on configs/demo.toml with [metrics] on, a local mosquitto, N messages
# (default 200) published 50 ms apart, then the token and inference series.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port=$((30000 + RANDOM % 1000))
mport=$((31000 + RANDOM % 1000))
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" >"$work/m.conf"
mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
pids+=($!)
root=$PWD
sed "s|dir = \"../state\"|dir = \"$work/state\"|; s|examples/|$root/configs/examples/|g; s|manifests = \"|manifests = \"$root/configs/|" \
  configs/demo.toml >"$work/cfg.toml"
printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$mport" >>"$work/cfg.toml"
target/release/slmd model fetch smollm2-135m-instruct-q4_1 --config "$work/cfg.toml" >/dev/null
target/release/slmd run --config "$work/cfg.toml" --broker "mqtt://127.0.0.1:$port" 2>"$work/d.log" &
pids+=($!)
for _ in $(seq 1 300); do grep -q "subscribed to" "$work/d.log" && break; sleep 1; done
for i in $(seq 1 "$n"); do
  mosquitto_pub -p "$port" -q 1 -t home/kitchen/command \
    -m "{\"id\":\"t$i\",\"text\":\"turn off the kitchen lights please\"}"
  sleep 0.05
done
sleep 10
curl -s "http://127.0.0.1:$mport/metrics" |
  grep -E '^slmd_(results_total|tokens|inference_seconds_(sum|count))'
