"""Brokers other than a default mosquitto: one whose CONNACK grants Maximum
QoS 0, and amqtt (PyPI), an MQTT 3.1.1-only broker. Each gets its own slmd,
connected through a forwarder that counts slmd's connections."""

import json
import re
import time
import uuid

import paho.mqtt.client as paho
import pytest

from conftest import ANSWER_SECS, Amqtt, ConnectionCounter, Daemon, Listener, Mosquitto, publish, with_id


@pytest.fixture
def closing():
    things = []
    yield things.append
    for t in reversed(things):
        t.close()


def test_broker_granting_maximum_qos_0_is_served_without_reconnecting(workdir, closing):
    """Finding 3: mosquitto's `max_qos 0` puts Maximum QoS 0 in its MQTT 5
    CONNACK; a client that publishes at QoS 1 anyway is disconnected."""
    broker = Mosquitto(workdir, extra="max_qos 0")
    closing(broker)
    counter = ConnectionCounter(broker.port)
    closing(counter)
    daemon = Daemon(workdir, counter.port, name="maxqos0")
    closing(daemon)
    daemon.wait_subscribed()
    listener = Listener(broker.port, ["slmd/home/intent"])
    closing(listener)
    id_ = f"q0-{uuid.uuid4().hex[:8]}"
    publish(broker.port, "home/kitchen/command", json.dumps({"id": id_, "text": "turn on the lights"}), qos=0)
    got = listener.wait(with_id(id_))
    assert got is not None, f"not answered within {ANSWER_SECS} s through a Maximum QoS 0 broker"
    time.sleep(3)
    print(f"max_qos 0: {counter.count} connection(s)")
    assert counter.count <= 2, f"slmd connected {counter.count} times (reconnect loop)"
    flaps = len(re.findall(r"connected to broker", daemon.text()))
    assert flaps <= 2, f"{flaps} connections logged"


def test_mqtt_311_only_broker_gets_a_clear_error_and_backoff_or_works(workdir, closing):
    """Finding 3: amqtt speaks MQTT 3.1.1 only (it drops an MQTT 5
    CONNECT). slmd must either work with it (a 3.1.1 fallback) or say why it
    cannot, once and clearly, and back off instead of hammering it."""
    broker = Amqtt(workdir)
    closing(broker)
    counter = ConnectionCounter(broker.port)
    closing(counter)
    daemon = Daemon(workdir, counter.port, name="amqtt")
    closing(daemon)
    daemon.wait_for_log("serving with")
    window = 12
    started = time.monotonic()
    deadline = started + window
    served = False
    if re.search("subscribed to", daemon.text()) or _wait_subscribed(daemon, deadline):
        # A fallback to 3.1.1: then a 3.1.1 client's request must be answered.
        listener = Listener(broker.port, ["slmd/home/intent"], protocol=paho.MQTTv311)
        closing(listener)
        id_ = f"amqtt-{uuid.uuid4().hex[:8]}"
        body = json.dumps({"id": id_, "text": "turn off the lights"})
        publish(broker.port, "home/kitchen/command", body, qos=1, protocol=paho.MQTTv311)
        served = listener.wait(with_id(id_)) is not None
        assert served, "slmd subscribed through amqtt but did not answer"
        return
    attempts = counter.count
    log = daemon.text()
    print(f"amqtt: {attempts} connection attempts in {window} s")
    assert attempts <= 15, f"{attempts} connection attempts in {window} s: no backoff; log:\n{log[-1500:]}"
    said = [
        line for line in log.splitlines()
        if re.search(r" (ERROR|WARN) ", line) and re.search(r"(?i)mqtt ?5|3\.1\.1", line)
    ]
    assert said, f"no log line says the broker does not speak MQTT 5:\n{log[-2000:]}"


def _wait_subscribed(daemon, deadline):
    while time.monotonic() < deadline:
        if "subscribed to" in daemon.text():
            return True
        time.sleep(0.2)
    return False
