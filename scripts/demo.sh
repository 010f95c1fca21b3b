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

. scripts/local-broker.sh
start_broker
echo "demo: broker on 127.0.0.1:$port; starting slmd (log: $work/slmd.log)"
start_slmd "$bin" configs/demo.toml

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
mosquitto_sub -p "$port" -q 1 -v -t 'slmd/home/#' -t 'slmd/assist/#' -C "$total" -W 180 >"$work/results" &
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
