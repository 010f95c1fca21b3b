"""Fixtures of the conformance suite: real brokers, the real slmd binary and
the real model, on free loopback ports; clients as their users run them.

Everything listens on 127.0.0.1 only and stops when the session ends.
"""

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# SLMD_BIN runs the suite against another build (an older commit's, say).
SLMD = Path(os.environ.get("SLMD_BIN", REPO / "target" / "debug" / "slmd"))
# How long a client may wait for its answer. One classification takes tens
# of milliseconds here; seconds are for a busy CI machine, not for a daemon
# that waits for unrelated traffic before it looks at its inbox.
ANSWER_SECS = 10
# A first start trains the task heads (cached under .cache afterwards).
START_SECS = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, secs=10):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mosquitto:
    """Debian's mosquitto on a free port; `extra` lines go into its config."""

    def __init__(self, workdir, extra=""):
        self.port = free_port()
        conf = Path(workdir) / f"mosquitto-{self.port}.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"set_tcp_nodelay true\nmax_queued_messages 0\n{extra}\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def close(self):
        stop(self.proc)


class Amqtt:
    """amqtt's broker (PyPI), which speaks MQTT 3.1.1 only."""

    def __init__(self, workdir):
        self.port = free_port()
        conf = Path(workdir) / f"amqtt-{self.port}.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        # Installed beside the interpreter that runs the suite (the venv).
        amqtt = Path(sys.executable).parent / "amqtt"
        self.log = Path(workdir) / f"amqtt-{self.port}.log"
        self.proc = subprocess.Popen(
            [str(amqtt), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )
        wait_for_port(self.port, secs=30)

    def close(self):
        stop(self.proc)


class ConnectionCounter:
    """A TCP forwarder in front of a broker that counts the connections made
    through it: how often a client (re)connects, whatever the broker logs."""

    def __init__(self, target_port):
        self.target = target_port
        self.count = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.count += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.server.close()


class Daemon:
    """`slmd run` with tests/conformance/slmd.toml, its log in a file."""

    def __init__(self, workdir, broker_port, name="slmd"):
        work = Path(workdir) / name
        state = work / "state"
        state.mkdir(parents=True)
        # The model store is the checkout's (scripts/test.sh fetches the
        # model there); the head cache is kept between runs.
        (state / "models").symlink_to(REPO / ".cache" / "state" / "models")
        heads = REPO / ".cache" / "conformance" / "heads"
        heads.mkdir(parents=True, exist_ok=True)
        (state / "heads").symlink_to(heads)
        text = (HERE / "slmd.toml").read_text()
        text = text.replace("@STATE@", str(state)).replace("@REPO@", str(REPO))
        text = text.replace('client_id = "slmd-conformance"', f'client_id = "slmd-{name}-{uuid.uuid4().hex[:8]}"')
        self.config = work / "slmd.toml"
        self.config.write_text(text)
        self.log = work / "slmd.log"
        self.proc = subprocess.Popen(
            [str(SLMD), "run", "--config", str(self.config), "--broker", f"mqtt://127.0.0.1:{broker_port}"],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )

    def text(self):
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern, secs=START_SECS):
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"slmd exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} in the slmd log:\n{self.text()[-3000:]}")

    def wait_subscribed(self, secs=20):
        """Model loaded (slow the first time), then subscribed to the
        broker within `secs`."""
        self.wait_for_log("serving with")
        self.wait_for_log("subscribed to", secs)

    def close(self):
        stop(self.proc)


class Listener:
    """A paho client subscribed to `topics` (QoS 1) that keeps what arrives."""

    def __init__(self, port, topics, protocol=paho.MQTTv5):
        self.messages = queue.Queue()
        self.client = paho.Client(client_id=f"listen-{uuid.uuid4().hex[:8]}", protocol=protocol)
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(t, 1) for t in topics])
        assert subscribed.wait(10), "no SUBACK"

    def wait(self, match, secs=ANSWER_SECS):
        """The first message for which `match(message)` holds, or None."""
        deadline = time.monotonic() + secs
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                return None
            if match(m):
                return m
        return None

    def collect(self, secs):
        """Everything that arrives within `secs`."""
        time.sleep(secs)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get())
        return out

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def with_id(id_):
    """Matches a JSON message whose `id` is `id_`."""

    def match(m):
        try:
            return json.loads(m.payload).get("id") == id_
        except ValueError:
            return False

    return match


def publish(port, topic, payload, qos, protocol=paho.MQTTv5, properties=None):
    """Connects, publishes once (waiting for the broker's acknowledgement at
    QoS 1 and 2), disconnects: a one-shot client such as a script."""
    c = paho.Client(client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=protocol)
    c.connect("127.0.0.1", port)
    c.loop_start()
    info = c.publish(topic, payload, qos=qos, properties=properties)
    info.wait_for_publish()
    c.disconnect()
    c.loop_stop()


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="slmd-conformance-") as d:
        yield d


@pytest.fixture(scope="session")
def broker(workdir):
    b = Mosquitto(workdir)
    yield b
    b.close()


@pytest.fixture(scope="session")
def slmd(workdir, broker):
    d = Daemon(workdir, broker.port)
    try:
        d.wait_subscribed()
        yield d
    finally:
        d.close()
