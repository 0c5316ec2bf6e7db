"""The paho asyncio adapter against a real mosquitto: publish/PUBACK, manual ack, session resumption."""

from __future__ import annotations

import asyncio

from gateway.config import BrokerConfig
from gateway.mqtt import Message, MqttClient, MqttError
from tests.brokers import Mosquitto


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
    sub2 = MqttClient(_cfg(store_broker), "sub-1", clean_start=False, manual_ack=True, on_message=again.append)
    assert await sub2.connect() is True
    for _ in range(100):
        if len(again) >= 25:
            break
        await asyncio.sleep(0.02)
    assert sorted(m.payload for m in again) == sorted(m.payload for m in got[25:])
    await sub2.disconnect()
    await pub.disconnect()


async def test_connect_refused_raises() -> None:
    from tests.brokers import free_port

    client = MqttClient(BrokerConfig(port=free_port()), "nobody", clean_start=True)
    try:
        await client.connect(timeout=3)
    except MqttError as err:
        assert "cannot connect" in str(err)
    else:
        raise AssertionError("connect to a closed port must fail")


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
