"""The journal on real SQLite files: seq, envelopes, acknowledge-after-commit, dedup, quarantine,
group commit, failed commits, reads for the uplink, and the writer's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.kernel.clock import BOOT_ID, ClockState
from gateway.kernel.config import JournalConfig
from gateway.kernel.events import SCHEMA_VERSION, Envelope, payload_adapter
from gateway.kernel.journal import (
    QUARANTINE_KEEP_BYTES,
    QUEUE_LIMIT,
    Committed,
    Draft,
    Journal,
    JournalError,
    Processor,
    Rejected,
)
from gateway.kernel.metrics import Metrics
from gateway.kernel.outbox import STATE
from gateway.kernel.pipeline import Emit, Event
from gateway.ledger.config import StockConfig, StockItem
from gateway.ledger.stock import StockLedger
from tests.harness.pos_drafts import DRIVER, pos_draft

STORE_ID = "hk-0042"
GATEWAY_ID = "gw-1"


# --- helpers --------------------------------------------------------------------------------------


def new_journal(
    path: Path,
    *,
    metrics: Metrics | None = None,
    processors: Sequence[Processor] = (),
    config: JournalConfig | None = None,
    synced: bool = True,
) -> Journal:
    return Journal(
        path / "journal.db",
        STORE_ID,
        GATEWAY_ID,
        config or JournalConfig(),
        metrics or Metrics(),
        processors,
        ClockState(override=synced),
    )


@contextlib.asynccontextmanager
async def running(journal: Journal) -> AsyncIterator[Journal]:
    """Open the journal, run its writer, and on the way out flush, stop the writer and close."""
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    await asyncio.sleep(0)
    try:
        yield journal
        await flushed(journal)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()


async def flushed(journal: Journal) -> None:
    async with asyncio.timeout(20):
        await journal.flush()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll with a generous deadline (never a timed assert)."""
    async with asyncio.timeout(20):
        while not condition():  # noqa: ASYNC110 - the conditions change on other threads; no event to wait on
            await asyncio.sleep(0.005)
    assert condition(), what


def query(journal: Journal, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Read the file through a connection of our own, as another process would."""
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        return conn.execute(sql, params).fetchall()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def status(i: int, key: str | None = None, ack: Callable[[], None] | None = None) -> Draft:
    data = orjson.dumps({"status": "online", "reason": f"reading {i}"})
    return Draft("device.status", f"pos{i % 3}", data, dedup_key=key, ack=ack, driver=DRIVER)


class AckProbe:
    """Acks that look for what they acknowledge through their own SQLite connection (ack-after-commit)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.calls: list[str] = []
        self.committed_when_acked: dict[str, bool] = {}

    def event(self, key: str) -> Callable[[], None]:
        return self._probe(key, "SELECT COUNT(*) FROM events WHERE dedup_key=?")

    def quarantined(self, reason: str) -> Callable[[], None]:
        return self._probe(reason, "SELECT COUNT(*) FROM quarantine WHERE reason=?")

    def reject(self, detail: str) -> Callable[[], None]:
        return self._probe(detail, "SELECT COUNT(*) FROM quarantine WHERE detail=?")

    def _probe(self, key: str, count_sql: str) -> Callable[[], None]:
        """An ack that records whether its row was already committed (visible to another connection)."""

        def ack() -> None:
            self.calls.append(key)
            self.committed_when_acked[key] = query(self._journal, count_sql, (key,))[0][0] == 1

        return ack


class FailingProcessor(Processor):
    """A processor that raises inside the commit transaction while ``failures`` is above zero.

    At rollback it records what another connection can see, and which acks had run, at that moment.
    """

    def __init__(self, error: type[Exception], failures: int = 1, *, in_flush: bool = False) -> None:
        self.error = error
        self.failures = failures
        self.in_flush = in_flush
        self.probe: AckProbe | None = None
        self.path: Path | None = None
        self.seen_at_rollback: list[tuple[int, int]] = []

    def setup(self, conn: sqlite3.Connection) -> None:
        del conn

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise self.error("processor failed on purpose")

    def apply(self, event: Event) -> None:
        del event
        if not self.in_flush:
            self._maybe_fail()

    def flush(self, conn: sqlite3.Connection) -> list[Emit]:
        del conn
        if self.in_flush:
            self._maybe_fail()
        return []

    def rollback(self, conn: sqlite3.Connection) -> None:
        del conn
        assert self.path is not None
        with contextlib.closing(sqlite3.connect(self.path)) as other:
            events = other.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        self.seen_at_rollback.append((events, len(self.probe.calls) if self.probe else 0))


class PoisonProcessor(Processor):
    """Raises on any event whose data mentions 'poison' (an event the processor cannot handle)."""

    name = "poison"

    def setup(self, conn: sqlite3.Connection) -> None:
        del conn

    def apply(self, event: Event) -> None:
        if b"poison" in event.data_json:
            raise RuntimeError("cannot process a poison event")

    def flush(self, conn: sqlite3.Connection) -> list[Emit]:
        del conn
        return []

    def rollback(self, conn: sqlite3.Connection) -> None:
        del conn


class ScriptedProcessor(Processor):
    """On its n-th apply() raises the n-th error of the script (None: no error); fine after the script."""

    def __init__(self, script: list[type[Exception] | None]) -> None:
        self.script = list(script)

    def setup(self, conn: sqlite3.Connection) -> None:
        del conn

    def apply(self, event: Event) -> None:
        del event
        error = self.script.pop(0) if self.script else None
        if error is not None:
            raise error("scripted failure")

    def flush(self, conn: sqlite3.Connection) -> list[Emit]:
        del conn
        return []

    def rollback(self, conn: sqlite3.Connection) -> None:
        del conn


class BlockingProcessor(Processor):
    """Holds the writer thread inside the transaction until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def setup(self, conn: sqlite3.Connection) -> None:
        del conn

    def apply(self, event: Event) -> None:
        del event
        self.entered.set()
        self.release.wait(20)

    def flush(self, conn: sqlite3.Connection) -> list[Emit]:
        del conn
        return []

    def rollback(self, conn: sqlite3.Connection) -> None:
        del conn


def stock_ledger(metrics: Metrics, **items: tuple[float, float | None]) -> StockLedger:
    config = StockConfig(items=[StockItem(sku=s, on_hand=h, safety_stock=ss) for s, (h, ss) in items.items()])
    return StockLedger(config, metrics)


# --- seq ------------------------------------------------------------------------------------------


async def test_seq_starts_at_one_and_has_no_gaps(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    async with running(journal):
        assert journal.last_seq == 0
        for batch in range(3):
            for i in range(10):
                assert journal.submit(status(i + 10 * batch))
            await flushed(journal)
            assert journal.last_seq == 10 * (batch + 1)
    seqs = [row[0] for row in query(journal, "SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, 31))
    assert query(journal, "SELECT value FROM meta WHERE key='last_seq'") == []  # not written per commit
    assert sample(metrics, "storegw_journal_last_seq") == 30
    assert sample(metrics, "storegw_events_committed_total", kind="device.status") == 30


async def test_seq_continues_across_restarts(tmp_path: Path) -> None:
    for restart in range(3):
        journal = new_journal(tmp_path)
        async with running(journal):
            assert journal.last_seq == 4 * restart
            for i in range(4):
                journal.submit(status(i))
    seqs = [row[0] for row in query(journal, "SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, 13))


async def test_seq_continues_after_derived_events(tmp_path: Path) -> None:
    from gateway.kernel.rule_config import StockLowAlerts
    from rules.clock import RuleClock
    from rules.engine import RuleEngine

    def low_alerts() -> RuleEngine:
        return RuleEngine([StockLowAlerts()], RuleClock(lambda: True))

    metrics = Metrics()
    journal = new_journal(
        tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(3, 2)), low_alerts()]
    )
    async with running(journal):
        journal.submit(pos_draft("R1", [("TEA", "2")]))
    kinds = query(journal, "SELECT seq, kind FROM events ORDER BY seq")
    assert kinds == [(1, "pos.sale"), (2, "stock.level"), (3, "alert.raised")]

    metrics = Metrics()
    journal = new_journal(
        tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(3, 2)), low_alerts()]
    )
    async with running(journal):
        assert journal.last_seq == 3
        journal.submit(status(1))
    assert query(journal, "SELECT seq, kind FROM events WHERE seq > 3") == [(4, "device.status")]


async def test_commit_of_rejects_only_does_not_use_a_seq(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        journal.submit(Rejected(DRIVER, "not_json", "x", 1, b"x"))
        await flushed(journal)
        assert journal.last_seq == 0
        journal.submit(status(1))
    assert query(journal, "SELECT seq FROM events") == [(1,)]


# --- envelopes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("synced", [True, False])
async def test_every_body_is_a_valid_envelope(tmp_path: Path, synced: bool) -> None:
    metrics = Metrics()
    journal = new_journal(
        tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(10, 1))], synced=synced
    )
    drafts = [
        pos_draft("R1", [("TEA", "2"), ("RICE", "1.5")], occurred_at="2024-05-01T10:15:30.250+08:00"),
        pos_draft("R1", [("TEA", "1")], kind="return", device="pos-2"),
        status(7, key="pos1/device.status/7"),
        Draft(
            "gateway.status", None, orjson.dumps({"status": "online", "version": "1.0", "config_hash": None})
        ),
    ]
    before = datetime.now(UTC)
    async with running(journal):
        for draft in drafts:
            journal.submit(draft)
    after = datetime.now(UTC)

    rows = query(
        journal, "SELECT seq, id, kind, device_id, recorded_at, dedup_key, body FROM events ORDER BY seq"
    )
    assert [r[2] for r in rows] == [
        "pos.sale",
        "pos.return",
        "device.status",
        "gateway.status",
        "stock.level",
        "stock.level",
    ]
    envelopes = [Envelope.model_validate_json(r[6]) for r in rows]
    for (seq, event_id, kind, device_id, recorded_at, dedup_key, body), env in zip(
        rows, envelopes, strict=True
    ):
        assert env.store_id == STORE_ID
        assert env.gateway_id == GATEWAY_ID
        assert env.seq == seq
        assert env.kind == kind
        assert env.device_id == device_id
        assert str(env.id) == event_id
        assert env.id.version == 7
        assert env.id.variant == uuid.RFC_4122
        assert env.boot_id == BOOT_ID
        assert env.clock_synced is synced
        assert env.schema_ == SCHEMA_VERSION
        assert isinstance(env.mono_ns, int)
        assert env.recorded_at.utcoffset() == timedelta(0)
        assert recorded_at.endswith("Z")
        assert datetime.fromisoformat(recorded_at) == env.recorded_at
        assert before - timedelta(milliseconds=1) <= env.recorded_at <= after
        raw = orjson.loads(body)
        assert set(raw) == {
            "id",
            "store_id",
            "gateway_id",
            "seq",
            "kind",
            "device_id",
            "occurred_at",
            "recorded_at",
            "boot_id",
            "clock_synced",
            "mono_ns",
            "schema",
            "data",
        }
        payload_adapter(kind).validate_python(raw["data"])
        if kind.startswith("pos."):
            assert dedup_key == f'["{device_id}","{kind}","REG1","R1"]'
    assert [e.device_id for e in envelopes] == ["pos1", "pos-2", "pos1", None, None, None]
    assert envelopes[0].occurred_at == datetime.fromisoformat("2024-05-01T10:15:30.250+08:00")
    assert envelopes[1].occurred_at is None
    assert orjson.loads(rows[0][6])["data"] == orjson.loads(drafts[0].data_json)
    ids = [e.id for e in envelopes]
    assert len(set(ids)) == len(ids)


async def test_ids_are_unique_and_time_ordered_with_seq(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        for i in range(3000):
            journal.submit(status(i))
    ids = [uuid.UUID(r[0]) for r in query(journal, "SELECT id FROM events ORDER BY seq")]
    assert len(set(ids)) == 3000
    assert all(i.version == 7 for i in ids)
    assert [i.int for i in ids] == sorted(i.int for i in ids)


# --- acknowledge after commit ---------------------------------------------------------------------


async def test_acks_run_only_after_commit(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    probe = AckProbe(journal)
    async with running(journal):
        for i in range(300):
            journal.submit(status(i, key=f"k{i}", ack=probe.event(f"k{i}")))
            if i % 50 == 0:
                detail = f"bad message {i}"
                journal.submit(Rejected(DRIVER, "not_json", detail, 3, b"bad", ack=probe.reject(detail)))
            if i % 70 == 0:
                await asyncio.sleep(0.01)
    assert len(probe.calls) == 306
    assert len(set(probe.calls)) == 306
    assert all(probe.committed_when_acked.values())


async def test_flush_returns_once_everything_is_committed_and_acked(tmp_path: Path) -> None:
    journal = new_journal(tmp_path, config=JournalConfig(commit_max_events=7, commit_max_delay_ms=5))
    acks: list[int] = []
    async with running(journal):
        await flushed(journal)
        for i in range(100):
            journal.submit(status(i, ack=lambda i=i: acks.append(i)))  # type: ignore[misc]
        assert journal.pending > 0
        await flushed(journal)
        assert journal.pending == 0
        assert sorted(acks) == list(range(100))
        assert query(journal, "SELECT COUNT(*) FROM events") == [(100,)]


# --- dedup ----------------------------------------------------------------------------------------


async def test_dedup_within_a_batch_across_batches_and_after_reopen(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    probe = AckProbe(journal)
    commits: list[Committed] = []
    journal.add_listener(commits.append)
    sale = '["pos1","pos.sale","REG1","R1"]'
    async with running(journal):
        journal.submit(pos_draft("R1", [("TEA", "1")], ack=probe.event(sale)))
        journal.submit(pos_draft("R1", [("TEA", "1")], ack=probe.event(sale)))
        await flushed(journal)
        assert sample(metrics, "storegw_messages_duplicate_total", driver=DRIVER) == 1
        assert [c.duplicates for c in commits] == [1]
        journal.submit(pos_draft("R1", [("TEA", "1")], ack=probe.event(sale)))
        await flushed(journal)
        assert sample(metrics, "storegw_messages_duplicate_total", driver=DRIVER) == 2
        assert commits[-1].duplicates == 1
        assert commits[-1].first_seq > commits[-1].last_seq
        assert journal.last_seq == 1
    assert probe.calls == [sale] * 3
    assert all(probe.committed_when_acked.values())

    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    probe = AckProbe(journal)
    async with running(journal):
        journal.submit(pos_draft("R1", [("TEA", "9")], ack=probe.event(sale)))
        journal.submit(pos_draft("R2", [("TEA", "1")], ack=probe.event('["pos1","pos.sale","REG1","R2"]')))
    assert probe.calls == [sale, '["pos1","pos.sale","REG1","R2"]']
    assert sample(metrics, "storegw_messages_duplicate_total", driver=DRIVER) == 1
    assert query(journal, "SELECT seq, dedup_key FROM events ORDER BY seq") == [
        (1, sale),
        (2, '["pos1","pos.sale","REG1","R2"]'),
    ]
    body = query(journal, "SELECT body FROM events WHERE seq=1")[0][0]
    assert orjson.loads(body)["data"]["lines"][0]["quantity"] == "1"


async def test_dedup_over_many_keys_in_one_batch(tmp_path: Path) -> None:
    """More than 500 keys: the IN (...) lookup is chunked."""
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    async with running(journal):
        for i in range(1200):
            journal.submit(status(i, key=f"k{i}"))
        await flushed(journal)
        for i in range(1300):
            journal.submit(status(i, key=f"k{i}"))
    assert query(journal, "SELECT COUNT(*), MAX(seq) FROM events") == [(1300, 1300)]
    assert sample(metrics, "storegw_messages_duplicate_total", driver=DRIVER) == 1200


async def test_drafts_without_dedup_key_are_all_kept(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        journal.submit(status(1))
        journal.submit(status(1))
    assert query(journal, "SELECT COUNT(*) FROM events") == [(2,)]


# --- quarantine -----------------------------------------------------------------------------------


async def test_rejected_items_are_quarantined_and_acked(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    probe = AckProbe(journal)
    big = bytes(range(256)) * 40
    long_detail = "lines.0.quantity: Input should be greater than 0; " * 100
    commits: list[Committed] = []
    journal.add_listener(commits.append)
    before = datetime.now(UTC)
    async with running(journal):
        journal.submit(
            Rejected(
                DRIVER,
                "invalid",
                long_detail,
                len(big),
                big,
                "store/pos/pos1/sale",
                "pos1",
                probe.reject(long_detail[:1000]),
            )
        )
        journal.submit(
            Rejected(DRIVER, "unknown_topic", "no route", 2, b"{}", "x/y", None, probe.reject("no route"))
        )
    rows = query(
        journal,
        "SELECT received_at, driver, device_id, topic, reason, detail, size, payload"
        " FROM quarantine ORDER BY qid",
    )
    assert len(rows) == 2
    received_at, driver, device_id, topic, reason, detail, size, payload = rows[0]
    assert (driver, device_id, topic, reason, size) == (
        DRIVER,
        "pos1",
        "store/pos/pos1/sale",
        "invalid",
        10240,
    )
    assert detail == long_detail[:1000]
    assert payload == big[:QUARANTINE_KEEP_BYTES]
    assert len(payload) == 4096
    received = datetime.fromisoformat(received_at)
    assert received.utcoffset() == timedelta(0)
    assert received >= before - timedelta(milliseconds=1)
    assert rows[1][1:] == (DRIVER, None, "x/y", "unknown_topic", "no route", 2, b"{}")
    assert probe.calls == [long_detail[:1000], "no route"]
    assert all(probe.committed_when_acked.values())
    assert query(journal, "SELECT COUNT(*) FROM events") == [(0,)]
    assert sample(metrics, "storegw_messages_quarantined_total", driver=DRIVER, reason="invalid") == 1
    assert sample(metrics, "storegw_messages_quarantined_total", driver=DRIVER, reason="unknown_topic") == 1
    assert [len(c.rejected) for c in commits] == [2]


async def test_draft_over_max_payload_bytes_is_quarantined(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics, config=JournalConfig(max_payload_bytes=1024))
    probe = AckProbe(journal)
    data = orjson.dumps({"status": "error", "reason": "x" * 5000})
    async with running(journal):
        assert journal.submit(
            Draft("device.status", "pos1", data, ack=probe.quarantined("too_large"), driver=DRIVER)
        )
        assert journal.submit(status(1, key="small", ack=probe.event("small")))
    assert query(journal, "SELECT seq, dedup_key FROM events") == [(1, "small")]
    [(driver, device_id, reason, detail, size, payload)] = query(
        journal, "SELECT driver, device_id, reason, detail, size, payload FROM quarantine"
    )
    assert (driver, device_id, reason, size) == (DRIVER, "pos1", "too_large", len(data))
    assert "1024" in detail
    assert payload == data[:QUARANTINE_KEEP_BYTES]
    assert probe.calls == ["too_large", "small"]
    assert all(probe.committed_when_acked.values())
    assert sample(metrics, "storegw_messages_quarantined_total", driver=DRIVER, reason="too_large") == 1


# --- delivered seq --------------------------------------------------------------------------------


async def test_note_delivered_persists_across_reopen(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    async with running(journal):
        for i in range(5):
            journal.submit(status(i))
        await flushed(journal)
        journal.note_delivered(STATE, 3)
        await flushed(journal)
        assert query(
            journal, "SELECT delivered_seq, pending_events FROM outbox_state WHERE cls=?", (STATE,)
        ) == [(3, 2)]
        journal.note_delivered(STATE, 2)
        assert journal.delivered_seq == 3
        assert sample(metrics, "storegw_uplink_delivered_seq") == 3

    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    async with running(journal):
        assert journal.delivered_seq == 3
        assert sample(metrics, "storegw_uplink_delivered_seq") == 3
        journal.note_delivered(STATE, 5)
        journal.submit(status(9))
    journal = new_journal(tmp_path)
    async with running(journal):
        assert (journal.last_seq, journal.delivered_seq) == (6, 5)
        assert journal.backlog == 1
        assert not journal.caught_up


# --- reads for the uplink -------------------------------------------------------------------------


async def test_read_after_respects_count_bytes_and_order(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        for i in range(10):
            data = orjson.dumps({"status": "error", "reason": "x" * (10 * i)})
            journal.submit(Draft("device.status", "pos1", data))
        await flushed(journal)
        everything = await journal.read_after(0, 100, 10**9)
        assert [seq for seq, _ in everything] == list(range(1, 11))
        bodies = dict(everything)
        assert all(orjson.loads(body)["seq"] == seq for seq, body in everything)

        assert [s for s, _ in await journal.read_after(0, 3, 10**9)] == [1, 2, 3]
        assert [s for s, _ in await journal.read_after(7, 100, 10**9)] == [8, 9, 10]
        assert await journal.read_after(10, 100, 10**9) == []
        assert await journal.read_after(0, 1, 10**9) == [(1, bodies[1])]

        assert await journal.read_after(4, 100, 1) == [(5, bodies[5])]
        budget = len(bodies[5]) + len(bodies[6]) + len(bodies[7]) - 1
        assert [s for s, _ in await journal.read_after(4, 100, budget)] == [5, 6]
        budget += 1
        assert [s for s, _ in await journal.read_after(4, 100, budget)] == [5, 6, 7]
        assert [s for s, _ in await journal.read_after(4, 2, budget)] == [5, 6]


async def test_read_after_sees_new_commits(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        assert await journal.read_after(0, 10, 10**6) == []
        journal.submit(status(1))
        await flushed(journal)
        assert [s for s, _ in await journal.read_after(0, 10, 10**6)] == [1]


# --- group commit ---------------------------------------------------------------------------------


async def test_group_commit_of_5000_drafts(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics, config=JournalConfig(commit_max_events=2000))
    acked = 0

    def ack() -> None:
        nonlocal acked
        acked += 1

    commits: list[Committed] = []
    journal.add_listener(commits.append)
    async with running(journal):
        for i in range(5000):
            assert journal.submit(status(i, key=f"k{i}", ack=ack))
    commit_count = sample(metrics, "storegw_journal_commit_seconds_count")
    assert 3 <= commit_count <= 5
    assert acked == 5000
    assert query(journal, "SELECT COUNT(*), MIN(seq), MAX(seq) FROM events") == [(5000, 1, 5000)]
    assert commits[0].first_seq == 1
    assert commits[-1].last_seq == 5000
    assert all(a.last_seq + 1 == b.first_seq for a, b in itertools.pairwise(commits))
    assert sum(len(c.bodies) for c in commits) == 5000
    assert sum(c.kinds["device.status"] for c in commits) == 5000
    assert sample(metrics, "storegw_events_committed_total", kind="device.status") == 5000


async def test_commit_max_events_one_commits_each_alone(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(
        tmp_path, metrics=metrics, config=JournalConfig(commit_max_events=1, commit_max_delay_ms=0)
    )
    async with running(journal):
        for i in range(20):
            journal.submit(status(i))
    assert sample(metrics, "storegw_journal_commit_seconds_count") == 20


async def test_listener_sees_what_one_commit_wrote(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    commits: list[Committed] = []
    journal.add_listener(commits.append)
    async with running(journal):
        journal.submit(status(1, key="a"))
        journal.submit(status(2, key="a"))
        journal.submit(pos_draft("R1", [("TEA", "1")]))
        journal.submit(Rejected(DRIVER, "invalid", "d", 1, b"x"))
    assert len(commits) == 1
    commit = commits[0]
    assert (commit.first_seq, commit.last_seq) == (1, 2)
    assert commit.kinds == {"device.status": 1, "pos.sale": 1}
    assert [orjson.loads(b)["seq"] for b in commit.bodies] == [1, 2]
    assert commit.bodies == [r[0] for r in query(journal, "SELECT body FROM events ORDER BY seq")]
    assert commit.duplicates == 1
    assert [r.detail for r in commit.rejected] == ["d"]


# --- failed commits -------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [sqlite3.OperationalError, sqlite3.IntegrityError])
async def test_processor_error_rolls_back_the_batch_then_commits_it_once(
    tmp_path: Path, error: type[Exception]
) -> None:
    """A SQLite error in a processor fails the commit: at the failure nothing of the batch is visible and
    nothing is acked; then (a retry after a second) everything is committed once."""
    failing = FailingProcessor(error, failures=1)
    journal = new_journal(tmp_path, processors=[failing])
    failing.path = journal.path
    probe = AckProbe(journal)
    failing.probe = probe
    commits: list[Committed] = []
    journal.add_listener(commits.append)
    async with running(journal):
        for i in range(5):
            journal.submit(status(i, key=f"k{i}", ack=probe.event(f"k{i}")))
        journal.submit(Rejected(DRIVER, "invalid", "r", 1, b"x", ack=probe.reject("r")))
        await until(lambda: bool(failing.seen_at_rollback), "the processor failed once")
        await flushed(journal)
        assert journal.submit(status(5, key="k5", ack=probe.event("k5")))
    assert failing.seen_at_rollback == [(0, 0)]
    expected = [(i + 1, f"k{i}") for i in range(6)]
    assert query(journal, "SELECT seq, dedup_key FROM events ORDER BY seq") == expected
    assert query(journal, "SELECT detail FROM quarantine") == [("r",)]
    assert probe.calls == [f"k{i}" for i in range(5)] + ["r", "k5"]
    assert all(probe.committed_when_acked.values())
    bodies = [b for c in commits for b in c.bodies]
    assert [orjson.loads(b)["seq"] for b in bodies] == list(range(1, 7))
    assert all(c.first_seq <= c.last_seq for c in commits)


async def test_sqlite_error_in_processor_is_retried_until_it_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailingProcessor(sqlite3.OperationalError, failures=1)
    journal = new_journal(tmp_path, processors=[failing])
    failing.path = journal.path
    probe = AckProbe(journal)
    failing.probe = probe
    caplog.set_level(logging.WARNING, logger="gateway.kernel.journal")
    async with running(journal):
        for i in range(5):
            journal.submit(status(i, key=f"k{i}", ack=probe.event(f"k{i}")))
        journal.submit(Rejected(DRIVER, "invalid", "r", 1, b"x", ack=probe.reject("r")))
        await until(lambda: bool(failing.seen_at_rollback), "the processor failed once")
        await flushed(journal)
    assert failing.seen_at_rollback == [(0, 0)]
    assert query(journal, "SELECT seq, dedup_key FROM events ORDER BY seq") == [
        (i + 1, f"k{i}") for i in range(5)
    ]
    assert query(journal, "SELECT COUNT(*) FROM quarantine") == [(1,)]
    assert probe.calls == [f"k{i}" for i in range(5)] + ["r"]
    assert all(probe.committed_when_acked.values())
    messages = [r.getMessage() for r in caplog.records]
    assert any("journal commit failed, retrying every second" in m for m in messages)
    assert any("journal commits work again" in m for m in messages)


async def test_failed_commit_does_not_move_stock_twice(tmp_path: Path) -> None:
    metrics = Metrics()
    failing = FailingProcessor(sqlite3.OperationalError, failures=1, in_flush=True)
    failing.path = tmp_path / "journal.db"
    journal = new_journal(
        tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(10, None)), failing]
    )
    async with running(journal):
        journal.submit(pos_draft("R1", [("TEA", "3")]))
        await flushed(journal)
    assert failing.seen_at_rollback == [(0, 0)]
    assert query(journal, "SELECT on_hand FROM stock WHERE sku='TEA'") == [(7.0,)]
    level = orjson.loads(query(journal, "SELECT body FROM events WHERE kind='stock.level'")[0][0])["data"]
    assert (level["on_hand"], level["delta"]) == ("7", "-3")


async def test_a_processor_failing_on_an_event_is_isolated_and_the_event_still_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A processor that fails on one event (a bug, an event it cannot handle) never holds back or quarantines
    it: the event commits, the processor skips it, and the failure is counted and reported to HQ."""
    metrics = Metrics()
    poison = PoisonProcessor()
    journal = new_journal(tmp_path, metrics=metrics, processors=[poison])
    probe = AckProbe(journal)
    async with running(journal):
        journal.submit(status(0, key="k0", ack=probe.event("k0")))
        poisoned = b'{"status":"error","reason":"poison"}'
        journal.submit(Draft("device.status", "pos1", poisoned, dedup_key="k1", ack=probe.event("k1")))
        journal.submit(status(2, key="k2", ack=probe.event("k2")))
        await flushed(journal)
        journal.submit(status(3, key="k3", ack=probe.event("k3")))
    rows = query(journal, "SELECT seq, kind, dedup_key FROM events ORDER BY seq")
    assert [r for r in rows if r[1] == "device.status"] == [
        (1, "device.status", "k0"),
        (2, "device.status", "k1"),
        (3, "device.status", "k2"),
        (5, "device.status", "k3"),
    ]
    [(alert,)] = query(journal, "SELECT body FROM events WHERE kind='alert.raised'")
    data = orjson.loads(alert)["data"]
    assert (data["rule"], data["subject"], data["details"]["seqs"]) == (
        "gateway.processor_failed",
        "poison",
        [2],
    )
    assert query(journal, "SELECT COUNT(*) FROM quarantine") == [(0,)]
    assert probe.calls == ["k0", "k1", "k2", "k3"]
    assert all(probe.committed_when_acked.values())
    assert sample(metrics, "storegw_processor_errors_total", processor="poison") == 1
    assert any("processor poison failed on events 2" in r.getMessage() for r in caplog.records)


async def test_duplicate_metric_counts_once_when_the_commit_is_retried(tmp_path: Path) -> None:
    metrics = Metrics()
    failing = FailingProcessor(sqlite3.OperationalError, failures=0)
    failing.path = tmp_path / "journal.db"
    journal = new_journal(tmp_path, metrics=metrics, processors=[failing])
    async with running(journal):
        journal.submit(status(1, key="k1"))
        await flushed(journal)
        failing.failures = 1
        journal.submit(status(1, key="k1"))
        journal.submit(status(2, key="k2"))
        await flushed(journal)
    assert len(failing.seen_at_rollback) == 1
    assert query(journal, "SELECT COUNT(*) FROM events") == [(2,)]
    assert sample(metrics, "storegw_messages_duplicate_total", driver=DRIVER) == 1


async def test_sqlite_error_during_one_at_a_time_commits_duplicates_nothing(tmp_path: Path) -> None:
    journal = new_journal(
        tmp_path, processors=[ScriptedProcessor([RuntimeError, None, sqlite3.OperationalError])]
    )
    async with running(journal):
        for i in range(3):
            journal.submit(status(i))
    reasons = [
        orjson.loads(b)["data"]["reason"] for (b,) in query(journal, "SELECT body FROM events ORDER BY seq")
    ]
    assert reasons == ["reading 0", "reading 1", "reading 2"]


# --- lifecycle ------------------------------------------------------------------------------------


async def test_stopping_commits_what_is_queued_then_refuses_more(tmp_path: Path) -> None:
    journal = new_journal(tmp_path, config=JournalConfig(commit_max_events=10, commit_max_delay_ms=50))
    probe = AckProbe(journal)
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    await asyncio.sleep(0)
    try:
        for i in range(35):
            assert journal.submit(status(i, key=f"k{i}", ack=probe.event(f"k{i}")))
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        assert journal.pending == 0
        assert not journal.submit(status(99, key="late"))
        assert journal.pending == 0
    finally:
        await journal.close()
    assert query(journal, "SELECT COUNT(*), MAX(seq) FROM events") == [(35, 35)]
    assert probe.calls == [f"k{i}" for i in range(35)]
    assert all(probe.committed_when_acked.values())


async def test_submit_refuses_past_the_queue_limit(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    draft = status(1)
    for _ in range(QUEUE_LIMIT):
        assert journal.submit(draft)
    assert not journal.submit(draft)
    assert journal.pending == QUEUE_LIMIT
    await journal.close()


async def test_flush_with_nothing_pending_returns(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        await flushed(journal)
        assert journal.last_seq == 0


async def test_open_moves_a_file_that_is_not_a_database_aside(tmp_path: Path) -> None:
    (tmp_path / "journal.db").write_bytes(b"this is not sqlite" * 100)
    journal = new_journal(tmp_path)
    async with running(journal):
        assert journal.replaced is not None
        assert journal.replaced["rule"] == "journal.corrupt"
        journal.submit(status(1))
    assert any(name.startswith("journal.db.corrupt-") for name in os.listdir(tmp_path))
    assert journal.last_seq == 1  # nothing was ever reserved: a fresh journal starts at 1


async def test_open_refuses_a_journal_it_cannot_read_for_other_reasons(tmp_path: Path) -> None:
    (tmp_path / "journal.db").mkdir()  # not damage (a directory): never moved aside
    journal = new_journal(tmp_path)
    with pytest.raises(JournalError, match=r"cannot open journal .*journal\.db"):
        await journal.open()
    await journal.close()
    assert (tmp_path / "journal.db").is_dir()


async def test_open_creates_the_data_directory(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "a" / "b")
    async with running(journal):
        journal.submit(status(1))
    assert (tmp_path / "a" / "b" / "journal.db").is_file()
    assert query(journal, "PRAGMA journal_mode") == [("wal",)]


async def test_query_reads_committed_rows(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        journal.submit(pos_draft("R1", [("TEA", "1.5")]))
        await flushed(journal)
        rows = await journal.query("SELECT kind, device_id, dedup_key FROM events")
        assert rows == [("pos.sale", "pos1", '["pos1","pos.sale","REG1","R1"]')]
        body = (await journal.query("SELECT body FROM events"))[0][0]
        assert Decimal(orjson.loads(body)["data"]["lines"][0]["quantity"]) == Decimal("1.5")


async def test_cancel_during_a_commit_still_acks_what_was_committed(tmp_path: Path) -> None:
    blocker = BlockingProcessor()
    journal = new_journal(tmp_path, processors=[blocker])
    probe = AckProbe(journal)
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    try:
        journal.submit(status(1, key="k1", ack=probe.event("k1")))
        await until(blocker.entered.is_set, "the commit is in flight")
        writer.cancel()
        blocker.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    finally:
        blocker.release.set()
        await journal.close()
    assert query(journal, "SELECT dedup_key FROM events") == [("k1",)]
    assert probe.calls == ["k1"]


async def test_last_seq_survives_when_the_newest_events_were_removed(tmp_path: Path) -> None:
    """The last seq is not written per commit: after the newest events were pruned (delivered) or evicted, the
    delivered watermark that moved past them keeps seqs from being reused."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for i in range(10):
            journal.submit(status(i))
        await flushed(journal)
        journal.note_delivered(STATE, 10)
        await flushed(journal)
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        conn.execute("DELETE FROM events")  # as a prune of delivered events would
        conn.commit()
    journal = new_journal(tmp_path)
    async with running(journal):
        assert journal.last_seq == 10
        journal.submit(status(11))
    assert query(journal, "SELECT seq FROM events") == [(11,)]


async def test_an_item_the_journal_cannot_store_is_quarantined_and_the_rest_committed(tmp_path: Path) -> None:
    """A draft that cannot be stored (a driver bug: here, a time that is not text) is set aside with the error;
    the rest of its batch commits. (A processor's failure never gets here: the pipeline isolates it.)"""
    journal = new_journal(tmp_path)
    probe = AckProbe(journal)
    async with running(journal):
        journal.submit(status(0, key="k0", ack=probe.event("k0")))
        broken = Draft("device.status", "pos1", b'{"status":"online"}', occurred_at=object())  # type: ignore[arg-type]
        broken.ack = probe.quarantined("processing_error")
        journal.submit(broken)
        journal.submit(status(2, key="k2", ack=probe.event("k2")))
        await flushed(journal)
    assert query(journal, "SELECT seq, dedup_key FROM events ORDER BY seq") == [(1, "k0"), (2, "k2")]
    [(reason, detail)] = query(journal, "SELECT reason, detail FROM quarantine")
    assert reason == "processing_error"
    assert "TypeError" in detail
    assert probe.calls == ["k0", "processing_error", "k2"]


class Watcher(Processor):
    """Records what it sees and whether it was reloaded or rolled back."""

    name = "watcher"

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.reloads = 0
        self.rollbacks = 0

    def apply(self, event: Event) -> None:
        self.kinds.append(event.kind)

    def reload(self, conn: sqlite3.Connection) -> None:
        self.reloads += 1

    def rollback(self, conn: sqlite3.Connection) -> None:
        self.rollbacks += 1


async def test_what_transact_commits_goes_through_the_pipeline_and_the_processors_reload(
    tmp_path: Path,
) -> None:
    watcher = Watcher()
    journal = new_journal(tmp_path, processors=[watcher])
    async with running(journal):

        def work(conn: sqlite3.Connection) -> tuple[str, list[Draft]]:
            conn.execute("CREATE TABLE IF NOT EXISTS notes(n TEXT)")
            return "done", [status(7)]

        assert await journal.transact(work) == "done"
        assert (watcher.kinds, watcher.reloads, watcher.rollbacks) == (["device.status"], 1, 0)

        def failing(conn: sqlite3.Connection) -> tuple[str, list[Draft]]:
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(sqlite3.OperationalError):
            await journal.transact(failing)
        assert (watcher.reloads, watcher.rollbacks) == (1, 1)


async def test_events_after_keeps_its_place_past_rows_it_cannot_read(tmp_path: Path) -> None:
    """A consumer's page that skips a row (stored by an older release under other rules) still ends at the
    last row read: the rows after it are read next, not passed over."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for i in range(4):
            journal.submit(status(i))
        await flushed(journal)
        with contextlib.closing(sqlite3.connect(journal.path)) as conn, conn:
            conn.execute("UPDATE events SET body = ? WHERE seq = 2", ('{"data": {"status": 5}}',))
        events, through = await journal.events_after(0, None, 2)
        assert ([e.seq for e in events], through) == ([1], 2)
        events, through = await journal.events_after(through, None, 2)
        assert [e.seq for e in events] == [3, 4]
