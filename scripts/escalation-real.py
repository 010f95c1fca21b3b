#!/usr/bin/env python3
"""Escalation against a real OpenAI-compatible server, from outside.

The upstream is llama-cpp-python's server (`python -m llama_cpp.server`)
serving Gemma 3 270M, twice the size of the SmolLM2 135M that slmd runs
itself. A Mosquitto broker on a free loopback port, slmd with the test
classify task (the HWU64 smart-home labels) escalating to that server, and
mosquitto_pub / mosquitto_sub as clients.

The task trains on every other row of configs/examples/smart-home-hwu64.jsonl
(59 rows) and is sent the other 59 (held out) and as many out-of-scope
queries from the shared CLINC rows. Every result keeps the local guess, so
one run gives the local model alone and local + escalation: in-scope
accuracy, out-of-scope rejection (a null label), the share escalated, what
came back (answered, refused, unavailable) and the result latency of local
and escalated messages.

  scripts/escalation-real.py --python VENV/bin/python [--slmd BIN] [--below 0.5]

VENV must have `llama-cpp-python[server]` (scripts/escalation-real.sh makes
one). BIN defaults to target/release/slmd.
"""

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets"
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LABELS = ["lights_on", "lights_off", "lights_dim", "lights_brighten", "lights_colour",
          "make_coffee", "vacuum", "plug_on", "plug_off"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def model(sha):
    path = REPO / ".cache" / "state" / "models" / f"{sha}.gguf"
    if not path.exists():
        sys.exit(f"{path} is missing: run scripts/escalation-real.sh (it fetches both models)")
    return path


def config(dir, broker, url, below, examples, off):
    labels = ", ".join(f'{{ name = "{l}" }}' for l in LABELS)
    escalate = f"""
[tasks.escalate]
name = "gemma-270m"
url = "{url}"
model = "gemma"
response_format = "json_object"
below = {below}
timeout_ms = 60000
max_concurrent = 1
"""
    text = f"""
[broker]
port = {broker}
client_id = "slmd-escalation-real"

[state]
dir = "{dir / 'state'}"

[model]
path = "{model(SMOL_SHA)}"
threads = 1

[log]
level = "info"

[[tasks]]
name = "home"
kind = "classify"
topics = ["test/home/+"]
output_topic = "test/out/home"
instruction = "Classify this smart-home command."
examples_file = "{examples}"
labels = [{labels}]

{"" if off else escalate}"""
    path = dir / "slmd.toml"
    path.write_text(text)
    return path


def split(dir):
    """Train rows written to a file; held-out (text, label) rows, then as
    many out-of-scope ones (label None)."""
    home = [json.loads(l) for l in open(REPO / "configs/examples/smart-home-hwu64.jsonl")]
    train = dir / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in home[0::2]))
    test = [(r["text"], r["intent"]) for r in home[1::2]]
    oos = [json.loads(l) for l in open(DATA / "clinc150_auto_home_oos.jsonl")]
    random.seed(7)
    oos = random.sample([r["text"] for r in oos if r["intent"] == "oos"], len(test))
    return train, test + [(t, None) for t in oos]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="a python with llama-cpp-python[server]")
    ap.add_argument("--slmd", default=str(REPO / "target" / "release" / "slmd"))
    ap.add_argument("--below", type=float, default=0.5)
    ap.add_argument("--off", action="store_true", help="no escalation (the local path alone)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slmd-escalation-"))
    procs = []
    try:
        broker = free_port()
        procs.append(subprocess.Popen(["mosquitto", "-p", str(broker)], stderr=subprocess.DEVNULL))
        up = free_port()
        server_log = open(tmp / "server.log", "w")
        procs.append(subprocess.Popen(
            [args.python, "-m", "llama_cpp.server", "--model", str(model(GEMMA_SHA)),
             "--model_alias", "gemma", "--host", "127.0.0.1", "--port", str(up),
             "--n_ctx", "2048", "--n_threads", "1"],
            stdout=server_log, stderr=subprocess.STDOUT))

        def server_up():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{up}/v1/models", timeout=1)
                return True
            except OSError:
                return False

        wait_until(server_up, 120, "llama_cpp.server")
        train, inputs = split(tmp)
        cfg = config(tmp, broker, f"http://127.0.0.1:{up}/v1", args.below, train, args.off)
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(broker), "-q", "1", "-t", "test/out/#"],
                               stdout=subprocess.PIPE, text=True)
        procs.append(sub)
        results = {}
        arrived = {}

        def read():
            for line in sub.stdout:
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                results[v["id"]] = v
                arrived[v["id"]] = time.monotonic()

        threading.Thread(target=read, daemon=True).start()
        slmd_log = open(tmp / "slmd.log", "w")
        daemon = subprocess.Popen([args.slmd, "run", "--config", str(cfg)],
                                  stdout=slmd_log, stderr=subprocess.STDOUT)
        procs.append(daemon)
        wait_until(lambda: "subscribed to" in (tmp / "slmd.log").read_text(), 300, "slmd")
        sent = {}
        # One at a time: latency is per message, not queueing behind others.
        for i, (text, _) in enumerate(inputs):
            rid = f"r{i}"
            sent[rid] = time.monotonic()
            subprocess.run(["mosquitto_pub", "-p", str(broker), "-q", "1", "-t", "test/home/hall",
                            "-m", json.dumps({"id": rid, "text": text})], check=True)
            wait_until(lambda: rid in results, 180, f"the result of {rid}")
        outcomes, local_ms, escalated_ms = {}, [], []
        # [right, of] for in-scope accuracy and out-of-scope rejection.
        alone = {"in": [0, 0], "oos": [0, 0]}
        both = {"in": [0, 0], "oos": [0, 0]}
        for i, (text, want) in enumerate(inputs):
            v = results[f"r{i}"]
            ms = (arrived[f"r{i}"] - sent[f"r{i}"]) * 1000
            e = v.get("escalation")
            (local_ms if e is None else escalated_ms).append(ms)
            if e is not None:
                outcomes[e["outcome"]] = outcomes.get(e["outcome"], 0) + 1
            local = v["label"] if e is None else e["local"]["label"]
            kind = "in" if want else "oos"
            for tally, got in ((alone, local), (both, v["label"])):
                tally[kind][0] += got == want
                tally[kind][1] += 1
        pct = lambda xs, q: round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]) if xs else None
        rate = lambda t: round(t[0] / t[1], 3)
        summary = {
            "below": args.below,
            "held_out_in_scope": alone["in"][1],
            "out_of_scope": alone["oos"][1],
            "escalated_share": round(len(escalated_ms) / len(inputs), 3),
            "outcomes": outcomes,
            "local_alone": {"in_scope_accuracy": rate(alone["in"]), "oos_rejected": rate(alone["oos"])},
            "with_escalation": {"in_scope_accuracy": rate(both["in"]), "oos_rejected": rate(both["oos"])},
            "local_ms_p50": pct(local_ms, 0.5),
            "local_ms_p95": pct(local_ms, 0.95),
            "escalated_ms_p50": pct(escalated_ms, 0.5),
            "escalated_ms_p95": pct(escalated_ms, 0.95),
        }
        print(json.dumps(summary, indent=2))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        print(f"logs in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
