#!/usr/bin/env bash
# The demo: a local mosquitto on a free port, the model fetched and verified,
# slmd running configs/demo.toml, a handful of spoken-style commands
# published, and the results printed as they come back.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo build --release --locked --bins
bin=target/release/slmd
$bin model fetch smollm2-135m-instruct-q4_1 --config configs/demo.toml

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
port=$(free_port)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nset_tcp_nodelay true\n' "$port" >"$work/mosquitto.conf"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$mosquitto" -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
pids+=($!)

echo "demo: broker on 127.0.0.1:$port; starting slmd (log: $work/slmd.log)"
$bin run --config configs/demo.toml --broker "mqtt://127.0.0.1:$port" 2>"$work/slmd.log" &
pids+=($!)
for _ in $(seq 600); do
  grep -q "subscribed to" "$work/slmd.log" 2>/dev/null && break
  kill -0 "${pids[1]}" 2>/dev/null || { cat "$work/slmd.log"; exit 1; }
  sleep 0.2
done
grep -q "subscribed to" "$work/slmd.log" || { cat "$work/slmd.log"; echo "demo: slmd did not come up" >&2; exit 1; }

# Ids are unique per run: slmd skips a message whose id it already processed.
run=$(date +%s)
commands=(
  "{\"id\": \"$run-1\", \"text\": \"turn off the kitchen lights\"}"
  "{\"id\": \"$run-2\", \"text\": \"could you make me a cup of coffee\"}"
  "{\"id\": \"$run-3\", \"text\": \"dim the lights in the living room a bit\"}"
  "{\"id\": \"$run-4\", \"text\": \"start the robot vacuum\"}"
  "{\"id\": \"$run-5\", \"text\": \"switch the lights to a warm red\"}"
  "{\"id\": \"$run-6\", \"text\": \"turn the heater plug on\"}"
  "lights on in the hallway please (run $run)"
  "{\"id\": \"$run-8\", \"text\": \"\"}"
)
# Intent + slots (the `assist` extract task).
assist=(
  "{\"id\": \"$run-a1\", \"text\": \"turn off the kitchen lights\"}"
  "{\"id\": \"$run-a2\", \"text\": \"set the bedroom lamp to 40 percent\"}"
  "{\"id\": \"$run-a3\", \"text\": \"start a 10 minute timer\"}"
)
total=$(( ${#commands[@]} + ${#assist[@]} ))
mosquitto_sub -p "$port" -q 1 -v -t 'slmd/#' -C "$total" -W 180 >"$work/results" &
sub=$!
sleep 0.5
for c in "${commands[@]}"; do
  echo "  -> home/kitchen/command  $c"
  mosquitto_pub -p "$port" -q 1 -t home/kitchen/command -m "$c"
done
for c in "${assist[@]}"; do
  echo "  -> assist/kitchen/text   $c"
  mosquitto_pub -p "$port" -q 1 -t assist/kitchen/text -m "$c"
done
wait "$sub" || true
echo
echo "results:"
sed 's/^/  <- /' "$work/results"
n=$(wc -l <"$work/results")
echo
echo "demo: $n of $total messages answered"
[ "$n" -eq "$total" ]
