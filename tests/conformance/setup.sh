#!/usr/bin/env bash
# Installs the conformance suite's third-party clients (requirements.txt)
# into .cache/venvs/conformance, once per change of requirements.txt or of
# the venv's path (a venv's scripts name their interpreter by absolute path,
# so a moved or copied checkout needs a new one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.cache/venvs/conformance"
stamp="$venv/requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1) $venv"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
echo "$want" >"$stamp"
