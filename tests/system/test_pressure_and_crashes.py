"""Failure paths found in review: a full disk, a tiny commit size, a crashing message handler, a moving flush."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.kernel.config import BrokerConfig, JournalConfig
from gateway.kernel.journal import BALLAST_BYTES, BALLAST_FILE, Ballast, Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import Message, MqttClient
from gateway.ledger.config import StockConfig, StockItem
from gateway.ledger.stock import StockLedger
from tests.harness.brokers import Mosquitto
from tests.harness.pos_drafts import pos_draft


@contextlib.asynccontextmanager
async def writer(journal: Journal) -> AsyncIterator[None]:
    await journal.open()
    task = asyncio.create_task(journal.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await journal.close()


async def test_a_full_disk_never_moves_stock_twice(tmp_path: Path) -> None:
    """SQLITE_FULL rolls the transaction back by itself; the ledger must reload, not re-apply on each retry."""
    metrics = Metrics()
    ledger = StockLedger(StockConfig(items=[StockItem(sku="TEA", on_hand=1000)]), metrics)
    journal = Journal(tmp_path / "j.db", "s", "g", JournalConfig(commit_max_delay_ms=0), metrics, [ledger])
    async with writer(journal):
        conn = journal._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")  # the "disk" is full from now on
        for i in range(30):
            journal.submit(pos_draft(f"R{i}", [("TEA", "1")]))
        for _ in range(300):  # at least one failed commit and one retry
            if journal._failing:
                break
            await asyncio.sleep(0.01)
        assert journal._failing
        await asyncio.sleep(1.2)
        conn.execute("PRAGMA max_page_count=1000000")  # space again
        async with asyncio.timeout(30):
            await journal.flush()
        assert await journal.query("SELECT on_hand FROM stock WHERE sku='TEA'") == [(970.0,)]
        assert await journal.query("SELECT COUNT(*) FROM events WHERE kind='pos.sale'") == [(30,)]
    # The disk reserve kept next to the journal was given back when the disk filled up.
    assert not (tmp_path / BALLAST_FILE).exists()


async def test_the_disk_reserve_is_kept_next_to_the_journal_and_given_back_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "s", "g", JournalConfig(), Metrics())
    async with writer(journal):
        pass
    reserve = tmp_path / BALLAST_FILE
    assert reserve.stat().st_size == BALLAST_BYTES
    assert reserve.stat().st_blocks * 512 >= BALLAST_BYTES  # allocated, not sparse: it really frees space
    ballast = Ballast(reserve)
    assert ballast.release("test")
    assert not ballast.release("test")  # nothing left to give


async def test_flush_does_not_chase_a_moving_delivered_mark(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "s", "g", JournalConfig(commit_max_delay_ms=0), Metrics())
    async with writer(journal):
        for i in range(50):
            journal.submit(pos_draft(f"R{i}", [("TEA", "1")]))

        async def hq_keeps_acking() -> None:
            for seq in range(1, 10_000):
                journal.note_delivered(seq)
                await asyncio.sleep(0.001)

        acker = asyncio.create_task(hq_keeps_acking())
        async with asyncio.timeout(30):  # a hang detector, not a speed check
            await journal.flush()
        acker.cancel()
        assert journal.last_seq >= 50


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_crashing_handler_does_not_jam_the_connection(store_broker: Mosquitto, protocol: str) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[str] = []

    def handler(message: Message) -> None:
        if message.topic.endswith("/boom"):
            raise RuntimeError("handler bug")
        got.append(message.topic)

    cfg = BrokerConfig(host=store_broker.host, port=store_broker.port, protocol=protocol)  # type: ignore[arg-type]
    sub = MqttClient(cfg, "crashy", clean_start=True, on_message=handler)
    await sub.connect()
    await sub.subscribe([("c/#", 1)])
    pub = MqttClient(cfg, "crash-pub", clean_start=True)
    await pub.connect()
    await pub.publish("c/boom", b"x")
    if protocol == "5":  # the same through paho's own reader (a packet with properties)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = ("k", "v")
        pub._client.publish("c/boom", b"x", qos=0, properties=props)
    for i in range(3):
        await pub.publish(f"c/ok{i}", b"fine")
    for _ in range(250):
        if len(got) == 3:
            break
        await asyncio.sleep(0.02)
    assert got == ["c/ok0", "c/ok1", "c/ok2"]
    await pub.disconnect()
    await sub.disconnect()


async def test_commit_size_one_still_drains_the_broker(store_broker: Mosquitto, tmp_path: Path) -> None:
    """The smallest valid commit size: intake pauses at a backlog of 1 and must resume, not stall."""
    from drivers.base import DriverContext
    from drivers.devices import DeviceRegistry
    from drivers.mqtt.config import MqttDriverConfig, TopicRoute
    from drivers.mqtt.driver import MqttIntake
    from gateway.config import GatewayConfig

    metrics = Metrics()
    journal = Journal(tmp_path / "j.db", "s", "g", JournalConfig(commit_max_events=1), metrics)
    broker = BrokerConfig(host=store_broker.host, port=store_broker.port)
    driver_config = MqttDriverConfig(
        routes=[TopicRoute(pattern="store/pos/{device_id}/sale", kind="pos.sale")], unknown_devices="accept"
    )
    config = GatewayConfig.model_validate(
        {
            "gateway_id": "g",
            "store": {"id": "s", "name": "Tiny commits"},
            "store_broker": broker.model_dump(),
            "hq": {"host": "127.0.0.1"},
            "api": {"enabled": False},
        }
    )
    ctx = DriverContext(journal, metrics, DeviceRegistry(journal.submit), config)
    intake = MqttIntake(driver_config, ctx)
    async with writer(journal):
        task = asyncio.create_task(intake.run())
        for _ in range(500):
            if metrics.driver_connected.labels(intake.name)._value.get():
                break
            await asyncio.sleep(0.01)
        pub = MqttClient(broker, "tiny-pub", clean_start=True)
        await pub.connect()
        import orjson

        for i in range(100):
            body = {"receipt_no": f"R{i}", "register_id": "1", "currency": "HKD",
                    "lines": [{"sku": "TEA", "quantity": 1, "unit_price": "1"}],
                    "totals": {"subtotal": "1", "total": "1"}}  # fmt: skip
            await pub.publish("store/pos/till-1/sale", orjson.dumps(body))
        sales = metrics.committed.labels("pos.sale")
        for _ in range(1500):
            if sales._value.get() >= 100:
                break
            await asyncio.sleep(0.01)
        assert sales._value.get() == 100  # (and the device.status event of the till coming online)
        await pub.disconnect()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _batch(store: str, gateway: str, seqs: list[int], data: object = None) -> bytes:
    from cloud_bridge.wire import encode_batch
    from gateway.kernel.events import uuid7

    bodies = [
        orjson_dumps(
            {
                "id": uuid7(),
                "store_id": store,
                "gateway_id": gateway,
                "seq": seq,
                "kind": "pos.sale",
                "device_id": "pos-1",
                "recorded_at": "2026-11-22T02:00:00.000Z",
                "data": data or {},
            }
        )
        for seq in seqs
    ]
    return encode_batch(store, gateway, seqs, bodies, cls="transaction", complete_through=0)


def orjson_dumps(value: object) -> bytes:
    import orjson

    return orjson.dumps(value)


def test_two_stores_may_use_the_same_gateway_id(tmp_path: Path) -> None:
    from cloud_bridge.hq.model import StoreResult
    from cloud_bridge.hq.sqlite import SqliteReceiverStore
    from cloud_bridge.wire import decode_batch

    store = SqliteReceiverStore(tmp_path / "hq.db")
    try:
        first = store.store_batch("hk-001", "gw-01", decode_batch(_batch("hk-001", "gw-01", [1, 2])))
        second = store.store_batch("hk-002", "gw-01", decode_batch(_batch("hk-002", "gw-01", [1, 2])))
        assert first == second == StoreResult(new=2, duplicates=0, conflicts=0)
        assert store.count() == 4
        assert store.gaps("gw-01", "hk-002") == []
        assert [e["seq"] for e in store.events("gw-01", store_id="hk-002")] == [1, 2]
        with pytest.raises(ValueError, match="name the store"):
            store.gaps("gw-01")
    finally:
        store.close()


def test_a_pathological_batch_is_not_fatal(tmp_path: Path) -> None:
    """An event nested 300 deep (orjson reads it but could not write it back): the receiver keeps the bytes as
    the gateway sent them, so it stores it as it is, and the batch after it too."""
    from cloud_bridge.hq.model import BatchToStore, StoreResult
    from cloud_bridge.hq.sqlite import SqliteReceiverStore
    from cloud_bridge.wire import decode_batch

    nested = b'{"n":' * 300 + b'"x"' + b"}" * 300
    head, _, body = _batch("hk-001", "gw-01", [1], "NESTED").partition(b"\n")
    body = body.replace(b'"NESTED"', nested)
    bad = re.sub(rb'"raw_bytes":\d+', b'"raw_bytes":%d' % len(body), head) + b"\n" + body
    good = _batch("hk-001", "gw-01", [2])
    store = SqliteReceiverStore(tmp_path / "hq.db")
    try:
        results = store.apply(
            [
                BatchToStore("retail/hk-001/gw-01/events", len(bad), "hk-001", "gw-01", decode_batch(bad)),
                BatchToStore("retail/hk-001/gw-01/events", len(good), "hk-001", "gw-01", decode_batch(good)),
            ]
        )
        assert results == [StoreResult(new=1, duplicates=0, conflicts=0)] * 2
        assert store.count() == 2
    finally:
        store.close()
