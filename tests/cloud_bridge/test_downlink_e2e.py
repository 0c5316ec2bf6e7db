"""Commands from HQ to a real gateway process (``store-gateway run``): the runtime wires the downlink to the
journal, the stock ledger and the uplink. HQ here is a mosquitto broker, the reference receiver and a plain MQTT
client that publishes commands and reads the answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_bridge.hq.service import HqReceiver
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.topics import commands_topic, events_topic, responses_topic
from cloud_bridge.wire import decode_batch, encode_batch
from gateway.kernel.mqtt_client import Message, MqttClient
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    GATEWAY_ID,
    HQ_PREFIX,
    HQ_SIGNER,
    STORE_ID,
    TERMINALS,
    GatewayProcess,
    HqView,
    broker_config,
    catalog_stock,
    poll_until,
    publish_and_wait,
    report_figures,
    running_receiver,
    sale_payload,
    sign_command,
    time_until,
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
        topic = commands_topic(HQ_PREFIX, STORE_ID, GATEWAY_ID)
        await self.client.publish(topic, orjson.dumps(sign_command(topic, body)), qos=1)
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


# --- resend: scattered holes of a quiet gateway -------------------------------------------------------------

HOLE_SALES = 1000
RESEND_INTERVAL_S = 10.0
"""Long next to how fast a gateway resends a few hundred events, so a second ask means a second round."""


@contextlib.asynccontextmanager
async def receiver_with(
    broker: Mosquitto, db_path: Path, resend_interval_s: float | None
) -> AsyncIterator[tuple[HqReceiver, SqliteReceiverStore]]:
    """The reference receiver in this loop (one receiver: a missing seq below complete_through is lost at
    once), subscribed before it yields."""
    store = SqliteReceiverStore(db_path, lost_grace_s=0)
    receiver = HqReceiver(
        broker_config(broker, "5"),
        store,
        prefix=HQ_PREFIX,
        client_id="hq-receiver-resend",
        resend_interval_s=resend_interval_s,
        signer=HQ_SIGNER if resend_interval_s is not None else None,
        backoff_cap_s=1.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(receiver.run(stop))
    try:
        await poll_until(lambda: task.done() or receiver.connected, "the receiver to subscribe")
        if task.done():
            task.result()
        yield receiver, store
    finally:
        stop.set()
        try:
            async with asyncio.timeout(WITHIN):
                await task
        finally:
            store.close()


async def test_scattered_holes_of_a_quiet_gateway_heal_in_one_or_two_rounds(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """HQ holds every other event of a real gateway (a lossy path: a tap copied its batches and passed on only
    the odd seqs) and then hears nothing from it for longer than the resend interval. The receiver asks for
    all the holes in one multi-range command; the gateway answers once and resends them from its journal."""
    api_port = free_port()
    stock = catalog_stock()
    config_path = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=tmp_path / "data",
        api_port=api_port,
        stock=stock,
    )
    gateway = GatewayProcess(config_path, api_port, tmp_path / "gateway.log")
    events_at = events_topic(HQ_PREFIX, STORE_ID, GATEWAY_ID)
    captured: dict[int, dict[str, Any]] = {}
    responses: list[dict[str, Any]] = []

    tapping = [True]

    def tap(message: Message) -> None:
        if message.topic == events_at:
            if not tapping[0]:
                return
            for event in decode_batch(bytes(message.payload)).events:
                captured[int(event["seq"])] = event
        else:
            responses.append(orjson.loads(message.payload))

    watcher = MqttClient(broker_config(hq_broker, "5"), "hq-tap", clean_start=True, on_message=tap)
    await watcher.connect()
    await watcher.subscribe([(events_at, 1), (responses_topic(HQ_PREFIX, STORE_ID, GATEWAY_ID), 1)])
    hq_db = tmp_path / "hq.db"
    try:
        gateway.start()
        await gateway.wait_healthy()
        sku = stock[0].sku
        await publish_and_wait(
            store_broker,
            [
                (
                    f"store/pos/{TERMINALS[n % len(TERMINALS)]}/sale",
                    sale_payload(f"R-{n}", "reg-1", [(sku, 1)]),
                )
                for n in range(HOLE_SALES)
            ],
            "tills",
        )

        async def delivered() -> bool:
            health = await gateway.health()
            last = int(health["last_seq"])
            return health["backlog"] == 0 and len(captured) >= last > HOLE_SALES

        await poll_until(delivered, "every event of the gateway at the tap", state=lambda: len(captured))
        last_seq = max(captured)
        assert sorted(captured) == list(range(1, last_seq + 1))
        holes = [seq for seq in captured if seq % 2 == 0]
        tapping[0] = False

        # The lossy copy: odd seqs only, with the gateway's promise that everything up to last_seq was sent.
        kept = [seq for seq in sorted(captured) if seq % 2]
        lossy = [
            encode_batch(
                STORE_ID,
                GATEWAY_ID,
                part,
                [orjson.dumps(captured[seq]) for seq in part],
                cls="transaction",
                complete_through=last_seq,
            )
            for part in (kept[i : i + 100] for i in range(0, len(kept), 100))
        ]
        async with receiver_with(hq_broker, hq_db, None) as (_, store):
            await publish_and_wait(hq_broker, [(events_at, payload) for payload in lossy], "hq-lossy-path")
            await poll_until(lambda: store.count() >= len(kept), "the lossy copy stored")
            # Usually exactly the even seqs; a batch the gateway sent again on its own (a QoS 1 retry) may
            # have filled a few.
            lost_at_hq = store.classes(GATEWAY_ID, STORE_ID).lost
        assert len(lost_at_hq) > len(holes) // 2
        assert set(lost_at_hq) <= {(s, s) for s in holes}

        # Quiet: nothing from the gateway for longer than the resend interval (it has nothing new to send).
        with HqView(hq_db) as view:
            quiet_since = view._db.execute(
                "SELECT last_received_at FROM gateways WHERE gateway_id = ?", (GATEWAY_ID,)
            ).fetchone()[0]
        quiet_at = datetime.fromisoformat(quiet_since)
        await poll_until(
            lambda: (datetime.now(UTC) - quiet_at).total_seconds() > RESEND_INTERVAL_S,
            "the gateway to be quiet for longer than the resend interval",
            within=RESEND_INTERVAL_S * 3,
        )
        seqs_before = int((await gateway.health())["last_seq"])

        started = time.monotonic()
        async with receiver_with(hq_broker, hq_db, RESEND_INTERVAL_S) as (receiver, store):
            healed_at = await time_until(
                lambda: store.classes(GATEWAY_ID, STORE_ID).lost == [] and store.count() >= last_seq,
                "every hole filled from the gateway's journal",
                within=RESEND_INTERVAL_S * 6,
                state=lambda: (receiver.resend_commands, store.classes(GATEWAY_ID, STORE_ID).lost[:5]),
            )
            commands, ranges_asked = receiver.resend_commands, receiver.resend_ranges_asked
        await poll_until(lambda: len(responses) >= commands, "the gateway's answer to every command")
        seqs_after = int((await gateway.health())["last_seq"])
        assert await gateway.terminate() == 0, gateway.log_tail()
    finally:
        await watcher.disconnect()
        gateway.close()

    # One multi-range command heals them all (a later round only repeats it if the first answer came late).
    assert commands >= 1, commands
    first = responses[0]
    assert (first["command"], first["status"]) == ("resend", "ok"), first
    assert first["result"]["missing"] == []
    assert sum(b - a + 1 for a, b in first["result"]["resent"]) == len(lost_at_hq)
    with HqView(hq_db) as view:
        assert view.seqs()[:last_seq] == list(range(1, last_seq + 1))
        assert view.counters()["conflicts"] == 0
    report_figures(
        record_property,
        capsys,
        "scattered holes of a quiet gateway",
        {
            "events": last_seq,
            "holes": len(lost_at_hq),
            "resend_commands": commands,
            "ranges_asked": ranges_asked,
            "gateway_events_during_heal": seqs_after - seqs_before,
            "heal_s": healed_at - started,
        },
    )
