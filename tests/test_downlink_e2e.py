"""Commands from HQ to a real gateway process (``store-gateway run``): the runtime wires the downlink to the
journal, the stock ledger and the uplink. HQ here is a mosquitto broker, the reference receiver and a plain MQTT
client that publishes commands and reads the answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from cloud_bridge.topics import commands_topic, responses_topic
from gateway.mqtt import Message, MqttClient
from tests.brokers import Mosquitto, free_port
from tests.e2e_helpers import (
    GATEWAY_ID,
    HQ_PREFIX,
    STORE_ID,
    GatewayProcess,
    HqView,
    broker_config,
    catalog_stock,
    poll_until,
    running_receiver,
    write_config,
)

WITHIN = 30.0


class Hq:
    """HQ's side of the command channel: publish a command, wait for the answer with its request id."""

    def __init__(self) -> None:
        self.client: MqttClient | None = None
        self.answers: dict[str, dict[str, Any]] = {}
        self._arrived = asyncio.Event()

    def on_message(self, message: Message) -> None:
        answer = orjson.loads(message.payload)
        self.answers[str(answer["request_id"])] = answer
        self._arrived.set()

    async def ask(self, request_id: str, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.answers.pop(request_id, None)  # a replay reuses the id: wait for its own answer
        body: dict[str, Any] = {"request_id": request_id, "command": command}
        if args is not None:
            body["args"] = args
        assert self.client is not None
        await self.client.publish(commands_topic(HQ_PREFIX, STORE_ID, GATEWAY_ID), orjson.dumps(body), qos=1)
        async with asyncio.timeout(WITHIN):
            while request_id not in self.answers:
                self._arrived.clear()
                await self._arrived.wait()
        return self.answers[request_id]


@contextlib.asynccontextmanager
async def hq_commands(broker: Mosquitto) -> AsyncIterator[Hq]:
    hq = Hq()
    client = MqttClient(
        broker_config(broker, "5"), "hq-commander", clean_start=True, on_message=hq.on_message
    )
    hq.client = client
    await client.connect()
    await client.subscribe([(responses_topic(HQ_PREFIX, STORE_ID, GATEWAY_ID), 1)])
    try:
        yield hq
    finally:
        await client.disconnect()


async def test_commands_reach_a_running_gateway(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    api_port = free_port()
    stock = catalog_stock()
    sku = stock[0].sku
    config_path = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=tmp_path / "data",
        api_port=api_port,
        stock=stock,
    )
    gateway = GatewayProcess(config_path, api_port, tmp_path / "gateway.log")
    hq_db = tmp_path / "hq.db"
    try:
        async with running_receiver(hq_broker, hq_db), hq_commands(hq_broker) as hq:
            with HqView(hq_db) as view:
                gateway.start()
                await gateway.wait_healthy()
                await poll_until(
                    lambda: view.count("gateway.status") >= 1, "the gateway's first events at HQ"
                )

                pong = await hq.ask("p-1", "ping")
                assert pong["status"] == "ok", pong
                assert pong["result"]["pong"] is True

                config = await hq.ask("c-1", "config.get")
                assert config["status"] == "ok"
                assert config["result"]["config"]["api"]["token"] == "**********"

                args = {"sku": sku, "delta": 24, "reason": "receiving", "note": "delivery note 77"}
                first = await hq.ask("adj-1", "stock.adjust", args)
                assert first["status"] == "ok", first
                replay = await hq.ask("adj-1", "stock.adjust", args)
                assert replay["status"] == "duplicate", replay
                assert first["result"]["on_hand"] == str(int(stock[0].on_hand) + 24)
                await poll_until(
                    lambda: view.count("stock.adjusted") == 1, "the adjustment at HQ", state=view.state
                )
                await poll_until(
                    lambda: any(e["data"]["sku"] == sku for e in view.events("stock.level")),
                    "the new stock level at HQ",
                    state=view.state,
                )

                bad = await hq.ask("r-bad", "rules.set", {"rules": [{"id": "x", "type": "no.such.rule"}]})
                assert bad["status"] == "error"
                assert bad["error"]["code"] == "invalid_args"

                before = {**view.counters(), "events": view.count()}
                last = view.max_seq()
                resent = await hq.ask("rs-1", "resend", {"from_seq": 1, "to_seq": last})
                assert resent["status"] == "ok", resent
                assert resent["result"]["resent"] == [[1, last]]
                assert resent["result"]["missing"] == []
                # Resent batches reach HQ again and are dropped there as duplicates: nothing new, nothing lost.
                await poll_until(
                    lambda: view.counters()["duplicates"] >= before["duplicates"] + last,
                    "the resent events counted as duplicates at HQ",
                    state=view.state,
                )
                assert view.count() == before["events"]
                assert view.unexplained_gaps() == []
    finally:
        if gateway.running:
            assert await gateway.terminate() == 0, gateway.log_tail()
        gateway.close()
