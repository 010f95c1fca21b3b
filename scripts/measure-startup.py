#!/usr/bin/env python3
"""Start-up as a user meets it, measured from outside the daemon.

For each CONFIG: a fresh state directory (the model hard-linked in, nothing
derived), a Mosquitto broker on a free loopback port, and slmd started with
a NOTIFY_SOCKET this script listens on, as systemd would. It records:

- cold start: process start to READY=1, with the longest gap between two
  STATUS= lines and between two log lines while starting;
- the first answer of every task after subscribing, then the steady p50 of
  the extract task (20 requests, one at a time);
- peak RSS (VmHWM) after a burst of 16 inputs of 1000 characters per task;
- (a Hermes config) an entity injection: publish to applied
  (hermes/injection/complete), and the peak RSS after it (the old engine
  serves until the new one is ready, so both are briefly in memory);
- the same again after SIGTERM and a start on the same state (warm).

Clients are mosquitto_pub and mosquitto_sub, as the README prints them.

  scripts/measure-startup.py [--slmd BIN] [--json] [CONFIG ...]

CONFIG defaults to configs/demo.toml and configs/smart-home.toml. BIN
defaults to target/release/slmd (built if missing).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LONG_TEXT = (
    "please turn off the lights in the kitchen and then dim the lamp in the living room " * 13
)[:1000]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """Lines of a pipe, each with the monotonic time it arrived."""

    def __init__(self, pipe, tee=None):
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(pipe, tee), daemon=True).start()

    def _read(self, pipe, tee):
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if tee:
                tee.write(line + "\n")
                tee.flush()
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.cond.notify_all()

    def wait_for(self, pattern, after=0.0, timeout=600.0):
        """The time of the first line after `after` matching `pattern`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        with self.cond:
            while True:
                for t, line in self.lines:
                    if t >= after and rx.search(line):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(pattern)
                self.cond.wait(left)


def tasks_of(config_text):
    """(name, kind, protocol, first input topic, output topic) per task."""
    out = []
    for block in config_text.split("[[tasks]]")[1:]:
        block = block.split("\n[[tasks.labels]]")[0]
        get = lambda key, default="": (re.search(rf'^{key} = "([^"]*)"', block, re.M) or [None, default])[1]
        topic = re.search(r'^topics = \["([^"]*)"', block, re.M)[1]
        topic = topic.replace("+", "x").replace("#", "x")
        out.append((get("name"), get("kind", "classify"), get("protocol", "json"), topic, get("output_topic")))
    return out


class Run:
    """One slmd process on `state`, with its broker clients."""

    def __init__(self, binary, config, port, work, name):
        self.port = port
        self.work = work
        notify = work / f"notify-{name}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(notify))
        self.status = []
        self.ready = None
        env = dict(os.environ, NOTIFY_SOCKET=str(notify))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, "run", "--config", str(config), "--broker", f"mqtt://127.0.0.1:{port}"],
            stderr=subprocess.PIPE, env=env,
        )
        self.log = Lines(self.proc.stderr, open(work / f"slmd-{name}.log", "w"))
        threading.Thread(target=self._notify, daemon=True).start()

    def _notify(self):
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except OSError:
                return
            now = time.monotonic()
            for kv in msg.split("\n"):
                if kv.startswith("STATUS="):
                    self.status.append((now, kv[7:]))
                if kv == "READY=1" and self.ready is None:
                    self.ready = now

    def wait_ready(self, timeout=600):
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slmd exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("READY=1")
            time.sleep(0.01)
        return self.ready - self.t0

    def silences(self):
        """Longest gaps (s) between STATUS= lines, and between log lines,
        from the start to READY."""
        def gap(times):
            times = [self.t0] + [t for t in times if t <= self.ready] + [self.ready]
            return max(b - a for a, b in zip(times, times[1:]))
        return gap([t for t, _ in self.status]), gap([t for t, _ in self.log.lines])

    def rss_mib(self, which="VmHWM"):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{which}:\s+(\d+)", status)[1]) / 1024

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.sock.close()


def publish(port, topic, payload):
    subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", topic, "-m", payload], check=True)


def request(task, text, rid):
    _, _, protocol, topic, _ = task
    if protocol == "hermes":
        return topic, json.dumps({"input": text, "sessionId": rid, "id": rid})
    return topic, json.dumps({"id": rid, "text": text})


def ask(port, answers, task, text, rid):
    """Seconds from publishing to the answer naming `rid`."""
    topic, payload = request(task, text, rid)
    t = time.monotonic()
    publish(port, topic, payload)
    # mosquitto_sub -v prints the topic first; the request itself is not it.
    answered, _ = answers.wait_for(rf"^(?!{re.escape(topic)} ).*{re.escape(rid)}", after=t, timeout=300)
    return answered - t


def measure(binary, config_path, warm_runs, keep):
    work = Path(tempfile.mkdtemp(prefix="slmd-startup-"))
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        text = config_path.read_text()
        base = config_path.parent.resolve()
        model = re.search(r'^\[model\][^\[]*?^name = "([^"]+)"', text, re.M | re.S)[1]
        cache = REPO / ".cache/state"
        subprocess.run([binary, "model", "fetch", model, "--state-dir", str(cache), "--manifests", str(REPO / "models")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = work / "state"
        shutil.copytree(cache / "models", state / "models", copy_function=os.link)
        text = re.sub(r'^dir = .*$', f'dir = "{state}"', text, flags=re.M)
        text = re.sub(r'"(\.\./|examples/)', lambda m: f'"{base}/{m[1]}', text)
        config = work / "slmd.toml"
        config.write_text(text)
        tasks = tasks_of(text)
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-t", "#", "-v"], stdout=subprocess.PIPE)
        answers = Lines(sub.stdout)
        time.sleep(0.3)
        rows = []
        for i, phase in enumerate(["cold"] + ["warm"] * warm_runs):
            run = Run(binary, config, port, work, f"{i}")
            row = {"config": str(config_path.relative_to(REPO)) if config_path.is_relative_to(REPO) else str(config_path),
                   "start": phase, "ready_s": round(run.wait_ready(), 2)}
            row["ready_rss_mib"] = round(run.rss_mib("VmRSS"))
            status_gap, log_gap = run.silences()
            row["longest_status_gap_s"] = round(status_gap, 1)
            row["longest_log_gap_s"] = round(log_gap, 1)
            run.log.wait_for("subscribed to", timeout=120)
            for task in tasks:
                row[f"first_{task[1]}_ms"] = round(
                    ask(port, answers, task, "turn off the kitchen lights", f"first-{i}-{task[0]}") * 1000)
            extract = [t for t in tasks if t[1] == "extract"]
            if extract and phase == "cold":
                took = [ask(port, answers, extract[0], "turn off the kitchen lights", f"steady-{i}-{k}")
                        for k in range(20)]
                row["steady_extract_p50_ms"] = round(statistics.median(took) * 1000)
            t = time.monotonic()
            for task in tasks:
                for k in range(16):
                    topic, payload = request(task, LONG_TEXT, f"long-{i}-{task[0]}-{k}")
                    publish(port, topic, payload)
            for task in tasks:
                answers.wait_for(rf"^(?!{re.escape(task[3])} ).*long-{i}-{task[0]}-15", after=t, timeout=600)
            row["peak_rss_mib"] = round(run.rss_mib())
            if any(t[2] == "hermes" for t in tasks):
                t = time.monotonic()
                rid = f"inject-{i}"
                publish(port, "hermes/injection/perform",
                        json.dumps({"id": rid, "operations": [["add", {"area": [f"Attic {i}"]}]]}))
                done, line = answers.wait_for(rf"hermes/(injection/complete|error/injection).*{rid}", after=t)
                if "error" in line:
                    raise RuntimeError(line)
                row["injection_applied_ms"] = round((done - t) * 1000)
                # The old engine answers until the new one is ready: both are
                # in memory for a moment.
                row["peak_rss_with_swap_mib"] = round(run.rss_mib())
            run.stop()
            rows.append(row)
        sub.kill()
        return rows
    finally:
        broker.kill()
        if keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slmd", default=str(REPO / "target/release/slmd"))
    p.add_argument("--warm-runs", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    p.add_argument("configs", nargs="*", default=["configs/demo.toml", "configs/smart-home.toml"])
    a = p.parse_args()
    if not Path(a.slmd).exists():
        subprocess.run(["cargo", "build", "--release", "--locked", "--bins", "-q"], cwd=REPO, check=True)
    rows = []
    for c in a.configs:
        rows.extend(measure(a.slmd, (REPO / c).resolve() if not Path(c).is_absolute() else Path(c), a.warm_runs, a.keep))
    if a.json:
        print(json.dumps(rows))
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |")


if __name__ == "__main__":
    sys.exit(main())
