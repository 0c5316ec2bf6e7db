"""The HQ reference receiver against a real mosquitto and a real SQLite file: store, dedup, gaps, outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from cloud_bridge import topics
from cloud_bridge.receiver import HqReceiver, format_summary, receiver_main
from cloud_bridge.receiver_store import BatchRejectedError, GatewaySummary, ReceiverStore, StoreResult
from cloud_bridge.wire import Batch, decode_batch, encode_batch
from gateway.config import BrokerConfig
from gateway.events import uuid7
from gateway.mqtt import MqttClient
from tests.brokers import Mosquitto

PREFIX = "retail"
DEADLINE_S = 15.0


def envelope(store_id: str, gateway_id: str, seq: int, event_id: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "id": event_id or str(uuid7()),
            "store_id": store_id,
            "gateway_id": gateway_id,
            "seq": seq,
            "kind": "device.status",
            "device_id": "till-1",
            "occurred_at": None,
            "recorded_at": datetime.now(UTC).isoformat(),
            "boot_id": "boot-1",
            "clock_synced": True,
            "mono_ns": seq,
            "schema": 1,
            "data": {"status": "online"},
        }
    )


def batch_bytes(
    store_id: str, gateway_id: str, seqs: Sequence[int], ids: dict[int, str] | None = None
) -> bytes:
    ids = ids or {}
    bodies = [envelope(store_id, gateway_id, s, ids.get(s)) for s in seqs]
    return encode_batch(store_id, gateway_id, list(seqs), bodies)


def batch(store_id: str, gateway_id: str, seqs: Sequence[int], ids: dict[int, str] | None = None) -> Batch:
    return decode_batch(batch_bytes(store_id, gateway_id, seqs, ids))


Protocol = Literal["3.1.1", "5"]


def cfg(broker: Mosquitto, protocol: Protocol = "5") -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, protocol=protocol)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll until the condition holds, with a generous deadline (no timed asserts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(receiver: HqReceiver) -> AsyncIterator[HqReceiver]:
    stop = asyncio.Event()
    task = asyncio.create_task(receiver.run(stop), name="test-receiver")
    try:
        await eventually(lambda: receiver.connected or task.done(), "receiver connected")
        yield receiver
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
    assert not [t for t in threading.enumerate() if t.name.startswith("hq-receiver-db")], (
        "worker thread leaked"
    )


@contextlib.asynccontextmanager
async def publisher(broker: Mosquitto) -> AsyncIterator[MqttClient]:
    client = MqttClient(cfg(broker), f"pub-{uuid7()}", clean_start=True)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


async def publish(client: MqttClient, store_id: str, gateway_id: str, payload: bytes) -> None:
    await client.publish(topics.events_topic(PREFIX, store_id, gateway_id), payload, qos=1)


def make_receiver(
    broker: Mosquitto,
    store: ReceiverStore,
    client_id: str = "hq-test",
    protocol: Protocol = "5",
    on_batch: Callable[[str, str, int, int, int], None] | None = None,
    flush_timeout_s: float = 10.0,
) -> HqReceiver:
    return HqReceiver(
        cfg(broker, protocol),
        store,
        prefix=PREFIX,
        client_id=client_id,
        on_batch=on_batch,
        backoff_base_s=0.05,
        backoff_cap_s=0.5,
        flush_timeout_s=flush_timeout_s,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReceiverStore]:
    db = ReceiverStore(tmp_path / "hq.db")
    yield db
    db.close()


def summary_of(store: ReceiverStore, gateway_id: str) -> GatewaySummary:
    (row,) = [s for s in store.summary() if s.gateway_id == gateway_id]
    return row


# --- through the broker -----------------------------------------------------------------------------------


async def test_batches_arrive_and_are_stored(hq_broker: Mosquitto, store: ReceiverStore) -> None:
    seen: list[tuple[str, str, int, int, int]] = []
    on_batch = lambda *args: seen.append(args)  # noqa: E731
    async with running(make_receiver(hq_broker, store, on_batch=on_batch)), publisher(hq_broker) as pub:
        for first in range(1, 101, 10):
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", range(first, first + 10)))
        await publish(pub, "mo-002", "gw-b", batch_bytes("mo-002", "gw-b", [1, 2, 3]))
        await eventually(lambda: store.count() == 103, "103 events stored")
        await eventually(lambda: len(seen) == 11, "on_batch called for each batch")
    events = store.events("gw-a", after_seq=95)
    assert [e["seq"] for e in events] == [96, 97, 98, 99, 100]
    assert all(e["store_id"] == "hk-001" and e["data"] == {"status": "online"} for e in events)
    assert ("mo-002", "gw-b", 1, 3, 3) in seen
    a, b = store.summary()
    assert (a.store_id, a.gateway_id, a.events, a.max_seq, a.gaps, a.missing) == (
        "hk-001",
        "gw-a",
        100,
        100,
        0,
        0,
    )
    assert (b.store_id, b.events, b.duplicates, b.conflicts) == ("mo-002", 3, 0, 0)
    assert a.lag is not None
    assert timedelta(0) <= a.lag < timedelta(minutes=5)
    assert store.gaps("gw-a") == []


async def test_duplicate_batches_are_stored_once(hq_broker: Mosquitto, store: ReceiverStore) -> None:
    first = batch_bytes("hk-001", "gw-a", range(1, 11))
    overlap = encode_batch(
        "hk-001",
        "gw-a",
        list(range(6, 16)),
        [orjson.dumps(e) for e in decode_batch(first).events[5:]]
        + [envelope("hk-001", "gw-a", s) for s in range(11, 16)],
    )
    async with running(make_receiver(hq_broker, store)), publisher(hq_broker) as pub:
        await publish(pub, "hk-001", "gw-a", first)
        await publish(pub, "hk-001", "gw-a", first)
        await publish(pub, "hk-001", "gw-a", overlap)
        await eventually(lambda: [s.duplicates for s in store.summary()] == [15], "15 duplicates counted")
    row = summary_of(store, "gw-a")
    assert (store.count(), row.events, row.max_seq, row.duplicates, row.conflicts) == (15, 15, 15, 15, 0)
    assert [e["seq"] for e in store.events("gw-a")] == list(range(1, 16))


async def test_garbage_and_wrong_topic_are_rejected_and_receiving_goes_on(
    hq_broker: Mosquitto, store: ReceiverStore
) -> None:
    async with running(make_receiver(hq_broker, store)), publisher(hq_broker) as pub:
        await publish(pub, "hk-001", "gw-a", b"\x00not json")
        await publish(pub, "hk-001", "gw-a", b'{"format": "something else"}')
        await publish(pub, "hk-001", "gw-b", batch_bytes("hk-001", "gw-a", [1, 2]))  # another gateway's batch
        await publish(pub, "hk-002", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2]))  # another store's batch
        await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2, 3]))
        await eventually(lambda: store.count() == 3 and store.count_rejected() == 4, "3 stored, 4 rejected")
    reasons = {(r.topic, r.reason.split(":")[0].split(" (")[0]) for r in store.rejections()}
    assert ("retail/hk-001/gw-a/events", "not JSON") in reasons
    assert ("retail/hk-001/gw-a/events", "not a store-gateway batch") in reasons
    by_topic = {r.topic: r for r in store.rejections()}
    assert "topic says store 'hk-001' gateway 'gw-b'" in by_topic["retail/hk-001/gw-b/events"].reason
    assert "topic says store 'hk-002' gateway 'gw-a'" in by_topic["retail/hk-002/gw-a/events"].reason
    assert by_topic["retail/hk-001/gw-b/events"].size > 0
    assert [s.gateway_id for s in store.summary()] == ["gw-a"]


async def test_survives_broker_restart_on_the_same_port(
    hq_broker: Mosquitto, store: ReceiverStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cloud_bridge.receiver")
    receiver = make_receiver(hq_broker, store)
    async with running(receiver):
        async with publisher(hq_broker) as pub:
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2]))
            await eventually(lambda: store.count() == 2, "first batch stored")
        hq_broker.stop()
        await eventually(lambda: not receiver.connected, "receiver noticed the outage")
        await eventually(
            lambda: any("cannot connect" in r.getMessage() for r in caplog.records), "a failed reconnect"
        )
        hq_broker.start()
        await eventually(lambda: receiver.connections == 2, "receiver reconnected")
        async with publisher(hq_broker) as pub:
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [3, 4, 5]))
            await eventually(lambda: store.count() == 5, "batch after the restart stored")
    assert store.gaps("gw-a") == []
    # One WARNING for the outage, then DEBUG for each failed attempt until it recovers.
    ours = [r for r in caplog.records if r.name == "cloud_bridge.receiver"]
    assert [r.getMessage().split(":")[0] for r in ours if r.levelno == logging.WARNING] == [
        "lost the HQ broker"
    ]
    assert any(r.levelno == logging.DEBUG and "cannot connect" in r.getMessage() for r in ours)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_batches_sent_while_away_arrive_after_reconnect(
    hq_broker: Mosquitto, store: ReceiverStore, protocol: Protocol
) -> None:
    async with running(make_receiver(hq_broker, store, protocol=protocol)):
        pass  # creates the persistent session and its subscription
    async with publisher(hq_broker) as pub:
        for first in (1, 4, 7):
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", range(first, first + 3)))
    assert store.count() == 0
    async with running(make_receiver(hq_broker, store, protocol=protocol)):
        await eventually(lambda: store.count() == 9, "queued batches delivered")
    assert store.gaps("gw-a") == []


async def test_no_ack_before_commit(
    hq_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the database is locked nothing is stored, so nothing is acked: the next session gets it again."""
    db = tmp_path / "hq.db"
    store = ReceiverStore(db, busy_timeout_s=0.05)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        async with running(make_receiver(hq_broker, store)):
            pass  # creates the persistent session
        locker.execute("BEGIN IMMEDIATE")
        with caplog.at_level(logging.DEBUG, logger="cloud_bridge.receiver"):
            async with (
                running(make_receiver(hq_broker, store, flush_timeout_s=0.2)),
                publisher(hq_broker) as pub,
            ):
                await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2, 3]))
                await eventually(
                    lambda: any("cannot store" in r.getMessage() for r in caplog.records), "a failed commit"
                )
        assert any("not stored" in r.getMessage() for r in caplog.records)
        locker.execute("ROLLBACK")
        assert store.count() == 0
        async with running(make_receiver(hq_broker, store)):
            await eventually(lambda: store.count() == 3, "the unacked batch redelivered and stored")
    finally:
        locker.close()
        store.close()


async def test_many_batches_in_a_burst(hq_broker: Mosquitto, store: ReceiverStore) -> None:
    payloads = [batch_bytes("hk-001", "gw-a", range(i * 50 + 1, i * 50 + 51)) for i in range(60)]
    async with running(make_receiver(hq_broker, store)), publisher(hq_broker) as pub:
        await asyncio.gather(*(publish(pub, "hk-001", "gw-a", p) for p in payloads))
        await eventually(lambda: store.count() == 3000, "3000 events stored")
    row = summary_of(store, "gw-a")
    assert (row.events, row.max_seq, row.gaps, row.duplicates) == (3000, 3000, 0, 0)


# --- the store on its own ---------------------------------------------------------------------------------


def test_gaps_are_reported(store: ReceiverStore) -> None:
    assert store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", range(1, 6))) == StoreResult(5, 0, 0)
    assert store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", range(8, 11))) == StoreResult(3, 0, 0)
    store.store_batch("hk-001", "gw-b", batch("hk-001", "gw-b", [3, 4, 9]))
    assert store.gaps("gw-a") == [(6, 7)]
    assert store.gaps("gw-b") == [(1, 2), (5, 8)]
    assert store.gaps("nobody") == []
    a = summary_of(store, "gw-a")
    assert (a.events, a.max_seq, a.gaps, a.missing) == (8, 10, 1, 2)
    b = summary_of(store, "gw-b")
    assert (b.events, b.max_seq, b.gaps, b.missing) == (3, 9, 2, 6)
    store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", [6, 7]))
    assert store.gaps("gw-a") == []


def test_conflict_is_counted_and_the_first_event_kept(
    store: ReceiverStore, caplog: pytest.LogCaptureFixture
) -> None:
    first = batch("hk-001", "gw-a", [1, 2, 3])
    store.store_batch("hk-001", "gw-a", first)
    other_id = str(uuid7())
    with caplog.at_level(logging.WARNING, logger="cloud_bridge.receiver_store"):
        result = store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", [3, 4], ids={3: other_id}))
    assert result == StoreResult(new=1, duplicates=0, conflicts=1)
    assert [e["id"] for e in store.events("gw-a")][:3] == [e["id"] for e in first.events]
    row = summary_of(store, "gw-a")
    assert (row.events, row.conflicts, row.duplicates, row.max_seq) == (4, 1, 0, 4)
    assert any("conflict" in r.getMessage() and other_id in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records if "conflict" in r.getMessage())


def test_duplicate_inside_one_batch(store: ReceiverStore) -> None:
    event = envelope("hk-001", "gw-a", 1)
    doubled = decode_batch(encode_batch("hk-001", "gw-a", [1, 1], [event, event]))
    assert store.store_batch("hk-001", "gw-a", doubled) == StoreResult(new=1, duplicates=1, conflicts=0)


def test_mismatched_batch_is_rejected_and_nothing_stored(store: ReceiverStore) -> None:
    with pytest.raises(BatchRejectedError, match="topic says store 'hk-001' gateway 'gw-b'"):
        store.store_batch("hk-001", "gw-b", batch("hk-001", "gw-a", [1]))
    forged: dict[str, Any] = orjson.loads(envelope("hk-009", "gw-a", 2))
    mixed = encode_batch("hk-001", "gw-a", [1, 2], [envelope("hk-001", "gw-a", 1), orjson.dumps(forged)])
    with pytest.raises(BatchRejectedError, match="event seq 2 says store 'hk-009'"):
        store.store_batch("hk-001", "gw-a", decode_batch(mixed))
    forged = orjson.loads(envelope("hk-001", "gw-a", 1))
    forged["recorded_at"] = "2024-01-01T00:00:00"  # no UTC offset
    naive = encode_batch("hk-001", "gw-a", [1], [orjson.dumps(forged)])
    with pytest.raises(BatchRejectedError, match="recorded_at"):
        store.store_batch("hk-001", "gw-a", decode_batch(naive))
    assert store.count() == 0
    assert store.summary() == []


def test_format_summary() -> None:
    row = GatewaySummary("hk-001", "gw-a", 8, 10, 1, 2, 3, 0, timedelta(seconds=75), None)
    text = format_summary([row])
    header, line = text.splitlines()
    assert header.split() == [
        "store",
        "gateway",
        "events",
        "max_seq",
        "gaps",
        "missing",
        "dups",
        "conflicts",
        "lag",
    ]
    assert line.split() == ["hk-001", "gw-a", "8", "10", "1", "2", "3", "0", "1m15s"]
    assert "no events" in format_summary([])


# --- CLI ----------------------------------------------------------------------------------------------------


def test_report_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "hq.db"
    assert receiver_main(["--db", str(db), "--report"]) == 1
    store = ReceiverStore(db)
    store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", range(1, 6)))
    assert receiver_main(["--db", str(db), "--report"]) == 0
    assert "gw-a" in capsys.readouterr().out
    store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", range(8, 11)))
    store.close()
    assert receiver_main(["--db", str(db), "--report"]) == 2
    out = capsys.readouterr().out
    assert "gaps hk-001/gw-a: 6..7" in out


def test_cli_receives_and_stops_on_sigterm(hq_broker: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "hq.db"
    code = (
        "import sys; from cloud_bridge.receiver import receiver_main; sys.exit(receiver_main(sys.argv[1:]))"
    )
    args = [
        "--host",
        hq_broker.host,
        "--port",
        str(hq_broker.port),
        "--db",
        str(db),
        "--summary-every",
        "0.2",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        asyncio.run(_publish_until_stored(hq_broker, db))
        assert proc.stdout is not None
        seen = b""
        while b"gw-a" not in seen:  # the live summary shows the gateway (the per-test timeout bounds this)
            line = proc.stdout.readline()
            assert line, "the CLI exited early"
            seen += line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"max_seq" in seen + out
    assert b"Traceback" not in err


async def _publish_until_stored(broker: Mosquitto, db: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    async with publisher(broker) as pub:
        while True:
            # Until the receiver has subscribed, publishes are dropped: resend until the batch is stored.
            await publish(
                pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2], ids={1: "e1", 2: "e2"})
            )
            if _cli_stored_batch(db):
                return
            if loop.time() > deadline:
                raise AssertionError("the CLI receiver did not store the batch")
            await asyncio.sleep(0.1)


def _cli_stored_batch(db: Path) -> bool:
    if not db.exists():
        return False
    store = ReceiverStore(db)
    try:
        return store.count() == 2 and bool(store.summary())
    finally:
        store.close()
