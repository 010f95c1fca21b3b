#!/usr/bin/env bash
# The client conformance suite: real third-party MQTT clients (rhasspy-hermes,
# paho-mqtt over MQTT 3.1.1 and 5, mosquitto_rr) and brokers (mosquitto,
# amqtt) against the built slmd binary and the real model.
# Needs target/debug/slmd and the model in .cache/state (scripts/test.sh
# builds and fetches both). Extra arguments go to pytest (e.g. -k qos).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
"$here/setup.sh"
[ -x "$root/target/debug/slmd" ] || {
  echo "conformance: build slmd first (cargo build)" >&2
  exit 1
}
# The model, verified, in the checkout's store (a no-op once it is there).
"$root/target/debug/slmd" model fetch smollm2-135m-instruct-q4_1 \
  --state-dir "$root/.cache/state" --manifests "$root/models" >/dev/null
set +e
PYTHONDONTWRITEBYTECODE=1 "$root/.cache/venvs/conformance/bin/python" -m pytest -p no:cacheprovider -rA "$here" "$@"
rc=$?
set -e
# pytest's 5 is "no test ran": never a pass.
if [ "$rc" = 5 ]; then
  echo "conformance: no test ran" >&2
  exit 1
fi
exit "$rc"
