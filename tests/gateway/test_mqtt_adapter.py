"""The paho asyncio adapter against a real mosquitto: publish/PUBACK, manual ack, session resumption."""

from __future__ import annotations

import asyncio

import pytest

from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError
from tests.harness.brokers import Mosquitto


def _cfg(broker: Mosquitto, protocol: str = "5") -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]


async def test_publish_and_receive_with_manual_ack(store_broker: Mosquitto) -> None:
    got: list[Message] = []
    sub = MqttClient(_cfg(store_broker), "sub-1", clean_start=False, manual_ack=True, on_message=got.append)
    await sub.connect()
    await sub.subscribe([("t/#", 1)])
    pub = MqttClient(_cfg(store_broker, "3.1.1"), "pub-1", clean_start=True)
    await pub.connect()
    await asyncio.gather(*(pub.publish(f"t/{i}", b"x%d" % i) for i in range(50)))
    for _ in range(100):
        if len(got) == 50:
            break
        await asyncio.sleep(0.02)
    assert sorted(m.payload for m in got) == sorted(b"x%d" % i for i in range(50))
    # Ack only half: the other half must be redelivered to the persistent session.
    for m in got[:25]:
        sub.ack(m.mid, m.qos)
    await asyncio.sleep(0.1)
    await sub.disconnect()
    again: list[Message] = []
    sub2 = MqttClient(
        _cfg(store_broker), "sub-1", clean_start=False, manual_ack=True, on_message=again.append
    )
    assert await sub2.connect() is True
    for _ in range(100):
        if len(again) >= 25:
            break
        await asyncio.sleep(0.02)
    assert sorted(m.payload for m in again) == sorted(m.payload for m in got[25:])
    await sub2.disconnect()
    await pub.disconnect()


async def test_connect_refused_raises() -> None:
    from tests.harness.brokers import free_port

    client = MqttClient(BrokerConfig(port=free_port()), "nobody", clean_start=True)
    with pytest.raises(MqttError, match="cannot connect"):
        await client.connect(within_s=3)


async def test_publish_future_fails_when_broker_dies(store_broker: Mosquitto) -> None:
    client = MqttClient(_cfg(store_broker), "dying", clean_start=True)
    await client.connect()
    store_broker.stop()
    reason = await asyncio.wait_for(client.wait_closed(), 5)
    assert reason
    fut = client.publish("t", b"late")
    try:
        await fut
    except MqttError:
        pass
    else:
        raise AssertionError("publish on a dead connection must fail")


async def _collect(client: MqttClient, got: list[Message], count: int) -> None:
    for _ in range(500):
        if len(got) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {len(got)} of {count} messages arrived")


async def test_fast_path_and_pahos_path_agree(store_broker: Mosquitto) -> None:
    """QoS 0 and 1, MQTT 5 messages with properties (left to paho's reader), payloads far larger than the
    64 KiB read buffer, and a plain (auto-acking) subscriber: every message arrives intact, in order."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[Message] = []
    sub = MqttClient(_cfg(store_broker), "fast-sub", clean_start=True, on_message=got.append)
    await sub.connect()
    await sub.subscribe([("f/#", 1)])
    pub = MqttClient(_cfg(store_broker), "fast-pub", clean_start=True)
    await pub.connect()
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = ("k", "v")
    sent: list[tuple[str, bytes, int]] = []
    for i in range(300):
        size = 10 if i % 50 else 300_000  # some payloads span several buffer reads
        payload = bytes([i % 256]) * size
        qos = i % 2
        sent.append((f"f/{i}", payload, qos))
    futures = []
    for i, (topic, payload, qos) in enumerate(sent):
        if i % 7 == 0:
            info = pub._client.publish(
                topic, payload, qos=qos, properties=props
            )  # with properties: paho's path
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if qos:
                pub._pending[info.mid] = fut
            else:
                fut.set_result(None)
            futures.append(fut)
        else:
            futures.append(pub.publish(topic, payload, qos=qos))
    await asyncio.gather(*futures)
    await _collect(sub, got, len(sent))
    assert [(m.topic, bytes(m.payload), m.qos) for m in got] == sent
    await pub.disconnect()
    await sub.disconnect()


async def test_pause_reading_holds_messages_at_the_broker(store_broker: Mosquitto) -> None:
    got: list[Message] = []
    sub = MqttClient(_cfg(store_broker), "pausing", clean_start=True, on_message=got.append)
    await sub.connect()
    await sub.subscribe([("p/#", 1)])
    sub.pause_reading()
    pub = MqttClient(_cfg(store_broker), "p-pub", clean_start=True)
    await pub.connect()
    await asyncio.gather(*(pub.publish(f"p/{i}", b"x" * 100) for i in range(200)))
    await asyncio.sleep(0.3)
    assert got == []
    sub.resume_reading()
    await _collect(sub, got, 200)
    assert sorted(int(m.topic.split("/")[1]) for m in got) == list(range(200))
    await pub.disconnect()
    await sub.disconnect()


async def test_an_expired_message_is_not_delivered_to_a_returning_session(store_broker: Mosquitto) -> None:
    """MQTT 5 message expiry: what waited in an offline session longer than its expiry is dropped by the broker
    (the HQ receiver's resend commands use it), what did not expire is delivered."""
    sub = MqttClient(_cfg(store_broker), "sub-expiry", clean_start=False)
    await sub.connect()
    await sub.subscribe([("cmd/#", 1)])
    await sub.disconnect()
    pub = MqttClient(_cfg(store_broker), "pub-expiry", clean_start=True)
    await pub.connect()
    await pub.publish("cmd/old", b"old", message_expiry_s=1)
    await pub.publish("cmd/kept", b"kept", message_expiry_s=3600)
    await asyncio.sleep(2.2)  # past the first message's expiry (whole seconds at the broker)
    await pub.publish("cmd/marker", b"marker")
    got: list[Message] = []
    sub2 = MqttClient(_cfg(store_broker), "sub-expiry", clean_start=False, on_message=got.append)
    await sub2.connect()
    for _ in range(250):
        if any(m.payload == b"marker" for m in got):
            break
        await asyncio.sleep(0.02)
    assert [m.payload for m in got] == [b"kept", b"marker"]
    await sub2.disconnect()
    await pub.disconnect()
