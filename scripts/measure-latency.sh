#!/usr/bin/env bash
# End-to-end latency (publish -> result) and the daemon's peak RSS, against a
# local mosquitto, release build.
#
#   [SLMD=BIN] scripts/measure-latency.sh [N] [serial|burst] [--no-inference] [--state-dir DIR]
#
# serial: one message at a time (the latency one speaker sees); burst: N at
# once (throughput). --no-inference answers without the model, so the figure
# is the message path alone (MQTT, durable inbox/outbox, routing); with
# --state-dir on tmpfs (/dev/shm) fsync costs nothing, so the difference to a
# disk-backed state dir is what durability adds per message.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
n=${1:-100}
mode=${2:-serial}
shift $(( $# < 2 ? $# : 2 ))
extra=() state=""
while [ $# -gt 0 ]; do
    case "$1" in
    --no-inference) extra+=(--no-inference) ;;
    --state-dir) state=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
# SLMD=path/to/slmd measures another build (its examples/ beside it);
# default: the release build, built here.
if [ -z "${SLMD:-}" ]; then
    cargo build --release --locked --bins --examples -q
fi
bin=${SLMD:-target/release/slmd}
bench=$(dirname "$bin")/examples/e2e_latency
port=$((20000 + RANDOM % 20000))
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nset_tcp_nodelay true\n' "$port" >"$work/m.conf"
$(command -v mosquitto || echo /usr/sbin/mosquitto) -c "$work/m.conf" 2>/dev/null &
"$bin" model fetch smollm2-135m-instruct-q4_1 --config configs/demo.toml >/dev/null 2>&1
# The demo config with absolute paths and a fresh state directory.
state=${state:-$work/state}
rm -rf "$state/store"
sed -e "s|^dir = .*|dir = \"$state\"|" -e "s|\"\\.\\./|\"$repo/|" \
    -e "s|\"examples/|\"$repo/configs/examples/|" configs/demo.toml >"$work/slmd.toml"
# The model fetched above (into the demo's state dir), linked, not copied;
# and the trained heads kept between runs.
mkdir -p "$state/models"
cp -al "$repo/state/models/." "$state/models/" 2>/dev/null || true
[ -d "$repo/state/heads" ] && cp -r "$repo/state/heads" "$state/" 2>/dev/null || true
"$bin" run --config "$work/slmd.toml" --broker "mqtt://127.0.0.1:$port" "${extra[@]}" 2>"$work/slmd.log" &
pid=$!
until grep -q "subscribed to" "$work/slmd.log"; do
    kill -0 "$pid" 2>/dev/null || { echo "slmd exited:" >&2; cat "$work/slmd.log" >&2; exit 1; }
    sleep 0.2
done
"$bench" "$port" "$n" home/bench/command 'slmd/home/#' "$mode"
echo "peak_rss_kib=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)"
