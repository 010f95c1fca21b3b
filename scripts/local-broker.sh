# Sourced by the demo and measurement scripts: a scratch directory removed
# on exit, the processes started here killed on exit, and helpers to start
# a mosquitto on a free loopback port and slmd against it.
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

# Sets $port.
start_broker() {
  port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nset_tcp_nodelay true\n' "$port" >"$work/mosquitto.conf"
  local mosquitto
  mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  "$mosquitto" -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
  pids+=($!)
}

# start_slmd BIN CONFIG: runs slmd against the broker and waits until it
# has subscribed (log: $work/slmd.log).
start_slmd() {
  "$1" run --config "$2" --broker "mqtt://127.0.0.1:$port" 2>"$work/slmd.log" &
  local pid=$!
  pids+=($pid)
  for _ in $(seq 600); do
    grep -q "subscribed to" "$work/slmd.log" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  cat "$work/slmd.log"
  echo "slmd did not come up" >&2
  exit 1
}
