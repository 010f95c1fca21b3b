"""paho-mqtt, the client most Python integrations use, over MQTT 3.1.1 and 5
at every QoS, and MQTT 5 request/response."""

import json
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ANSWER_SECS, Listener, publish, with_id

LABELS = {
    "lights_on", "lights_off", "lights_dim", "lights_brighten", "lights_colour",
    "make_coffee", "vacuum", "plug_on", "plug_off",
}


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_a_request_at_any_qos_and_version_is_answered_promptly(broker, slmd, protocol, qos):
    """Finding 1: QoS 0 input must not wait for later QoS 1 traffic."""
    listener = Listener(broker.port, ["slmd/home/intent"], protocol=protocol)
    id_ = f"paho-{protocol}-{qos}-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"id": id_, "text": "turn off the lights"})
    publish(broker.port, "home/kitchen/command", body, qos=qos, protocol=protocol)
    got = listener.wait(with_id(id_))
    assert got is not None, f"QoS {qos} request not answered within {ANSWER_SECS} s"
    result = json.loads(got.payload)
    assert result["task"] == "home"
    assert result["label"] == "lights_off"
    assert result["label"] in LABELS
    listener.close()


def request_properties(response_topic, correlation=None):
    p = Properties(PacketTypes.PUBLISH)
    p.ResponseTopic = response_topic
    if correlation is not None:
        p.CorrelationData = correlation
    return p


def test_mqtt5_response_topic_and_correlation_data_round_trip(broker, slmd):
    reply_to = f"conformance/replies/{uuid.uuid4().hex[:8]}"
    listener = Listener(broker.port, [reply_to])
    correlation = b"\x00\x01req-7\xff"
    id_ = f"rr-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"id": id_, "text": "start the vacuum cleaner"})
    publish(broker.port, "home/hall/command", body, qos=1, properties=request_properties(reply_to, correlation))
    got = listener.wait(with_id(id_))
    assert got is not None, f"no answer on the response topic within {ANSWER_SECS} s"
    assert got.topic == reply_to
    assert got.properties.CorrelationData == correlation
    assert json.loads(got.payload)["label"] in LABELS
    listener.close()


def test_same_text_to_two_response_topics_is_answered_once_on_each(broker, slmd):
    """Finding 2: two requesters asking the same thing without an id are two
    requests, not a duplicate."""
    a = f"conformance/replies/a-{uuid.uuid4().hex[:8]}"
    b = f"conformance/replies/b-{uuid.uuid4().hex[:8]}"
    listener = Listener(broker.port, [a, b])
    # Plain text, no id; unique to this run so no earlier test's copy counts.
    text = f"dim the lights a little {uuid.uuid4().hex[:6]}"
    publish(broker.port, "home/office/command", text, qos=1, properties=request_properties(a, b"A"))
    time.sleep(0.6)
    publish(broker.port, "home/office/command", text, qos=1, properties=request_properties(b, b"B"))
    got = listener.collect(ANSWER_SECS)
    on_a = [m for m in got if m.topic == a]
    on_b = [m for m in got if m.topic == b]
    assert (len(on_a), len(on_b)) == (1, 1), f"answers on a: {len(on_a)}, on b: {len(on_b)}"
    assert on_a[0].properties.CorrelationData == b"A"
    assert on_b[0].properties.CorrelationData == b"B"
    listener.close()
