"""mosquitto_rr exactly as the README prints it, on this suite's broker."""

import json
import re
import shlex
import subprocess

from conftest import ANSWER_SECS, REPO


def readme_command():
    """The README's mosquitto_rr line (section "Topics and payloads")."""
    text = (REPO / "README.md").read_text()
    lines = re.findall(r"^mosquitto_rr .*$", text, flags=re.M)
    assert len(lines) == 1, f"one mosquitto_rr example in the README, found {lines}"
    return shlex.split(lines[0])


def test_readme_mosquitto_rr_example_gets_its_answer(broker, slmd):
    """Findings 1 and 5 of the README: mosquitto_rr publishes at QoS 0 and
    waits for one message on its response topic."""
    argv = readme_command()
    # The host and port of this suite's broker are all that is added.
    argv[1:1] = ["-h", "127.0.0.1", "-p", str(broker.port)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=ANSWER_SECS)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{shlex.join(argv)} got no answer within {ANSWER_SECS} s") from None
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["task"] == "home"
    assert result["label"] == "lights_off", result
