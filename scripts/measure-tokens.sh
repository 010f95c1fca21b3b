#!/usr/bin/env bash
# Tokens per second as the metrics endpoint reports it: the release daemon
# on configs/demo.toml with [metrics] on, a local mosquitto, N messages
# (default 200) published 50 ms apart, then the token and inference series.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
. scripts/local-broker.sh
start_broker
mport=$(free_port)
root=$PWD
sed "s|dir = \"../state\"|dir = \"$work/state\"|; s|examples/|$root/configs/examples/|g; s|manifests = \"|manifests = \"$root/configs/|" \
  configs/demo.toml >"$work/cfg.toml"
printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$mport" >>"$work/cfg.toml"
target/release/slmd model fetch smollm2-135m-instruct-q4_1 --config "$work/cfg.toml" >/dev/null
start_slmd target/release/slmd "$work/cfg.toml"
for i in $(seq 1 "$n"); do
  mosquitto_pub -p "$port" -q 1 -t home/kitchen/command \
    -m "{\"id\":\"t$i\",\"text\":\"turn off the kitchen lights please\"}"
  sleep 0.05
done
sleep 10
curl -s "http://127.0.0.1:$mport/metrics" |
  grep -E '^slmd_(results_total|tokens|inference_seconds_(sum|count))'
