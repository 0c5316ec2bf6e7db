"""The HQ reference receiver against a real mosquitto and a real SQLite file: schema 2 batches, dedup, bad
input, outages, shared subscriptions, resend commands and the CLI (TLS, password). The database logic itself,
on SQLite and PostgreSQL alike, is in test_receiver_store.py."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from cloud_bridge import topics
from cloud_bridge.commands import Refusal, build_response, describe, refusal_response
from cloud_bridge.hq.model import GatewaySummary, ReceiverBackend, StoreUnavailableError
from cloud_bridge.hq.options import broker_config
from cloud_bridge.hq.receiver import _parser, receiver_main
from cloud_bridge.hq.report import conflict_alarms, format_summary
from cloud_bridge.hq.service import HqReceiver
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.wire import MAX_DECODED_BYTES, Batch, Compressor, Encoding, decode_batch, encode_batch
from gateway.kernel.config import BrokerConfig, TlsConfig
from gateway.kernel.events import uuid7
from gateway.kernel.mqtt_client import MqttClient
from tests.cloud_bridge.test_tls import _cert, _key, _write
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import HQ_SIGNER

PREFIX = "retail"
DEADLINE_S = 15.0


def envelope(
    store_id: str,
    gateway_id: str,
    seq: int,
    event_id: str | None = None,
    *,
    kind: str = "device.status",
    data: dict[str, Any] | None = None,
    boot_id: str = "boot-1",
    clock_synced: bool = True,
    mono_ns: int | None = None,
) -> bytes:
    return orjson.dumps(
        {
            "id": event_id or str(uuid7()),
            "store_id": store_id,
            "gateway_id": gateway_id,
            "seq": seq,
            "kind": kind,
            "device_id": "till-1",
            "occurred_at": None,
            "recorded_at": datetime.now(UTC).isoformat(),
            "boot_id": boot_id,
            "clock_synced": clock_synced,
            "mono_ns": seq if mono_ns is None else mono_ns,
            "schema": 1,
            "data": {"status": "online"} if data is None else data,
        }
    )


def batch_bytes(
    store_id: str,
    gateway_id: str,
    seqs: Sequence[int],
    ids: dict[int, str] | None = None,
    *,
    complete_through: int = 0,
    encoding: Encoding = "zstd",
    cls: str | None = "state",
) -> bytes:
    """A schema 2 batch as a gateway sends it (zstd by default)."""
    ids = ids or {}
    bodies = [envelope(store_id, gateway_id, s, ids.get(s)) for s in seqs]
    return encode_batch(
        store_id,
        gateway_id,
        list(seqs),
        bodies,
        cls=cls,
        complete_through=complete_through,
        compressor=None if encoding == "json" else Compressor(encoding),
    )


def batch(
    store_id: str,
    gateway_id: str,
    seqs: Sequence[int],
    ids: dict[int, str] | None = None,
    *,
    complete_through: int = 0,
) -> Batch:
    return decode_batch(batch_bytes(store_id, gateway_id, seqs, ids, complete_through=complete_through))


def batch_of(store_id: str, gateway_id: str, bodies: Sequence[bytes], *, complete_through: int = 0) -> Batch:
    """A decoded batch of ready-made envelopes (their seqs ascending)."""
    seqs = [orjson.loads(b)["seq"] for b in bodies]
    return decode_batch(
        encode_batch(store_id, gateway_id, seqs, bodies, cls="critical", complete_through=complete_through)
    )


def schema1_bytes(store_id: str, gateway_id: str, seqs: Sequence[int]) -> bytes:
    """A batch from a gateway before the outbox: one JSON object, consecutive seqs, no compression."""
    events = [orjson.loads(envelope(store_id, gateway_id, s)) for s in seqs]
    return orjson.dumps(
        {
            "format": "store-gateway.batch",
            "schema": 1,
            "encoding": "json",
            "store_id": store_id,
            "gateway_id": gateway_id,
            "count": len(events),
            "first_seq": seqs[0],
            "last_seq": seqs[-1],
            "events": events,
        }
    )


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
    name = f"hq-receiver-db-{receiver._client_id}"
    assert not [t for t in threading.enumerate() if t.name.startswith(name)], "worker thread leaked"


@contextlib.asynccontextmanager
async def publisher(broker: Mosquitto, protocol: Protocol = "5") -> AsyncIterator[MqttClient]:
    client = MqttClient(cfg(broker, protocol), f"pub-{uuid7()}", clean_start=True)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


async def publish(client: MqttClient, store_id: str, gateway_id: str, payload: bytes) -> None:
    await client.publish(topics.events_topic(PREFIX, store_id, gateway_id), payload, qos=1)


def make_receiver(
    broker: Mosquitto | BrokerConfig,
    store: ReceiverBackend,
    client_id: str = "hq-test",
    protocol: Protocol = "5",
    on_batch: Callable[[str, str, int, int, int], None] | None = None,
    flush_timeout_s: float = 10.0,
    share_group: str | None = None,
    resend_interval_s: float | None = None,
) -> HqReceiver:
    return HqReceiver(
        broker if isinstance(broker, BrokerConfig) else cfg(broker, protocol),
        store,
        prefix=PREFIX,
        client_id=client_id,
        share_group=share_group,
        resend_interval_s=resend_interval_s,
        signer=HQ_SIGNER if resend_interval_s is not None else None,
        on_batch=on_batch,
        backoff_base_s=0.05,
        backoff_cap_s=0.5,
        flush_timeout_s=flush_timeout_s,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteReceiverStore]:
    db = SqliteReceiverStore(tmp_path / "hq.db", lost_grace_s=0)  # one receiver: no grace before "lost"
    yield db
    db.close()


def summary_of(store: ReceiverBackend, gateway_id: str) -> GatewaySummary:
    (row,) = [s for s in store.summary() if s.gateway_id == gateway_id]
    return row


# --- through the broker -----------------------------------------------------------------------------------


async def test_batches_arrive_and_are_stored(hq_broker: Mosquitto, store: SqliteReceiverStore) -> None:
    seen: list[tuple[str, str, int, int, int]] = []
    on_batch = lambda *args: seen.append(args)  # noqa: E731
    encodings: list[Encoding] = ["zstd", "gzip", "json"]
    async with running(make_receiver(hq_broker, store, on_batch=on_batch)), publisher(hq_broker) as pub:
        for n, first in enumerate(range(1, 101, 10)):
            payload = batch_bytes("hk-001", "gw-a", range(first, first + 10), encoding=encodings[n % 3])
            await publish(pub, "hk-001", "gw-a", payload)
        await publish(pub, "mo-002", "gw-b", schema1_bytes("mo-002", "gw-b", [1, 2, 3]))  # an older gateway
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
    assert (b.store_id, b.events, b.duplicates, b.conflicts, b.complete_through) == ("mo-002", 3, 0, 0, None)
    assert a.lag is not None
    assert timedelta(0) <= a.lag < timedelta(minutes=5)
    assert store.gaps("gw-a") == []


async def test_duplicate_batches_are_stored_once(hq_broker: Mosquitto, store: SqliteReceiverStore) -> None:
    first = batch_bytes("hk-001", "gw-a", range(1, 11))
    overlap = encode_batch(
        "hk-001",
        "gw-a",
        list(range(6, 16)),
        [orjson.dumps(e) for e in decode_batch(first).events[5:]]
        + [envelope("hk-001", "gw-a", s) for s in range(11, 16)],
        cls="state",
        complete_through=5,
        compressor=Compressor("gzip"),
    )
    async with running(make_receiver(hq_broker, store)), publisher(hq_broker) as pub:
        await publish(pub, "hk-001", "gw-a", first)
        await publish(pub, "hk-001", "gw-a", first)
        await publish(pub, "hk-001", "gw-a", overlap)
        await eventually(lambda: [s.duplicates for s in store.summary()] == [15], "15 duplicates counted")
    row = summary_of(store, "gw-a")
    assert (store.count(), row.events, row.max_seq, row.duplicates, row.conflicts) == (15, 15, 15, 15, 0)
    assert [e["seq"] for e in store.events("gw-a")] == list(range(1, 16))


def _bad_payloads() -> dict[str, tuple[str, str, bytes]]:
    """name -> (topic store, topic gateway, payload), each refused for the reason its name says."""
    good = batch_bytes("hk-001", "gw-a", [1, 2])
    head, _, body = good.partition(b"\n")
    zstd_bomb = Compressor("zstd").compress(b"[" + b" " * (MAX_DECODED_BYTES + 10) + b"]")
    gzip_bomb = gzip.compress(b"[" + b" " * (MAX_DECODED_BYTES + 10) + b"]")
    huge_ranges = head.replace(b'"ranges":[[1,2]]', b'"ranges":[[1,1],[1,2000000000]]').replace(
        b'"last_seq":2', b'"last_seq":2000000000'
    )
    return {
        "not JSON": ("hk-001", "gw-a", b"\x00not json"),
        "not a store-gateway batch": ("hk-001", "gw-a", b'{"format": "something else"}'),
        "zstd bomb": ("hk-001", "gw-a", head.replace(b'"zstd"', b'"zstd"') + b"\n" + zstd_bomb),
        "gzip bomb": ("hk-001", "gw-a", head.replace(b'"zstd"', b'"gzip"') + b"\n" + gzip_bomb),
        "zstd garbage": ("hk-001", "gw-a", head + b"\n" + b"\x28\xb5\x2f\xfd garbage"),
        "truncated gzip": (
            "hk-001",
            "gw-a",
            head.replace(b'"zstd"', b'"gzip"') + b"\n" + gzip.compress(b"[1]")[:-6],
        ),
        "ranges bomb": ("hk-001", "gw-a", huge_ranges + b"\n" + body),
        "another gateway's batch": ("hk-001", "gw-b", good),
        "another store's batch": ("hk-002", "gw-a", good),
    }


async def test_bad_messages_are_rejected_counted_and_receiving_goes_on(
    hq_broker: Mosquitto, store: SqliteReceiverStore
) -> None:
    bad = _bad_payloads()
    async with running(receiver := make_receiver(hq_broker, store)), publisher(hq_broker) as pub:
        for store_id, gateway_id, payload in bad.values():
            await publish(pub, store_id, gateway_id, payload)
        await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2, 3]))
        await eventually(
            lambda: store.count() == 3 and store.count_rejected() == len(bad), "3 stored, the rest rejected"
        )
        assert receiver.connected
    reasons = [r.reason for r in reversed(store.rejections())]
    assert reasons[0].startswith("not JSON")
    assert reasons[1].startswith("not a store-gateway batch")
    raw_bytes = decode_batch(bad["another gateway's batch"][2]).raw_bytes  # the bombs' header
    assert reasons[2] == reasons[3] == f"body inflates beyond the {raw_bytes} bytes of its 'raw_bytes'"
    assert reasons[4].startswith("zstd body does not decompress")
    assert reasons[5] == "gzip body is truncated"
    assert reasons[6] == "'ranges' list more seqs than 'count'"
    assert "topic says store 'hk-001' gateway 'gw-b'" in reasons[7]
    assert "topic says store 'hk-002' gateway 'gw-a'" in reasons[8]
    assert all(r.size > 0 for r in store.rejections())
    assert [s.gateway_id for s in store.summary()] == ["gw-a"]


async def test_survives_broker_restart_on_the_same_port(
    hq_broker: Mosquitto, store: SqliteReceiverStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cloud_bridge.hq.receiver")
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
    ours = [r for r in caplog.records if r.name == "cloud_bridge.hq.receiver"]
    assert [r.getMessage().split(":")[0] for r in ours if r.levelno == logging.WARNING] == [
        "lost the HQ broker"
    ]
    assert any(r.levelno == logging.DEBUG and "cannot connect" in r.getMessage() for r in ours)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("share_group", [None, "hq-receivers"])
async def test_batches_sent_while_away_arrive_after_reconnect(
    hq_broker: Mosquitto, store: SqliteReceiverStore, protocol: Protocol, share_group: str | None
) -> None:
    async with running(make_receiver(hq_broker, store, protocol=protocol, share_group=share_group)):
        pass  # creates the persistent session and its subscription
    async with publisher(hq_broker) as pub:
        for first in (1, 4, 7):
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", range(first, first + 3)))
    assert store.count() == 0
    async with running(make_receiver(hq_broker, store, protocol=protocol, share_group=share_group)):
        await eventually(lambda: store.count() == 9, "queued batches delivered")
    assert store.gaps("gw-a") == []


async def test_receivers_split_by_store_each_keep_their_stores_across_a_broker_restart(
    persistent_hq_broker: Mosquitto, tmp_path: Path
) -> None:
    """The mosquitto topology: plain subscriptions with persistent sessions, the stores split between receivers
    (``stores``). Each receiver gets only its stores, and what is published while both are away and the broker
    restarts is queued for each of them and arrives when they return (a shared subscription loses it)."""
    broker = persistent_hq_broker
    stores = {
        "a": SqliteReceiverStore(tmp_path / "a.db", lost_grace_s=0),
        "b": SqliteReceiverStore(tmp_path / "b.db"),
    }

    def receiver(name: str, store_ids: list[str]) -> HqReceiver:
        return HqReceiver(
            cfg(broker, "5"), stores[name], prefix=PREFIX, client_id=f"hq-{name}", stores=store_ids
        )

    try:
        async with running(receiver("a", ["hk-001", "hk-002"])), running(receiver("b", ["hk-003"])):
            pass  # the persistent sessions and their subscriptions
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        async with publisher(broker) as pub:
            for store_id in ("hk-001", "hk-002", "hk-003", "hk-004"):
                await publish(pub, store_id, "gw-a", batch_bytes(store_id, "gw-a", [1, 2]))
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        async with running(receiver("a", ["hk-001", "hk-002"])), running(receiver("b", ["hk-003"])):
            await eventually(
                lambda: stores["a"].count() == 4 and stores["b"].count() == 2, "each receiver's stores"
            )
        assert {(r.store_id, r.events) for r in stores["a"].summary()} == {("hk-001", 2), ("hk-002", 2)}
        assert {(r.store_id, r.events) for r in stores["b"].summary()} == {("hk-003", 2)}
    finally:
        for store in stores.values():
            store.close()


def test_events_subscriptions() -> None:
    assert topics.events_subscriptions("retail") == ["retail/+/+/events"]
    assert topics.events_subscriptions("retail", "g") == ["$share/g/retail/+/+/events"]
    assert topics.events_subscriptions("retail", None, ["s1", "s2", "s1"]) == [
        "retail/s1/+/events",
        "retail/s2/+/events",
    ]
    assert topics.events_subscriptions("retail", "g", ["s1"]) == ["$share/g/retail/s1/+/events"]


def test_cli_store_and_resend_range_options() -> None:
    args = _parser().parse_args(["--stores", "hk-001, hk-002", "--resend-ranges", "1"])
    assert (args.stores, args.resend_ranges, args.share_group) == (["hk-001", "hk-002"], 1, None)
    assert _parser().parse_args([]).resend_ranges == 1000
    for bad in (["--stores", "a/b"], ["--stores", ","], ["--stores", "+"], ["--resend-ranges", "0"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--resend-ranges", "1001"])


async def test_no_ack_before_commit(
    hq_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the database is locked nothing is stored, so nothing is acked: the next session gets it again."""
    db = tmp_path / "hq.db"
    store = SqliteReceiverStore(db, busy_timeout_s=0.05)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        async with running(make_receiver(hq_broker, store)):
            pass  # creates the persistent session
        locker.execute("BEGIN IMMEDIATE")
        with caplog.at_level(logging.DEBUG, logger="cloud_bridge.hq.receiver"):
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


async def test_many_batches_in_a_burst(hq_broker: Mosquitto, store: SqliteReceiverStore) -> None:
    payloads = [batch_bytes("hk-001", "gw-a", range(i * 50 + 1, i * 50 + 51)) for i in range(60)]
    async with running(make_receiver(hq_broker, store)), publisher(hq_broker) as pub:
        await asyncio.gather(*(publish(pub, "hk-001", "gw-a", p) for p in payloads))
        await eventually(lambda: store.count() == 3000, "3000 events stored")
    row = summary_of(store, "gw-a")
    assert (row.events, row.max_seq, row.gaps, row.duplicates) == (3000, 3000, 0, 0)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_mosquitto_shared_subscription_splits_and_delivers_the_real_topic(
    hq_broker: Mosquitto, protocol: Protocol
) -> None:
    """The broker behaviour the receiver relies on: each message goes to ONE member of the group, and its
    topic is the one it was published to (no ``$share/<group>/`` prefix)."""
    got: dict[str, list[str]] = {"a": [], "b": []}
    members = []
    for name in got:
        member = MqttClient(cfg(hq_broker, protocol), f"member-{name}", clean_start=True)
        member.on_message = lambda m, name=name: got[name].append(m.topic)
        await member.connect()
        await member.subscribe([(topics.events_subscription(PREFIX, "g1"), 1)])
        members.append(member)
    try:
        async with publisher(hq_broker, protocol) as pub:
            for n in range(20):
                await publish(pub, "hk-001", f"gw-{n % 4}", b"x")
            await eventually(lambda: len(got["a"]) + len(got["b"]) == 20, "20 messages, each delivered once")
    finally:
        for member in members:
            await member.disconnect()
    assert got["a"], "each member got a share"
    assert got["b"], "each member got a share"
    assert {t for ts in got.values() for t in ts} == {f"{PREFIX}/hk-001/gw-{n}/events" for n in range(4)}


async def test_lost_range_is_asked_for_again_until_it_arrives(
    hq_broker: Mosquitto, store: SqliteReceiverStore
) -> None:
    commands: list[dict[str, Any]] = []
    gateway = MqttClient(cfg(hq_broker), "gw-a-downlink", clean_start=True)
    gateway.on_message = lambda m: commands.append(orjson.loads(m.payload))
    await gateway.connect()
    await gateway.subscribe([(topics.commands_topic(PREFIX, "hk-001", "gw-a"), 1)])
    receiver = make_receiver(hq_broker, store, share_group="hq-receivers", resend_interval_s=0.2)
    try:
        async with running(receiver), publisher(hq_broker) as pub:
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 2, 3, 4, 5]))
            latest = batch_bytes("hk-001", "gw-a", [8, 9], complete_through=7)

            async def online() -> None:
                """Only a gateway heard from within the interval is asked: it sends again and again."""
                while True:
                    await publish(pub, "hk-001", "gw-a", latest)
                    await asyncio.sleep(0.05)

            sending = asyncio.create_task(online())
            try:
                await eventually(lambda: len(commands) >= 2, "the lost range asked for, twice")
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
            await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [6, 7], complete_through=9))
            await eventually(lambda: store.classes("gw-a").lost == [], "the lost range arrived")
    finally:
        await gateway.disconnect()
    first = commands[0]
    assert first["command"] == "resend"
    assert first["args"] == {"from_seq": 6, "to_seq": 7}
    assert first["request_id"].startswith("resend-")
    assert commands[1]["args"] == first["args"]
    assert commands[1]["request_id"] != first["request_id"]
    assert receiver.resend_commands >= 2
    assert store.claim_resends(0.0, 10, online_s=60) == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_gateway_away_finds_at_most_a_couple_of_resends_in_its_session(
    hq_broker: Mosquitto, store: SqliteReceiverStore, protocol: Protocol
) -> None:
    """The receiver asks quiet gateways too, so commands must not pile up in the persistent session of one
    that is away: on MQTT 5 each expires after the interval (at most about one is outstanding); on 3.1.1
    (no expiry) a gateway not heard from within the interval is not asked at all."""
    topic = topics.commands_topic(PREFIX, "hk-001", "gw-a")
    seen: list[dict[str, Any]] = []

    def downlink() -> MqttClient:
        client = MqttClient(cfg(hq_broker), "gw-a-downlink", clean_start=False)
        client.on_message = lambda m: seen.append(orjson.loads(m.payload))
        return client

    gateway = downlink()
    await gateway.connect()
    await gateway.subscribe([(topic, 1)])
    await gateway.disconnect()  # its session (and subscription) stays at the broker: the gateway is away
    # One-second expiry (the smallest MQTT has; mosquitto counts it in whole seconds, so a command lives up to
    # about two): asked every second, an absent gateway finds two or three, not one per ask.
    receiver = make_receiver(hq_broker, store, protocol=protocol, resend_interval_s=1.0)
    async with running(receiver), publisher(hq_broker) as pub:
        await publish(pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 4], complete_through=4))
        await eventually(lambda: store.classes("gw-a").lost == [(2, 3)], "2..3 lost")
        if protocol == "5":
            await eventually(lambda: receiver.resend_commands >= 5, "five asks of the absent gateway")
        else:

            async def heard_from() -> None:
                while True:
                    await publish(
                        pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [4], complete_through=4)
                    )
                    await asyncio.sleep(0.05)

            sending = asyncio.create_task(heard_from())
            try:
                await eventually(
                    lambda: receiver.resend_commands >= 1, "an ask while the gateway is heard from"
                )
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
            # Then nothing new from it for longer than the interval: no claim picks it any more.
            heard = datetime.now(UTC)
            await eventually(lambda: (datetime.now(UTC) - heard).total_seconds() > 3.0, "three intervals")
        asked = receiver.resend_commands
        gateway = downlink()
        await gateway.connect()  # back: the session delivers what is still queued, then the marker
        await pub.publish(topic, orjson.dumps({"request_id": "marker", "command": "ping"}), qos=1)
        await eventually(lambda: any(c["request_id"] == "marker" for c in seen), "the marker")
        await gateway.disconnect()
    queued = [c for c in seen[: [c["request_id"] for c in seen].index("marker")] if c["command"] == "resend"]
    assert all(c["args"] == {"from_seq": 2, "to_seq": 3} for c in queued)
    # Every command waiting was asked (never more); on MQTT 5 the expired ones are not delivered, so fewer
    # reach it than were asked (how many fewer depends on timing: bound it only by that).
    assert 1 <= len(queued) <= asked, (len(queued), asked)
    if protocol == "5":
        assert len(queued) < asked, (len(queued), asked)


class _OldResendArgs(BaseModel):
    """``resend`` args as a gateway of before multi-range resends validated them (cloud_bridge/commands.py of
    then: from_seq and to_seq only, anything else refused as invalid_args)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    from_seq: int = Field(ge=1, le=2**63 - 1)
    to_seq: int = Field(ge=1, le=2**63 - 1)

    @model_validator(mode="after")
    def _bounded(self) -> _OldResendArgs:
        if self.from_seq > self.to_seq:
            raise ValueError("from_seq must not be above to_seq")
        return self


@contextlib.asynccontextmanager
async def old_gateway(
    broker: Mosquitto, store_id: str, gateway_id: str, commands: list[dict[str, Any]]
) -> AsyncIterator[None]:
    """A stand-in for a gateway of before multi-range resends: it answers every command on its topic as that
    release did (an invalid_args refusal for ``ranges``), and resends what a single-range command asks."""
    client = MqttClient(cfg(broker), f"{gateway_id}-downlink", clean_start=True)
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    client.on_message = lambda m: inbox.put_nowait(bytes(m.payload))
    await client.connect()
    await client.subscribe([(topics.commands_topic(PREFIX, store_id, gateway_id), 1)])

    async def serve() -> None:
        while True:
            command = orjson.loads(await inbox.get())
            commands.append(command)
            request_id = command["request_id"]
            try:
                args = _OldResendArgs.model_validate(command["args"])
            except ValidationError as err:
                refusal = Refusal(request_id, "resend", "invalid_args", describe(err))
                answer = refusal_response(refusal, store_id, gateway_id)
            else:
                seqs = list(range(args.from_seq, args.to_seq + 1))
                await publish(client, store_id, gateway_id, batch_bytes(store_id, gateway_id, seqs, cls=None))
                answer = build_response(
                    request_id=request_id,
                    command="resend",
                    status="ok",
                    store_id=store_id,
                    gateway_id=gateway_id,
                    result={"resent": [[args.from_seq, args.to_seq]], "missing": []},
                )
            await client.publish(topics.responses_topic(PREFIX, store_id, gateway_id), answer, qos=1)

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.disconnect()


async def test_a_gateway_that_refuses_multi_range_resends_is_asked_one_range_at_a_time(
    hq_broker: Mosquitto, store: SqliteReceiverStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway of an older release refuses a multi-range resend (invalid_args): the receiver reads the answer,
    records the gateway as single-range (in its database, for every receiver and restart), logs it once, and
    asks it one range per command, starting with the refused ranges: its gaps heal."""
    commands: list[dict[str, Any]] = []
    receiver = make_receiver(hq_broker, store, resend_interval_s=0.2)
    with caplog.at_level(logging.INFO, logger="cloud_bridge.hq.receiver"):
        async with old_gateway(hq_broker, "hk-001", "gw-a", commands), running(receiver):
            async with publisher(hq_broker) as pub:
                await publish(
                    pub, "hk-001", "gw-a", batch_bytes("hk-001", "gw-a", [1, 3, 5, 7], complete_through=8)
                )
            await eventually(lambda: store.count() == 8, "every lost seq resent, one range per command")
    assert commands[0]["args"] == {"ranges": [[2, 2], [4, 4], [6, 6], [8, 8]]}
    first_single = next(i for i, c in enumerate(commands) if "ranges" not in c["args"])
    assert all("ranges" in c["args"] for c in commands[:first_single])
    assert all("ranges" not in c["args"] for c in commands[first_single:]), "multi-range after the refusal"
    assert {(c["args"]["from_seq"], c["args"]["to_seq"]) for c in commands[first_single:]} >= {
        (2, 2),
        (4, 4),
        (6, 6),
        (8, 8),
    }
    assert store.single_range_gateways() == [("hk-001", "gw-a")]
    refused = [r for r in caplog.records if "refused a multi-range resend" in r.getMessage()]
    assert len(refused) == 1
    assert "ranges: Extra inputs are not permitted" in refused[0].getMessage()
    assert store.rejections() == []  # the answers are not taken for batches


async def test_a_receiver_restarted_with_other_stores_unsubscribes_the_old_ones(
    hq_broker: Mosquitto, tmp_path: Path
) -> None:
    """The broker keeps a persistent session's subscriptions: a receiver restarted with fewer ``stores`` must
    unsubscribe the others (recorded in its database), or it goes on storing their batches. A session made
    before the record (nothing recorded) may hold the default all-stores subscription: that goes too."""
    stores = [
        SqliteReceiverStore(tmp_path / "split.db", lost_grace_s=0),
        SqliteReceiverStore(tmp_path / "old.db"),
    ]

    def receiver(store: SqliteReceiverStore, client_id: str, store_ids: list[str]) -> HqReceiver:
        return HqReceiver(cfg(hq_broker), store, prefix=PREFIX, client_id=client_id, stores=store_ids)

    async def only_a_arrives(store: SqliteReceiverStore) -> None:
        async with publisher(hq_broker) as pub:
            await publish(pub, "hk-b", "gw-1", batch_bytes("hk-b", "gw-1", [1]))
            await publish(pub, "hk-a", "gw-1", batch_bytes("hk-a", "gw-1", [1]))
        await eventually(lambda: store.count() >= 1, "hk-a's batch, published after hk-b's")
        assert [r.store_id for r in store.summary()] == ["hk-a"]

    try:
        async with running(receiver(stores[0], "hq-split", ["hk-a", "hk-b"])):
            pass
        assert stores[0].subscriptions("hq-split") == ["retail/hk-a/+/events", "retail/hk-b/+/events"]
        async with running(receiver(stores[0], "hq-split", ["hk-a"])):
            await only_a_arrives(stores[0])
        assert stores[0].subscriptions("hq-split") == ["retail/hk-a/+/events"]

        before = MqttClient(cfg(hq_broker), "hq-old", clean_start=False)
        await before.connect()
        await before.subscribe([(topics.events_subscription(PREFIX), 1)])
        await before.disconnect()
        async with running(receiver(stores[1], "hq-old", ["hk-a"])):
            await only_a_arrives(stores[1])
    finally:
        for store in stores:
            store.close()


# --- rendering and CLI --------------------------------------------------------------------------------------


def test_format_summary() -> None:
    row = GatewaySummary(
        "hk-001",
        "gw-a",
        8,
        10,
        1,
        2,
        3,
        0,
        timedelta(seconds=75),
        None,
        complete_through=9,
        lost=1,
        pending=1,
    )
    header, line = format_summary([row]).splitlines()
    columns = "store gateway events max_seq through pending lost explained dups conflicts lag"
    assert header.split() == columns.split(" ")
    assert line.split() == ["hk-001", "gw-a", "8", "10", "9", "1", "1", "0", "3", "0", "1m15s"]
    assert "no events" in format_summary([])


def test_report_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "hq.db"
    assert receiver_main(["--db", str(db), "--report"]) == 1
    store = SqliteReceiverStore(db)
    store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", range(1, 6)))
    assert receiver_main(["--db", str(db), "--report"]) == 0
    assert "gw-a" in capsys.readouterr().out
    store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", range(8, 11), complete_through=5))
    assert receiver_main(["--db", str(db), "--report"]) == 0  # 6..7 may still come
    assert "pending hk-001/gw-a: 6..7" in capsys.readouterr().out
    store.store_batch("hk-001", "gw-a", batch("hk-001", "gw-a", [11], complete_through=10))
    store.close()
    assert receiver_main(["--db", str(db), "--report"]) == 0  # lost only once that is a minute old
    assert "pending hk-001/gw-a: 6..7" in capsys.readouterr().out
    assert receiver_main(["--db", str(db), "--report", "--lost-grace", "0"]) == 2
    assert "lost hk-001/gw-a: 6..7" in capsys.readouterr().out


def test_report_lists_conflicts_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "hq.db"
    store = SqliteReceiverStore(db)
    first = batch("hk-001", "gw-a", range(1, 4), complete_through=3)
    store.store_batch("hk-001", "gw-a", first)
    assert receiver_main(["--db", str(db), "--report"]) == 0
    other = batch("hk-001", "gw-a", [2])
    other_id = other.events[0]["id"]
    store.store_batch("hk-001", "gw-a", other)
    store.close()
    assert receiver_main(["--db", str(db), "--report"]) == 2
    out = capsys.readouterr().out
    assert "conflicts hk-001/gw-a: 1" in out
    assert f"conflict hk-001/gw-a seq 2: seq 2 holds event {first.events[1]['id']}" in out
    assert f"also kept {other.events[0]['kind']} event {other_id}" in out


def test_the_live_summary_raises_a_conflict_once_per_new_conflict() -> None:
    def row(conflicts: int) -> GatewaySummary:
        return GatewaySummary("hk-001", "gw-a", 3, 3, 0, 0, 0, conflicts, None, None)

    seen: dict[tuple[str, str], int] = {}
    assert conflict_alarms([row(0)], seen) == []
    (line,) = conflict_alarms([row(2)], seen)
    assert line.startswith("CONFLICT hk-001/gw-a: 2 event(s)")
    assert conflict_alarms([row(2)], seen) == []
    assert len(conflict_alarms([row(3)], seen)) == 1


def _cli(args: Sequence[str]) -> subprocess.Popen[bytes]:
    code = "import sys; from cloud_bridge.hq.receiver import receiver_main; sys.exit(receiver_main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def _run_cli_until_stored(
    proc: subprocess.Popen[bytes], broker: BrokerConfig, db: Path
) -> tuple[bytes, bytes]:
    """Publish until the CLI stored a batch and its live summary shows it; SIGTERM; its output."""
    try:
        asyncio.run(_publish_until_stored(broker, db))
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
    assert b"Traceback" not in err
    return seen + out, err


def test_cli_receives_and_stops_on_sigterm(hq_broker: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "hq.db"
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
    out, err = _run_cli_until_stored(_cli(args), cfg(hq_broker), db)
    assert b"max_seq" in out
    assert (
        b"receiving retail/+/+/events" in err
    )  # a plain subscription by default: it survives a broker restart
    assert b"SHARED SUBSCRIPTION" not in err


def test_cli_warns_loudly_about_a_shared_subscription(hq_broker: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "hq.db"
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
    _, err = _run_cli_until_stored(_cli([*args, "--share-group", "hq-receivers"]), cfg(hq_broker), db)
    assert b"$share/hq-receivers/retail/+/+/events" in err
    assert b"SHARED SUBSCRIPTION (--share-group hq-receivers)" in err


async def _publish_until_stored(broker: BrokerConfig, db: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    client = MqttClient(broker, f"pub-{uuid7()}", clean_start=True)
    await client.connect()
    try:
        while True:
            # Until the receiver has subscribed, publishes are dropped: resend until the batch is stored.
            payload = batch_bytes("hk-001", "gw-a", [1, 2], ids={1: "e1", 2: "e2"})
            await publish(client, "hk-001", "gw-a", payload)
            if _cli_stored_batch(db):
                return
            if loop.time() > deadline:
                raise AssertionError("the CLI receiver did not store the batch")
            await asyncio.sleep(0.1)
    finally:
        await client.disconnect()


def _cli_stored_batch(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        store = SqliteReceiverStore(db)
    except StoreUnavailableError:
        return False  # the CLI is creating it right now
    try:
        return store.count() == 2 and bool(store.summary())
    finally:
        store.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (test_tls's helpers)."""
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("test CA", ca_key, None, ca_key, ca=True)
    files = {
        "ca": _write(tmp_path / "ca.pem", ca),
        "server": _write(
            tmp_path / "server.pem", _cert("hq", server_key, ca, ca_key, ip="127.0.0.1"), server_key
        ),
        "client": _write(tmp_path / "client.pem", _cert("hq-receiver", client_key, ca, ca_key), client_key),
    }
    for path in tmp_path.iterdir():
        path.chmod(0o644)
    return files


@pytest.fixture
def tls_auth_broker(pki: dict[str, Path], tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto that wants TLS with a client certificate and a user name and password."""
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "hq", "s3cret-pw"], check=True)
    passwords.chmod(0o644)
    broker = Mosquitto(
        extra_conf=(
            f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server'].with_suffix('.key')}\n"
            f"require_certificate true\npassword_file {passwords}\n"
        )
    )
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    yield broker.start()
    broker.close()


def test_cli_tls_and_password(tls_auth_broker: Mosquitto, pki: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "hq.db"
    password_file = tmp_path / "password"
    password_file.write_text("s3cret-pw\n")
    key = pki["client"].with_suffix(".key")
    tls = ["--ca-file", str(pki["ca"]), "--cert-file", str(pki["client"]), "--key-file", str(key)]
    args = ["--port", str(tls_auth_broker.port), "--db", str(db), "--summary-every", "0.2", *tls]
    broker = BrokerConfig(
        host=tls_auth_broker.host,
        port=tls_auth_broker.port,
        username="hq",
        password=SecretStr("s3cret-pw"),
        tls=TlsConfig(ca_file=pki["ca"], cert_file=pki["client"], key_file=key),
    )
    out, err = _run_cli_until_stored(
        _cli([*args, "--username", "hq", "--password-file", str(password_file)]), broker, db
    )
    assert b"s3cret-pw" not in out + err


def test_cli_refuses_unusable_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    cases = {
        ("--password-file", str(secret)): "--password-file needs --username",
        ("--username", "hq", "--password-file", str(tmp_path / "nope")): "cannot read --password-file",
        ("--cert-file", str(secret)): "cert_file and key_file go together",
        ("--ca-file", str(tmp_path / "nope.pem")): "--ca-file",
        ("--share-group", "a/b"): "a share group is one topic level",
        ("--session-expiry", "-1"): "session_expiry_s",
        ("--resend",): "--resend needs --signing-key FILE and --key-id ID",
        ("--resend", "--key-id", "hq-1"): "--signing-key and --key-id go together",
        ("--resend", "--key-id", "hq-1", "--signing-key", str(secret)): "--signing-key: ",
    }
    for args, message in cases.items():
        assert receiver_main(["--db", str(tmp_path / "hq.db"), *args]) == 1
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        receiver_main(["--resend-interval", "0"])
    assert broker_config(_parser().parse_args(["--session-expiry", "600"])).session_expiry_s == 600


def test_cli_says_in_one_line_when_the_database_cannot_be_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, " * 512)
    cases = {
        ("--db", str(tmp_path / "no-such-dir" / "hq.db")): "cannot open",
        ("--db", str(tmp_path / "no-such-dir" / "hq.db"), "--report"): "no database at",
        ("--db", str(garbage)): "file is not a database",
        ("--db", str(garbage), "--report"): "file is not a database",
    }
    for args, message in cases.items():
        assert receiver_main(list(args)) == 1
        err = capsys.readouterr().err
        assert err.startswith("hq-receiver: "), err
        assert message in err, err
        assert err.count("\n") == 1, err
    # As without the postgres extra installed: the import of psycopg fails.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "cloud_bridge.hq.postgres", raising=False)
    assert receiver_main(["--postgres", "host=127.0.0.1", "--report"]) == 1
    err = capsys.readouterr().err
    assert "install the postgres extra" in err
    assert err.count("\n") == 1, err


def test_a_gateway_refusing_a_resend_signature_is_logged_once_per_reason(
    hq_broker: Mosquitto, store: SqliteReceiverStore, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = make_receiver(hq_broker, store, resend_interval_s=1.0)
    topic = topics.responses_topic(PREFIX, "hk-001", "gw-a")
    refusal = refusal_response(
        Refusal("resend-1", "resend", "unknown_key", "key 'hq-x' is not one"), "hk-001", "gw-a"
    )
    with caplog.at_level(logging.WARNING, logger="cloud_bridge.hq.receiver"):
        for _ in range(3):
            receiver._on_response(topic, refusal)
    warnings = [r.getMessage() for r in caplog.records if "refused a signed resend" in r.getMessage()]
    assert warnings == [
        "retail/hk-001/gw-a refused a signed resend: unknown_key: key 'hq-x' is not one (check --key-id against"
        " the gateway's hq.command_keys, and both clocks)"
    ]


def fill_for_export(store: ReceiverBackend) -> None:
    """Two gateways of store hk-001, two events a day each for three days from 2026-11-01; one of another store."""
    day = datetime(2026, 11, 1, tzinfo=UTC)
    for gateway in ("gw-b", "gw-a"):
        bodies = []
        for seq in range(1, 7):
            body = orjson.loads(envelope("hk-001", gateway, seq))
            body["recorded_at"] = (day + timedelta(hours=12 * (seq - 1))).isoformat(timespec="milliseconds")
            bodies.append(orjson.dumps(body))
        encoded = encode_batch("hk-001", gateway, list(range(1, 7)), bodies, cls="state", complete_through=0)
        store.store_batch("hk-001", gateway, decode_batch(encoded))
    store.store_batch("hk-002", "gw-a", batch("hk-002", "gw-a", [1]))
    store.close()


def check_export(database: list[str], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """What fill_for_export stored, exported from day 2 to 08:00 of day 3 in Hong Kong (00:00 UTC)."""
    argv = [
        "export",
        "--store",
        "hk-001",
        *database,
        "--from",
        "2026-11-02",
        "--to",
        "2026-11-03T08:00+08:00",
    ]
    assert receiver_main(argv) == 0
    printed = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert [(e["gateway_id"], e["seq"]) for e in printed] == [
        ("gw-a", 3),
        ("gw-a", 4),
        ("gw-b", 3),
        ("gw-b", 4),
    ]


def test_export_prints_a_stores_envelopes_of_a_time_range_in_gateway_and_seq_order(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_bridge.hq import export

    monkeypatch.setattr(export, "PAGE", 2)  # several pages
    db = tmp_path / "hq.db"
    fill_for_export(SqliteReceiverStore(db))
    check_export(["--db", str(db)], capsysbinary)
    assert receiver_main(["export", "--store", "hk-001", "--db", str(tmp_path / "none.db")]) == 1
    with pytest.raises(SystemExit) as usage:
        receiver_main(["export", "--store", "hk-001", "--db", str(db), "--from", "yesterday"])
    assert usage.value.code == 2
