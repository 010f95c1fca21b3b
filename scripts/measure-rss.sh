#!/usr/bin/env bash
# The daemon's memory under the longest inputs it accepts: a config's tasks
# each get ROUNDS rounds of BURST texts of limits.max_text_chars (1000)
# characters at once; RSS (VmRSS) after each round and the peak (VmHWM).
# A bounded daemon levels off after the first rounds.
#
#   [SLMD=BIN] scripts/measure-rss.sh [CONFIG] [ROUNDS] [BURST]
#
# CONFIG defaults to configs/demo.toml (a classify and an extract task).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
config=${1:-configs/demo.toml}
rounds=${2:-5}
burst=${3:-16}
if [ -z "${SLMD:-}" ]; then
    cargo build --release --locked --bins -q
fi
bin=${SLMD:-target/release/slmd}
port=$((20000 + RANDOM % 20000))
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nset_tcp_nodelay true\n' "$port" >"$work/m.conf"
$(command -v mosquitto || echo /usr/sbin/mosquitto) -c "$work/m.conf" 2>/dev/null &
"$bin" model fetch smollm2-135m-instruct-q4_1 --config "$config" >/dev/null 2>&1
state=$work/state
dir=$(cd "$(dirname "$config")" && pwd)
sed -e "s|^dir = .*|dir = \"$state\"|" -e "s|\"\\.\\./|\"$dir/../|" \
    -e "s|\"examples/|\"$dir/examples/|" "$config" >"$work/slmd.toml"
mkdir -p "$state/models"
cp -al "$repo/state/models/." "$state/models/" 2>/dev/null || true
[ -d "$repo/state/heads" ] && cp -r "$repo/state/heads" "$state/" 2>/dev/null || true
: >"$work/slmd.log"
"$bin" run --config "$work/slmd.toml" --broker "mqtt://127.0.0.1:$port" 2>"$work/slmd.log" &
pid=$!
until grep -q "subscribed to" "$work/slmd.log"; do
    kill -0 "$pid" 2>/dev/null || { echo "slmd exited:" >&2; cat "$work/slmd.log" >&2; exit 1; }
    sleep 0.2
done
rss() { awk "/$1/ {print \$2}" /proc/$pid/status; }
echo "config=$config ready_rss_kib=$(rss VmRSS)"
# Every task's first input filter, with + and # made concrete.
topics=$(sed -n 's/^topics = \["\([^"]*\)".*/\1/p' "$work/slmd.toml" | sed -e 's/+/x/g' -e 's/#/x/')
words="please turn off the lights in the kitchen and then dim the lamp in the living room "
text=$(printf '%s' "$(for _ in $(seq 20); do printf '%s' "$words"; done)" | cut -c1-1000)
mosquitto_sub -p "$port" -t 'slmd/#' -v >"$work/out" &
sleep 0.3
sent=0
for r in $(seq "$rounds"); do
    for t in $topics; do
        for i in $(seq "$burst"); do
            mosquitto_pub -p "$port" -q 1 -t "$t" -m "{\"id\": \"rss-$r-$i-$RANDOM\", \"text\": \"$text\"}"
            sent=$((sent + 1))
        done
    done
    until [ "$(grep -c '"id":"rss-' "$work/out")" -ge "$sent" ]; do sleep 0.5; done
    echo "round=$r answered=$sent rss_kib=$(rss VmRSS)"
done
echo "peak_rss_kib=$(rss VmHWM)"
