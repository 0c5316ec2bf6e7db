"""The receiver's database logic on both backends, a real SQLite file and a real PostgreSQL server: dedup,
conflicts, gap classes (explained, lost, pending), resend claims, clock correction, bad reports, and several
writers on one PostgreSQL database."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_bridge.hq import sql_limits as receiver_sql
from cloud_bridge.hq.model import (
    BatchRejectedError,
    BatchToStore,
    Rejection,
    StoreResult,
    StoreUnavailableError,
)
from cloud_bridge.hq.postgres import PostgresReceiverStore
from cloud_bridge.hq.ranges import GapClasses
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.hq.sql_limits import QUIET_RESEND_S
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.wire import decode_batch
from gateway.kernel.events import uuid7
from tests.cloud_bridge.hq.test_receiver import batch, batch_of, envelope, schema1_bytes, summary_of
from tests.harness.pg import PostgresServer, session_server

S, G = "hk-001", "gw-a"
BOOT = "boot-1"
ANCHOR_UTC = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from session_server()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlReceiverStore]:
    """The database of a single receiver: a missing seq below complete_through is lost at once (no grace)."""
    if request.param == "sqlite":
        db: SqlReceiverStore = SqliteReceiverStore(tmp_path / "hq.db", lost_grace_s=0)
    else:
        db = PostgresReceiverStore(request.getfixturevalue("postgres").fresh_schema(), lost_grace_s=0)
    yield db
    db.close()


def report(seq: int, kind: str, data: dict[str, Any], **fields: Any) -> bytes:
    return envelope(S, G, seq, kind=kind, data=data, **fields)


def evicted(seq: int, *ranges: list[int]) -> bytes:
    data = {"class": "telemetry", "reason": "disk_budget", "count": 0, "bytes": 0, "ranges": list(ranges)}
    return report(seq, "outbox.evicted", data)


def anchor(seq: int, mono_s: float, boot_id: str = BOOT) -> bytes:
    data = {"boot_id": boot_id, "mono_ns": int(mono_s * 1e9), "utc": ANCHOR_UTC.isoformat(), "step_s": 12.5}
    return report(seq, "clock.synced", data)


def unsynced(seq: int, mono_s: float, boot_id: str = BOOT) -> bytes:
    return envelope(S, G, seq, clock_synced=False, mono_ns=int(mono_s * 1e9), boot_id=boot_id)


# --- dedup and conflicts -------------------------------------------------------------------------------------


def test_duplicates_and_conflicts(store: SqlReceiverStore, caplog: pytest.LogCaptureFixture) -> None:
    first = batch(S, G, [1, 2, 3])
    assert store.store_batch(S, G, first) == StoreResult(3, 0, 0)
    assert store.store_batch(S, G, first) == StoreResult(0, 3, 0)
    other_id = str(uuid7())
    with caplog.at_level(logging.WARNING, logger="cloud_bridge.hq.sql"):
        result = store.store_batch(S, G, batch(S, G, [3, 4], ids={3: other_id}))
        assert result == StoreResult(new=1, duplicates=0, conflicts=1)
        # An id already stored at another seq (or gateway) is a conflict too, and its seq stays missing.
        assert store.store_batch(S, G, batch(S, G, [5, 6], ids={6: first.events[0]["id"]})) == StoreResult(
            1, 0, 1
        )
    assert [e["id"] for e in store.events(G)][:3] == [e["id"] for e in first.events]
    row = summary_of(store, G)
    assert (row.events, row.conflicts, row.duplicates, row.max_seq) == (5, 2, 3, 5)
    assert any("conflict" in r.getMessage() and other_id in r.getMessage() for r in caplog.records)


def test_a_conflicting_event_is_kept_beside_the_stored_one(store: SqlReceiverStore) -> None:
    """A seq conflict is never a silent drop: the event that holds the seq stays in events, the other goes to
    the conflicts table (once, however often it is received), and both can be read back."""
    first = batch(S, G, [1, 2, 3])
    store.store_batch(S, G, first)
    other_id = str(uuid7())
    clash = batch(S, G, [3, 4], ids={3: other_id})
    assert store.store_batch(S, G, clash).conflicts == 1
    assert store.store_batch(S, G, clash).conflicts == 1  # received again: counted, kept once
    moved = batch(S, G, [5], ids={5: first.events[0]["id"]})  # an id already held at seq 1
    assert store.store_batch(S, G, moved).conflicts == 1
    kept = store.conflicts()
    assert [(c.seq, c.id, c.kept_id, c.kind) for c in kept] == [
        (3, other_id, first.events[2]["id"], clash.events[0]["kind"]),
        (5, first.events[0]["id"], None, moved.events[0]["kind"]),
    ]
    assert [e["id"] for e in store.events(G)][2] == first.events[2]["id"]
    assert summary_of(store, G).conflicts == 3
    assert store.conflicts(limit=1) == kept[:1]


def test_a_database_of_before_the_conflicts_table_gets_it(tmp_path: Path) -> None:
    db = tmp_path / "hq.db"
    SqliteReceiverStore(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TABLE conflicts")
        conn.commit()
    store = SqliteReceiverStore(db)
    try:
        store.store_batch(S, G, batch(S, G, [1]))
        store.store_batch(S, G, batch(S, G, [1], ids={1: str(uuid7())}))
        assert len(store.conflicts()) == 1
    finally:
        store.close()


def test_a_schema_1_batch_may_repeat_a_seq(store: SqlReceiverStore) -> None:
    doubled = orjson.loads(schema1_bytes(S, G, [1, 2]))
    doubled["events"][1] = doubled["events"][0]
    doubled["last_seq"] = 1
    assert store.store_batch(S, G, decode_batch(orjson.dumps(doubled))) == StoreResult(1, 1, 0)


def test_a_bad_batch_is_rejected_and_leaves_no_trace(store: SqlReceiverStore) -> None:
    good = batch(S, G, [1])
    with pytest.raises(BatchRejectedError, match="topic says store 'hk-001' gateway 'gw-b'"):
        store.store_batch(S, "gw-b", good)
    forged = orjson.loads(envelope("hk-009", G, 2))
    with pytest.raises(BatchRejectedError, match="event seq 2 says store 'hk-009'"):
        store.store_batch(S, G, batch_of(S, G, [envelope(S, G, 1), orjson.dumps(forged)]))
    naive = orjson.loads(envelope(S, G, 1))
    naive["recorded_at"] = "2024-01-01T00:00:00"  # no UTC offset
    with pytest.raises(BatchRejectedError, match="recorded_at"):
        store.store_batch(S, G, batch_of(S, G, [orjson.dumps(naive)]))
    nul = orjson.loads(envelope(S, G, 1))
    nul["device_id"] = "till\x00"  # PostgreSQL text cannot hold it: refused on both backends
    with pytest.raises(BatchRejectedError, match="NUL"):
        store.store_batch(S, G, batch_of(S, G, [orjson.dumps(nul)]))
    results = store.apply(
        [
            BatchToStore("t/1", 10, S, "gw-b", good),
            Rejection("t/\x002", "garbage\x00", 3),
            BatchToStore("t/3", 10, S, G, good),
        ]
    )
    assert isinstance(results[0], Rejection)
    assert results[2] == StoreResult(1, 0, 0)
    newest = store.rejections(limit=1)[0]
    assert (newest.topic, newest.reason) == ("t/\\x002", "garbage\\x00")
    assert (store.count(), store.count_rejected()) == (1, 2)
    assert [s.gateway_id for s in store.summary()] == [G]


def _with(seq: int, **fields: Any) -> bytes:
    event = orjson.loads(envelope(S, G, seq))
    event.update(fields)
    return orjson.dumps(event)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"id": "e" * 9000}, "'id' longer than 64"),
        ({"kind": "k" * 65}, "'kind' longer than 64"),
        ({"device_id": "d" * 3000}, "'device_id' longer than 64"),
        ({"boot_id": "b" * 3000}, "'boot_id' longer than 64"),
        ({"recorded_at": "9999-12-31T23:59:59-01:00"}, "outside 1970..2199"),  # year 10000 in UTC
        ({"recorded_at": "1969-12-31T23:59:59Z"}, "outside 1970..2199"),
    ],
)
def test_values_a_database_cannot_hold_are_rejected_not_retried(
    store: SqlReceiverStore, fields: dict[str, Any], reason: str
) -> None:
    """On PostgreSQL a 9,000-character id fails the index ("maximum size is 8191") and a year-10000 time breaks
    every later read; both would otherwise be taken for the database failing and retried forever."""
    bad = batch_of(S, G, [_with(1, **fields)])
    results = store.apply(
        [BatchToStore("t/bad", 10, S, G, bad), BatchToStore("t/good", 10, S, G, batch(S, G, [2]))]
    )
    assert isinstance(results[0], Rejection)
    assert reason in results[0].reason
    assert results[1] == StoreResult(1, 0, 0)
    assert store.count_rejected() == 1
    assert summary_of(store, G).events == 1  # and the summary still reads


@pytest.mark.parametrize(
    "gateway_id", ["g" * 3000, "gw a", "gw+", "-gw"], ids=["3000-chars", "space", "plus", "dash-first"]
)
def test_a_gateway_id_that_is_not_an_id_is_rejected(store: SqlReceiverStore, gateway_id: str) -> None:
    forged = batch_of(S, gateway_id, [envelope(S, gateway_id, 1)])
    (result,) = store.apply([BatchToStore("t", 10, S, gateway_id, forged)])
    assert isinstance(result, Rejection)
    assert "gateway id" in result.reason
    assert len(result.reason) < 300
    assert store.summary() == []


def test_a_database_size_limit_rejects_the_batch_only(postgres: PostgresServer) -> None:
    """Backstop: should a value get past event_rows and hit a PostgreSQL limit (ProgramLimitExceeded), that
    batch is rejected and counted; the database is fine, so nothing is retried. An index on ~3 KB of
    incompressible text per event makes every insert exceed the btree row limit (2704 bytes)."""
    store = PostgresReceiverStore(postgres.fresh_schema())
    try:
        wide = " || ".join(f"md5(id || '{i}')" for i in range(100))
        with store._session() as cur:
            cur.execute(f"CREATE INDEX events_too_wide ON events (({wide})) WHERE kind = 'stock.level'")
        results = store.apply(
            [
                BatchToStore("t/1", 10, S, G, batch_of(S, G, [envelope(S, G, 1, kind="stock.level")])),
                BatchToStore("t/2", 10, S, G, batch(S, G, [2])),
            ]
        )
        assert isinstance(results[0], Rejection)
        assert "ProgramLimitExceeded" in results[0].reason
        assert results[1] == StoreResult(1, 0, 0)
        assert (store.count(), store.count_rejected()) == (1, 1)
    finally:
        store.close()


# --- gap classes --------------------------------------------------------------------------------------------


def test_gaps_explained_lost_and_pending(store: SqlReceiverStore) -> None:
    store.store_batch(S, G, batch(S, G, [1, 2, 3]))
    store.store_batch(S, G, batch(S, G, [10, 11], complete_through=3))
    assert store.classes(G) == GapClasses(pending=[(4, 9)])
    # The gateway evicted 4..5 and reports it; 6..7 are acked at its end but never arrived; 8..9 on the way.
    store.store_batch(S, G, batch_of(S, G, [evicted(12, [4, 5])], complete_through=7))
    assert store.classes(G) == GapClasses(explained=[(4, 5)], lost=[(6, 7)], pending=[(8, 9)])
    row = summary_of(store, G)
    assert (row.explained, row.lost, row.pending, row.missing, row.gaps) == (2, 2, 2, 6, 1)
    assert (row.events, row.max_seq, row.complete_through) == (6, 12, 7)
    # A journal.corrupt alert's possibly_lost explains too, and complete_through beyond max_seq counts.
    corrupt = {
        "rule": "journal.corrupt",
        "severity": "critical",
        "subject": "journal",
        "message": "moved aside",
    }
    alert = report(1_000_013, "alert.raised", {**corrupt, "details": {"possibly_lost": [13, 1_000_012]}})
    store.store_batch(S, G, batch_of(S, G, [alert], complete_through=1_000_020))
    classes = store.classes(G)
    assert classes.explained == [(4, 5), (13, 1_000_012)]
    assert classes.lost == [(6, 9), (1_000_014, 1_000_020)]
    assert classes.pending == []
    store.store_batch(S, G, batch(S, G, [6, 7, 8, 9]))
    assert store.classes(G).lost == [(1_000_014, 1_000_020)]
    assert store.gaps(G) == [(4, 5), (13, 1_000_012), (1_000_014, 1_000_020)]


def test_resend_claims_are_bounded_and_shared(store: SqlReceiverStore) -> None:
    """One claim per gateway per interval: its lowest lost ranges, at most 100,000 seqs in all (one command)."""
    store.store_batch(S, G, batch(S, G, [1]))
    store.store_batch(S, G, batch(S, G, [250_003], complete_through=250_002))
    (request,) = store.claim_resends(interval_s=60)
    assert (request.store_id, request.gateway_id) == (S, G)
    assert request.ranges == [(2, 100_001)]
    assert store.claim_resends(interval_s=60) == []  # asked already: not again for 60 s
    (again,) = store.claim_resends(0, 10, max_seqs=5, online_s=60)
    assert again.ranges == [(2, 6)]


def test_one_claim_carries_many_scattered_holes_up_to_the_range_limit(store: SqlReceiverStore) -> None:
    """A full disk leaves hundreds of scattered holes: they go in one claim (one command), not one each."""
    present = [s for s in range(1, 3001) if s % 2]  # every even seq missing: 1500 holes
    store.store_batch(S, G, batch(S, G, present, complete_through=3000))
    (request,) = store.claim_resends(0)
    assert len(request.ranges) == 1000  # MAX_RESEND_RANGES
    assert request.ranges[:2] == [(2, 2), (4, 4)]
    # The interval has passed (0 s): the next ask starts where this one stopped, so holes the gateway no longer
    # has (answered missing, never explained) cannot hide the ones above them forever.
    (rest,) = store.claim_resends(0)
    assert rest.ranges[:2] == [(2, 2), (4, 4)]  # the 500 left (2002..3000), then it wraps round to the lowest
    assert (2002, 2002) in rest.ranges
    assert (3000, 3000) in rest.ranges
    assert len(rest.ranges) == 1000
    asked = {r for claim in (request, rest) for r in claim.ranges}
    assert len(asked) == 1500  # every hole asked for within two rounds


def test_resend_claims_cost_nothing_for_complete_gateways(store: SqlReceiverStore) -> None:
    store.store_batch(S, G, batch(S, G, [1, 2, 3], complete_through=3))
    store.store_batch(S, "gw-b", batch(S, "gw-b", [1, 3], complete_through=1))  # 2 is pending
    assert store.claim_resends(interval_s=0, online_s=60) == []
    assert store.claim_resends(interval_s=0) == []


def _opener(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], SqlReceiverStore]:
    """Opens a store of this kind (default options), each time on the same database."""
    if kind == "sqlite":
        return lambda: SqliteReceiverStore(tmp_path / "hq.db")
    dsn = request.getfixturevalue("postgres").fresh_schema()
    return lambda: PostgresReceiverStore(dsn)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_missing_seq_is_lost_only_once_its_watermark_is_a_grace_period_old(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With several receivers the batch holding 6..7 may still wait in another's queue when complete_through
    7 arrives: 6..7 stay pending for the grace period (60 s by default), then are lost, in the summary and
    for resend requests alike."""
    store = _opener(kind, request, tmp_path)()
    try:
        store.store_batch(S, G, batch(S, G, [1, 2, 3, 4, 5]))
        store.store_batch(S, G, batch(S, G, [8, 9], complete_through=7))
        later = datetime.now(UTC) + timedelta(seconds=61)
        assert store.classes(G) == GapClasses(pending=[(6, 7)])
        assert store.classes(G, now=later) == GapClasses(lost=[(6, 7)])
        assert (summary_of(store, G).lost, summary_of(store, G).pending) == (0, 2)
        (row,) = store.summary(now=later)
        assert (row.lost, row.pending, row.complete_through) == (2, 0, 7)
        assert store.claim_resends(90, 10) == []  # not lost yet
        assert store.claim_resends(30, 10, online_s=30, now=later) == []  # away 61 s > online_s
        (request_,) = store.claim_resends(90, 10, now=later)
        assert request_.ranges == [(6, 7)]
    finally:
        store.close()


def test_a_quiet_gateway_is_asked_to_resend_once_per_interval(store: SqlReceiverStore) -> None:
    """A gateway that sends nothing new still has its lost seqs asked for (it would never heal otherwise): at
    once, then every interval while it was heard from lately, and only every QUIET_RESEND_S once it has been
    quiet for QUIET_AFTER_S (it may be away: what HQ asks waits in its session at the broker)."""
    store.store_batch(S, G, batch(S, G, [1, 4], complete_through=3))
    heard = datetime.now(UTC)
    (first,) = store.claim_resends(30, 10, now=heard + timedelta(seconds=1))
    assert first.ranges == [(2, 3)]
    assert store.claim_resends(30, 10, now=heard + timedelta(seconds=30)) == []
    (again,) = store.claim_resends(30, 10, now=heard + timedelta(seconds=32))
    assert again.ranges == [(2, 3)]
    quiet = heard + timedelta(seconds=32)
    assert store.claim_resends(30, 10, now=quiet + timedelta(seconds=QUIET_RESEND_S - 1)) == []
    (late,) = store.claim_resends(30, 10, now=quiet + timedelta(seconds=QUIET_RESEND_S + 1))
    assert late.ranges == [(2, 3)]
    # online_s keeps the old behaviour: only gateways heard from within it.
    assert store.claim_resends(0, 10, online_s=30, now=heard + timedelta(hours=6)) == []


def test_the_summary_reads_a_gateways_gaps_again_only_when_it_changed(tmp_path: Path) -> None:
    store = SqliteReceiverStore(tmp_path / "hq.db", lost_grace_s=0)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        store.store_batch(S, G, batch(S, G, [1, 3]))
        store.store_batch(S, "gw-b", batch(S, "gw-b", [1, 2]))

        def reads_of_runs() -> int:
            before = len(statements)
            store.summary()
            return sum("FROM runs" in q for q in statements[before:])

        assert reads_of_runs() == 1  # gw-a has a gap; gw-b has none and costs nothing
        assert reads_of_runs() == 0
        store.store_batch(S, G, batch(S, G, [5], complete_through=4))
        assert reads_of_runs() == 1
        assert store.classes(G) == GapClasses(lost=[(2, 2), (4, 4)])
        store.store_batch(S, G, batch(S, G, [2, 4]))
        assert store.classes(G) == GapClasses()
        assert reads_of_runs() == 0
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_schema_2_database_is_upgraded(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Schema 2 had no lost watermark: what it called lost (below complete_through) stays lost."""
    reopen = _opener(kind, request, tmp_path)
    store = reopen()
    store.store_batch(S, G, batch(S, G, [1, 4], complete_through=3))
    with store._session() as cur:
        for column in ("mark_through", "mark_at", "lost_through"):
            cur.execute(f"ALTER TABLE gateways DROP COLUMN {column}")
        cur.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    store.close()
    store = reopen()
    try:
        assert store.classes(G) == GapClasses(lost=[(2, 3)])
        store.store_batch(S, G, batch(S, G, [2, 3]))
        assert store.gaps(G) == []
    finally:
        store.close()


def test_many_small_gaps_stay_cheap_and_exact(store: SqlReceiverStore) -> None:
    """Interleaved classes: odd seqs first (one batch), then the even ones in two batches, out of order."""
    store.store_batch(S, G, batch(S, G, range(1, 400, 2)))
    assert len(store.gaps(G)) == 199
    store.store_batch(S, G, batch(S, G, range(200, 400, 2)))
    store.store_batch(S, G, batch(S, G, range(2, 200, 2)))
    assert store.gaps(G) == []
    assert summary_of(store, G).events == 399


# --- clock --------------------------------------------------------------------------------------------------


def _corrected(store: SqlReceiverStore) -> dict[int, datetime | None]:
    return {t.seq: t.corrected_at for t in store.event_times(G)}


@pytest.mark.parametrize("anchor_first", [False, True])
def test_clock_correction_in_either_order(store: SqlReceiverStore, anchor_first: bool) -> None:
    events = batch_of(S, G, [unsynced(1, 10.0), unsynced(2, 70.5), unsynced(3, 80.0, boot_id="boot-0")])
    sync = batch_of(S, G, [anchor(4, 100.0)])
    for b in (sync, events) if anchor_first else (events, sync):
        store.store_batch(S, G, b)
    assert _corrected(store) == {
        1: ANCHOR_UTC - timedelta(seconds=90),
        2: ANCHOR_UTC - timedelta(seconds=29.5),
        3: None,  # another boot: its monotonic clock is not comparable
        4: None,  # synced events keep their recorded_at
    }


def test_the_nearest_anchor_wins_whatever_the_order(store: SqlReceiverStore) -> None:
    store.store_batch(S, G, batch_of(S, G, [unsynced(1, 10.0), unsynced(5, 1000.0)]))
    store.store_batch(S, G, batch_of(S, G, [anchor(6, 1001.0)]))
    store.store_batch(S, G, batch_of(S, G, [anchor(2, 11.0)]))  # arrives later, nearer to seq 1
    store.store_batch(S, G, batch_of(S, G, [unsynced(3, 12.0)]))
    corrected = _corrected(store)
    assert corrected[1] == ANCHOR_UTC - timedelta(seconds=1)
    assert corrected[3] == ANCHOR_UTC + timedelta(seconds=1)
    assert corrected[5] == ANCHOR_UTC - timedelta(seconds=1)


def test_unusable_reports_are_stored_and_counted(
    store: SqlReceiverStore, caplog: pytest.LogCaptureFixture
) -> None:
    bad_anchor = report(2, "clock.synced", {"boot_id": BOOT, "mono_ns": -5, "utc": "yesterday"})
    bad_ranges = evicted(3, [9, 4])
    huge = evicted(4, *([[5, 5]] * 2001))
    with caplog.at_level(logging.WARNING, logger="cloud_bridge.hq.sql"):
        result = store.store_batch(S, G, batch_of(S, G, [unsynced(1, 1.0), bad_anchor, bad_ranges, huge]))
        assert result == StoreResult(4, 0, 0)
        assert store.store_batch(S, G, batch_of(S, G, [bad_ranges])) == StoreResult(0, 1, 0)  # counted once
    assert summary_of(store, G).bad_reports == 3
    assert _corrected(store)[1] is None
    assert store.classes(G) == GapClasses()
    assert sum("clock.synced needs data.mono_ns" in r.getMessage() for r in caplog.records) == 1


# --- several writers ----------------------------------------------------------------------------------------


def test_concurrent_writers_store_every_event_once(postgres: PostgresServer) -> None:
    """Two connections apply the same batches in opposite orders, several gateways per transaction."""
    dsn = postgres.fresh_schema()
    stores = [PostgresReceiverStore(dsn), PostgresReceiverStore(dsn)]
    gateways = [f"gw-{n}" for n in range(4)]
    batches = [
        BatchToStore("t", 1, S, gw, batch(S, gw, range(first, first + 20), complete_through=first - 1))
        for first in range(1, 201, 20)
        for gw in gateways
    ]
    groups = [batches[i : i + 8] for i in range(0, len(batches), 8)]
    results: list[list[StoreResult | Rejection]] = [[], []]

    def writer(n: int) -> None:
        for group in groups if n == 0 else groups[::-1]:
            ordered = sorted(group, key=lambda b: (b.store_id, b.gateway_id))
            results[n].extend(stores[n].apply(ordered))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        flat = [r for rs in results for r in rs]
        assert all(isinstance(r, StoreResult) for r in flat)
        assert sum(r.new for r in flat if isinstance(r, StoreResult)) == 800
        assert sum(r.duplicates for r in flat if isinstance(r, StoreResult)) == 800
        assert stores[0].count() == 800
        for row in stores[1].summary():
            assert (row.events, row.duplicates, row.conflicts, row.missing) == (200, 200, 0, 0)
            assert row.complete_through == 180
    finally:
        for s in stores:
            s.close()


_SCHEMA_1 = """
CREATE TABLE events (id TEXT PRIMARY KEY, store_id TEXT NOT NULL, gateway_id TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, device_id TEXT, recorded_at TEXT NOT NULL, received_at TEXT NOT NULL, body BLOB NOT NULL);
CREATE UNIQUE INDEX events_store_gateway_seq ON events (store_id, gateway_id, seq);
CREATE TABLE gateways (store_id TEXT NOT NULL, gateway_id TEXT NOT NULL, max_seq INTEGER NOT NULL,
    events INTEGER NOT NULL, duplicates INTEGER NOT NULL, conflicts INTEGER NOT NULL,
    last_received_at TEXT NOT NULL, PRIMARY KEY (store_id, gateway_id));
CREATE TABLE rejected (received_at TEXT NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, size INTEGER NOT NULL);
PRAGMA user_version=1;
"""
"""The receiver's database before issue #3 (git history: cloud_bridge/hq/sqlite.py)."""


def test_a_schema_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "hq.db"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_1)
    received = "2026-11-22T02:00:00.000+00:00"
    for seq in (1, 2, 3, 5):
        body = envelope(S, G, seq, clock_synced=seq != 5, mono_ns=seq * 10**9)
        event = orjson.loads(body)
        old.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (event["id"], S, G, seq, event["kind"], "till-1", event["recorded_at"], received, body),
        )
    old.execute("INSERT INTO gateways VALUES (?, ?, 5, 4, 1, 0, ?)", (S, G, received))
    old.execute("INSERT INTO rejected VALUES (?, 'retail/x/y/events', 'not JSON', 3)", (received,))
    old.commit()
    old.close()
    store = SqliteReceiverStore(path, lost_grace_s=0)
    try:
        row = summary_of(store, G)
        assert (row.events, row.max_seq, row.duplicates, row.missing, row.pending, row.lost) == (
            4,
            5,
            1,
            1,
            1,
            0,
        )
        assert row.lag is not None
        assert [(r.topic, r.reason) for r in store.rejections()] == [("retail/x/y/events", "not JSON")]
        store.store_batch(S, G, batch_of(S, G, [anchor(6, 10.0)], complete_through=5))
        assert store.classes(G) == GapClasses(lost=[(4, 4)])
        assert _corrected(store)[5] == ANCHOR_UTC - timedelta(seconds=5)
        assert store.store_batch(S, G, batch(S, G, [4])) == StoreResult(1, 0, 0)
        assert store.gaps(G) == []
    finally:
        store.close()
    SqliteReceiverStore(path).close()  # opens as schema 2 now


def test_a_newer_schema_is_refused_with_a_reason(tmp_path: Path) -> None:
    SqliteReceiverStore(tmp_path / "hq.db").close()
    db = sqlite3.connect(tmp_path / "hq.db")
    db.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreUnavailableError, match="database schema 9, this receiver needs 3"):
        SqliteReceiverStore(tmp_path / "hq.db")


def test_conflicting_bodies_are_kept_up_to_a_byte_cap_then_counted(
    store: SqlReceiverStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Besides the row cap, a byte cap per gateway: bodies go in whole while they fit, past it they are
    counted, not kept; another gateway has its own budget."""
    first = batch(S, G, [1, 2, 3])
    store.store_batch(S, G, first)
    clash = batch(S, G, [1, 2, 3], ids={s: str(uuid7()) for s in (1, 2, 3)})
    body = len(orjson.dumps(clash.events[0]))
    monkeypatch.setattr(receiver_sql, "MAX_CONFLICT_BYTES_KEPT", 2 * body + body // 2)
    assert store.store_batch(S, G, clash).conflicts == 3
    assert [c.seq for c in store.conflicts()] == [1, 2]
    assert summary_of(store, G).conflicts == 3
    assert store.store_batch(S, G, batch(S, G, [4], ids={4: first.events[0]["id"]})).conflicts == 1
    assert [c.seq for c in store.conflicts()] == [1, 2]
    store.store_batch(S, "gw-b", batch(S, "gw-b", [1]))
    store.store_batch(S, "gw-b", batch(S, "gw-b", [1], ids={1: str(uuid7())}))
    assert [(c.gateway_id, c.seq) for c in store.conflicts()] == [(G, 1), (G, 2), ("gw-b", 1)]


def test_a_gateway_marked_single_range_is_claimed_a_few_ranges_at_a_time(store: SqlReceiverStore) -> None:
    """A gateway that refused a multi-range resend gets claims flagged single_range, at most single_ranges
    ranges; the mark is shared through the database and tried again after SINGLE_RANGE_RECHECK_S."""
    present = [s for s in range(1, 41) if s % 2]  # 20 holes
    store.store_batch(S, G, batch(S, G, present, complete_through=40))
    now = datetime.now(UTC)
    (multi,) = store.claim_resends(0, now=now)
    assert (len(multi.ranges), multi.single_range) == (20, False)
    assert store.mark_single_range(S, G, "invalid_args: ranges: Extra inputs are not permitted", now=now)
    assert not store.mark_single_range(S, G, "invalid_args: again", now=now)  # known: said once
    assert store.single_range_gateways() == [(S, G)]
    (single,) = store.claim_resends(0, single_ranges=4, now=now)
    assert single.single_range
    assert len(single.ranges) == 4
    recheck = now + timedelta(seconds=receiver_sql.SINGLE_RANGE_RECHECK_S + 1)
    (retried,) = store.claim_resends(0, now=recheck)
    assert (len(retried.ranges), retried.single_range) == (20, False)
    assert store.mark_single_range(S, G, "invalid_args: still old", now=recheck)


def test_subscriptions_are_recorded_per_client_id(store: SqlReceiverStore) -> None:
    assert store.subscriptions("hq-a") == []
    store.record_subscriptions("hq-a", ["retail/s1/+/events", "retail/s2/+/events"], replace=False)
    store.record_subscriptions("hq-a", ["retail/s3/+/events", "retail/s1/+/events"], replace=False)
    store.record_subscriptions("hq-b", ["retail/s9/+/events"], replace=True)
    assert store.subscriptions("hq-a") == ["retail/s1/+/events", "retail/s2/+/events", "retail/s3/+/events"]
    store.record_subscriptions("hq-a", ["retail/s3/+/events"], replace=True)
    assert store.subscriptions("hq-a") == ["retail/s3/+/events"]
    assert store.subscriptions("hq-b") == ["retail/s9/+/events"]


def test_a_resend_round_skips_gateways_with_nothing_lost_until_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway whose missing seqs are all explained or pending is not read again by each resend round: only
    once its row changes (a batch) or its lost watermark can move (a grace period later)."""
    monkeypatch.setattr(receiver_sql, "GAP_CACHE_MAX_RANGES", 0)  # every classification reads the runs
    store = SqliteReceiverStore(tmp_path / "hq.db", lost_grace_s=60)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        store.store_batch(S, G, batch(S, G, [1, 2, 5]))
        store.store_batch(S, G, batch_of(S, G, [evicted(6, [3, 4])], complete_through=6))  # 3..4 explained
        store.store_batch(S, "gw-b", batch(S, "gw-b", [1, 4], complete_through=4))  # 2..3 pending (grace)
        now = datetime.now(UTC)

        def reads_of_runs(at: datetime) -> int:
            before = len(statements)
            assert store.claim_resends(0, now=at) == []
            return sum("FROM runs" in q for q in statements[before:])

        assert reads_of_runs(now) == 2
        assert reads_of_runs(now + timedelta(seconds=1)) == 0
        assert reads_of_runs(now + timedelta(seconds=30)) == 0
        store.store_batch(S, G, batch(S, G, [7]))  # gw-a changed: read again (still nothing lost)
        assert reads_of_runs(now + timedelta(seconds=31)) == 1
        # A grace period after their last batches both watermarks may have moved: both are read again, and
        # gw-b's 2..3 are lost now, and claimed; gw-a's watermark cannot move any more: it is skipped for good.
        later = datetime.now(UTC) + timedelta(seconds=61)
        before = len(statements)
        (request,) = store.claim_resends(0, now=later)
        assert (request.gateway_id, request.ranges) == ("gw-b", [(2, 3)])
        assert sum("FROM runs" in q for q in statements[before:]) == 2
        before = len(statements)
        assert store.claim_resends(60, now=later + timedelta(minutes=10)) == []  # gw-b: asked, quiet
        assert sum("FROM runs" in q for q in statements[before:]) == 0
    finally:
        store.close()
