#!/usr/bin/env bash
# The factory demo: a local mosquitto on a free port, slmd running
# configs/factory.toml, a recorded spindle series (tests/fixtures/factory,
# six hours at 10 s, with labelled faults) published by `slmd replay`, one
# malformed reading, and the anomaly notes printed as they come back.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo build --release --locked --bins
bin=target/release/slmd
$bin model fetch smollm2-135m-instruct-q4_1 --config configs/factory.toml

. scripts/local-broker.sh
start_broker
echo "factory demo: broker on 127.0.0.1:$port; starting slmd (log: $work/slmd.log)"
start_slmd "$bin" configs/factory.toml

mosquitto_sub -p "$port" -q 1 -v -t 'slmd/factory/#' >"$work/notes" &
sub=$!
pids+=($sub)
sleep 0.5
echo "  -> factory/line1/reading  tests/fixtures/factory/spindle.csv (2160 readings)"
$bin replay tests/fixtures/factory/spindle.csv --topic factory/line1/reading \
  --rate 500 --unit C --broker "127.0.0.1:$port"
echo '  -> factory/line1/reading  {"sensor": "spindle_temp", "value": "hot"}'
mosquitto_pub -p "$port" -q 1 -t factory/line1/reading -m '{"sensor": "spindle_temp", "value": "hot"}'
# Notes wait for the model's cause; stop when nothing new came for 5 s.
last=-1
while [ "$(wc -l <"$work/notes")" -ne "$last" ]; do
  last=$(wc -l <"$work/notes")
  sleep 5
done
kill "$sub" 2>/dev/null || true
echo
echo "notes and errors:"
sed 's/^/  <- /' "$work/notes"
echo
echo "factory demo: $(grep -c '^slmd/factory/note ' "$work/notes" || true) notes, $(grep -c '^slmd/factory/error ' "$work/notes" || true) error(s)"
grep -q '^slmd/factory/note ' "$work/notes"
