"""The receiver at scale: PostgreSQL storing a group of batches set-based (pg_writes.py) gives exactly what the
shared batch-by-batch path gives; event bytes are stored as received; what the receiver holds is capped."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import astuple
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from cloud_bridge.hq import service
from cloud_bridge.hq.model import BatchToStore, Rejection, StoreResult
from cloud_bridge.hq.postgres import PostgresReceiverStore
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.wire import Compressor, decode_batch, encode_batch, split_events
from gateway.kernel.events import uuid7
from gateway.kernel.mqtt_client import PACKETS_PER_WAKEUP
from tests.cloud_bridge.hq.test_receiver import (
    batch_bytes,
    envelope,
    eventually,
    make_receiver,
    publish,
    publisher,
    running,
)
from tests.harness.brokers import Mosquitto
from tests.harness.pg import PostgresServer, session_server

S = "hk-001"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from session_server()


def item(gateway_id: str, bodies: Sequence[bytes], complete_through: int = 0) -> BatchToStore:
    seqs = [orjson.loads(b)["seq"] for b in bodies]
    payload = encode_batch(S, gateway_id, seqs, bodies, cls="transaction", complete_through=complete_through)
    return BatchToStore(f"retail/{S}/{gateway_id}/events", len(payload), S, gateway_id, decode_batch(payload))


def groups() -> list[list[BatchToStore | Rejection]]:
    """Groups that take every branch: new events, a batch delivered twice in one group and again later, a seq
    taken by another id (conflict), an id stored again at another seq, gaps and promises (complete_through),
    several gateways, and a rejection in the middle."""
    a = {seq: envelope(S, "gw-a", seq) for seq in range(1, 21)}
    b = {seq: envelope(S, "gw-b", seq) for seq in range(1, 11)}
    other_at_3 = envelope(S, "gw-a", 3, str(uuid7()))
    moved = orjson.dumps({**orjson.loads(a[5]), "seq": 15})
    first = item("gw-a", [a[s] for s in (1, 2, 3)])
    return [
        [
            first,
            item("gw-b", [b[s] for s in (1, 2)]),
            first,  # redelivered within the group
            item("gw-a", [a[s] for s in (4, 5, 7)], complete_through=3),
        ],
        [
            item("gw-a", [other_at_3]),  # seq 3 is held by another id: a conflict
            Rejection(f"retail/{S}/gw-x/events", "cannot decode: test", 12),
            item("gw-b", [b[s] for s in (5, 6)], complete_through=2),
            item("gw-a", [moved]),  # an id already stored at seq 5, now at seq 15
            item("gw-a", [a[s] for s in (1, 2, 3)]),  # redelivered in a later group
        ],
        [
            item("gw-a", [a[s] for s in (6, 8, 9, 10)], complete_through=7),
            item("gw-b", [b[s] for s in (3, 4)], complete_through=6),
        ],
    ]


def state(store: SqlReceiverStore) -> dict[str, Any]:
    with store._session() as cur:
        tables = {
            name: sorted(tuple(map(str, r)) for r in cur.execute(sql).fetchall())
            for name, sql in {
                "events": "SELECT store_id, gateway_id, seq, id, body FROM events",
                "runs": "SELECT store_id, gateway_id, first_seq, last_seq FROM runs",
                "conflicts": "SELECT store_id, gateway_id, seq, id, kept_id FROM conflicts",
                "gateways": "SELECT store_id, gateway_id, max_seq, complete_through, events, duplicates,"
                " conflicts, mark_through, lost_through FROM gateways",
            }.items()
        }
    summary = [
        tuple(v for v in astuple(r) if not isinstance(v, datetime | timedelta)) for r in store.summary()
    ]
    return {**tables, "summary": summary, "rejected": store.count_rejected()}


def test_a_group_stored_set_based_is_what_the_shared_path_stores(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    grouped = PostgresReceiverStore(postgres.fresh_schema(), lost_grace_s=0)
    shared = SqliteReceiverStore(tmp_path / "hq.db", lost_grace_s=0)
    try:
        for group in groups():
            assert grouped.apply(group) == shared.apply(group)
        assert state(grouped) == state(shared)
        summary = {r.gateway_id: r for r in grouped.summary()}
        assert (summary["gw-a"].events, summary["gw-a"].conflicts) == (10, 2)
        assert summary["gw-a"].duplicates == 6
        assert (summary["gw-b"].events, summary["gw-b"].missing) == (6, 0)
    finally:
        grouped.close()
        shared.close()


def test_group_results_count_new_duplicates_and_conflicts(postgres: PostgresServer) -> None:
    store = PostgresReceiverStore(postgres.fresh_schema(), lost_grace_s=0)
    try:
        first = groups()[0]
        assert store.apply(first) == [
            StoreResult(3, 0, 0),
            StoreResult(2, 0, 0),
            StoreResult(0, 3, 0),
            StoreResult(3, 0, 0),
        ]
    finally:
        store.close()


def test_event_bytes_are_stored_as_received(postgres: PostgresServer) -> None:
    """Envelopes written otherwise than orjson would (key order, escaped non-ASCII) are kept byte for byte."""
    bodies = [
        b'{"seq":%d,"id":"%s","store_id":"hk-001","gateway_id":"gw-a","kind":"device.status","device_id":null,'
        b'"recorded_at":"2026-01-02T03:04:05.000Z","clock_synced":true,"data":{"note":"caf\\u00e9"}}'
        % (seq, str(uuid7()).encode())
        for seq in (1, 2, 3)
    ]
    raw = b"[" + b",".join(bodies) + b"]"
    split = split_events(raw, 3)
    assert split is not None
    assert split[1] == bodies
    assert split_events(raw.replace(b"},{", b"}, {"), 3) is None  # whitespace: the whole array is parsed
    store = PostgresReceiverStore(postgres.fresh_schema())
    try:
        assert store.apply([item("gw-a", bodies)]) == [StoreResult(3, 0, 0)]
        with store._session() as cur:
            stored = [bytes(r[0]) for r in cur.execute("SELECT body FROM events ORDER BY seq").fetchall()]
        assert stored == bodies
    finally:
        store.close()


class _HeldStore(SqliteReceiverStore):
    """A real SQLite store whose commits wait until the test lets them go (to fill the receiver's hands)."""

    def __init__(self, path: Path) -> None:
        self.go = threading.Event()
        super().__init__(path, lost_grace_s=0)

    def apply(self, items: Any) -> list[StoreResult | Rejection]:
        self.go.wait()
        return super().apply(items)


async def test_the_receiver_stops_reading_while_its_hands_are_full(
    hq_broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the database stalled, the receiver holds at most MAX_IN_HAND messages (and what the read that
    reached it had already taken in), the broker keeps the rest; once the database moves, every batch is
    stored once."""
    monkeypatch.setattr(service, "MAX_IN_HAND", 8)
    store = _HeldStore(tmp_path / "hq.db")
    receiver = make_receiver(hq_broker, store)
    try:
        async with running(receiver), publisher(hq_broker) as pub:
            for seq in range(1, 301):
                await publish(pub, S, "gw-a", batch_bytes(S, "gw-a", [seq]))
            await eventually(lambda: receiver.peak_in_hand >= 8, "hands full")
            store.go.set()
            await eventually(lambda: store.count() == 300, "every batch stored")
        assert receiver.peak_in_hand <= 8 + PACKETS_PER_WAKEUP
        row = store.summary()[0]
        assert (row.events, row.max_seq, row.missing, row.duplicates) == (300, 300, 0, 0)
    finally:
        store.go.set()
        store.close()


@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "two-batches"])
def test_an_id_whose_seq_is_taken_and_that_goes_in_at_another_seq(
    postgres: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, one_batch: bool
) -> None:
    """The database holds event J at seq 5; the group brings event I at seq 5 and again at seq 6: seq 5 is a
    conflict (kept in conflicts, logged), seq 6 is new, as the shared path says."""
    j, i = str(uuid7()), str(uuid7())
    held = [item("gw-c", [envelope(S, "gw-c", 5, j)])]
    at_5, at_6 = envelope(S, "gw-c", 5, i), envelope(S, "gw-c", 6, i)
    group: list[BatchToStore | Rejection] = (
        [item("gw-c", [at_5, at_6])] if one_batch else [item("gw-c", [at_5]), item("gw-c", [at_6])]
    )
    grouped = PostgresReceiverStore(postgres.fresh_schema(), lost_grace_s=0)
    shared = SqliteReceiverStore(tmp_path / "hq.db", lost_grace_s=0)
    try:
        for store in (grouped, shared):
            assert store.apply(held) == [StoreResult(1, 0, 0)]
        caplog.clear()
        expected = [StoreResult(1, 0, 1)] if one_batch else [StoreResult(0, 0, 1), StoreResult(1, 0, 0)]
        assert grouped.apply(group) == expected
        assert [r.getMessage() for r in caplog.records if "conflict" in r.getMessage()] == [
            f"conflict: store {S} gateway gw-c seq 5 already holds event {j}; kept event {i} in conflicts"
        ]
        assert shared.apply(group) == expected
        assert state(grouped) == state(shared)
        assert state(grouped)["conflicts"] == [(S, "gw-c", "5", i, j)]
    finally:
        grouped.close()
        shared.close()


async def test_gateways_are_locked_in_code_point_order_whatever_the_collation(
    postgres: PostgresServer,
) -> None:
    """In a database whose collation sorts gw-a before gw-B (ICU), the group path still locks gw-B first, as
    Python sorts the ids and so as the shared path locks them: with gw-a held elsewhere, the group waits
    holding gw-B."""
    name = f"icu_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'und'"
        )
        assert conn.execute("SELECT 'gw-a' < 'gw-B' COLLATE \"und-x-icu\"").fetchone() == (True,)
    dsn = postgres.dsn().replace("dbname=postgres", f"dbname={name}")
    store = PostgresReceiverStore(dsn, lost_grace_s=0)
    a = {seq: envelope(S, "gw-a", seq) for seq in (1, 2)}
    b = {seq: envelope(S, "gw-B", seq) for seq in (1, 2)}
    results: list[Any] = []
    group = threading.Thread(
        target=lambda: results.extend(store.apply([item("gw-B", [b[2]]), item("gw-a", [a[2]])]))
    )
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as probe:
        try:
            assert store.apply([item("gw-B", [b[1]]), item("gw-a", [a[1]])]) == [StoreResult(1, 0, 0)] * 2
            holder.execute("SELECT 1 FROM gateways WHERE gateway_id = 'gw-a' FOR UPDATE")
            group.start()
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s"
            await eventually(
                lambda: probe.execute(waiting, (name,)).fetchone() == (1,), "the group waits on gw-a"
            )
            with pytest.raises(psycopg.errors.LockNotAvailable):
                probe.execute("SELECT 1 FROM gateways WHERE gateway_id = 'gw-B' FOR UPDATE NOWAIT")
        finally:
            holder.rollback()
            if group.is_alive():
                group.join()
            store.close()
    assert results == [StoreResult(1, 0, 0)] * 2


class _GroupsStore(_HeldStore):
    """A held store that records, per transaction, how many messages it took and their declared decoded bytes."""

    def __init__(self, path: Path) -> None:
        self.groups: list[tuple[int, int]] = []
        super().__init__(path)

    def apply(self, items: Any) -> list[StoreResult | Rejection]:
        items = list(items)
        decoded = sum(i.batch.raw_bytes for i in items if isinstance(i, BatchToStore))
        self.groups.append((len(items), decoded))
        return super().apply(items)


async def test_a_group_is_capped_by_its_decoded_size(hq_broker: Mosquitto, tmp_path: Path) -> None:
    """Batches that compress to almost nothing are grouped by what they inflate to (their headers' raw_bytes),
    not by their size as received: with the database stalled while 40 of 300 KiB each queue up, no group of
    more than one message declares more than MAX_GROUP_DECODED_BYTES; every batch is stored once."""
    pad = "x" * (300 * 1024)
    store = _GroupsStore(tmp_path / "hq.db")
    receiver = make_receiver(hq_broker, store)
    try:
        async with running(receiver), publisher(hq_broker) as pub:
            for seq in range(1, 41):
                body = envelope(S, "gw-a", seq, data={"pad": pad})
                payload = encode_batch(
                    S, "gw-a", [seq], [body], cls="state", complete_through=0, compressor=Compressor("zstd")
                )
                assert len(payload) < 1024
                await publish(pub, S, "gw-a", payload)
            await eventually(lambda: receiver._in_hand == 40, "every batch in hand behind the stalled store")
            store.go.set()
            await eventually(lambda: store.count() == 40, "every batch stored")
        assert sum(n for n, _ in store.groups) == 40
        assert all(n == 1 or decoded <= service.MAX_GROUP_DECODED_BYTES for n, decoded in store.groups)
        assert (
            max(decoded for _, decoded in store.groups) > 3 * 1024 * 1024
        )  # groups still fill up to the cap
    finally:
        store.go.set()
        store.close()


def test_a_value_postgresql_refuses_rejects_its_batch_alone(postgres: PostgresServer) -> None:
    """A timestamp Python takes and PostgreSQL refuses (an ISO week date): the group's other batches are stored,
    the bad one alone is rejected, and the connection stores the next group."""
    bad = orjson.dumps({**orjson.loads(envelope(S, "gw-b", 1)), "recorded_at": "2026-W01-1T00:00:00Z"})
    store = PostgresReceiverStore(postgres.fresh_schema(), lost_grace_s=0)
    try:
        results = store.apply(
            [
                item("gw-a", [envelope(S, "gw-a", 1)]),
                item("gw-b", [bad]),
                item("gw-c", [envelope(S, "gw-c", 1)]),
            ]
        )
        assert results[0] == results[2] == StoreResult(1, 0, 0)
        assert isinstance(results[1], Rejection)
        assert results[1].topic == f"retail/{S}/gw-b/events"
        assert "cannot store" in results[1].reason
        assert store.apply([item("gw-b", [envelope(S, "gw-b", 1)])]) == [StoreResult(1, 0, 0)]
        assert store.count_rejected() == 1
        with store._session() as cur:
            held = cur.execute("SELECT gateway_id, seq FROM events ORDER BY gateway_id").fetchall()
        assert held == [("gw-a", 1), ("gw-b", 1), ("gw-c", 1)]
    finally:
        store.close()
