"""The outbox in the journal (docs/OUTBOX.md), on real SQLite files: kind-to-class mapping, per-class counters
checked against COUNT/SUM queries, delivered watermarks, class budget, overall disk budget, TTL, low disk,
quarantine trim, and the migration of a journal from before the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.kernel.clock import ClockState
from gateway.kernel.config import ClassBudget, JournalConfig, OutboxConfig
from gateway.kernel.journal import Committed, Draft, Journal, Rejected
from gateway.kernel.journal.store import state_as_stored
from gateway.kernel.metrics import Metrics
from gateway.kernel.outbox import (
    CRITICAL,
    DEFAULT_KIND_CLASSES,
    MAX_RANGES_PER_REPORT,
    STATE,
    TELEMETRY,
    TRANSACTION,
    ClassState,
    KindClasses,
    eviction_reports,
)
from tests.gateway.test_journal import flushed, query, running, sample, until

STORE_ID = "hk-0042"
GATEWAY_ID = "gw-1"
CLASS_NAMES = ("critical", "transaction", "state", "telemetry")


# --- helpers --------------------------------------------------------------------------------------


def outbox_journal(
    tmp_path: Path,
    outbox: OutboxConfig | None = None,
    metrics: Metrics | None = None,
    config: JournalConfig | None = None,
) -> Journal:
    """A journal without processors; low-disk refusal off unless the test asks for it."""
    return Journal(
        tmp_path / "journal.db",
        STORE_ID,
        GATEWAY_ID,
        config or JournalConfig(),
        metrics or Metrics(),
        (),
        ClockState(override=True),
        outbox or OutboxConfig(min_free_bytes=0),
    )


def draft(kind: str, i: int, pad: int = 0) -> Draft:
    return Draft(kind, f"dev{i % 3}", orjson.dumps({"i": i, "pad": "x" * pad}))


def reading(i: int, pad: int = 200) -> Draft:
    return draft("sensor.reading", i, pad)


def sale(i: int, pad: int = 100) -> Draft:
    return draft("pos.sale", i, pad)


def status(i: int, pad: int = 100) -> Draft:
    return draft("device.status", i, pad)


def reports(journal: Journal) -> list[tuple[int, dict[str, Any]]]:
    """The ``outbox.evicted`` events on disk: (seq, data), in seq order."""
    rows = query(journal, "SELECT seq, body FROM events WHERE kind='outbox.evicted' ORDER BY seq")
    return [(seq, orjson.loads(body)["data"]) for seq, body in rows]


def run_seqs(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [s for a, b in ranges for s in range(a, b + 1)]


def seqs_of(journal: Journal, cls: int | None = None) -> list[int]:
    if cls is None:
        return [r[0] for r in query(journal, "SELECT seq FROM events ORDER BY seq")]
    return [r[0] for r in query(journal, "SELECT seq FROM events WHERE cls=? ORDER BY seq", (cls,))]


def check_counters(journal: Journal) -> dict[int, ClassState]:
    """The counters on disk (``outbox_state`` with the events stored since it was written, as the next open reads
    them) and in memory match what COUNT/SUM queries find in the events table."""
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        on_disk = state_as_stored(conn)
    assert sorted(on_disk) == [CRITICAL, TRANSACTION, STATE, TELEMETRY]
    for cls, state in on_disk.items():
        stored, nbytes = query(
            journal, "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events WHERE cls=?", (cls,)
        )[0]
        pending = query(
            journal, "SELECT COUNT(*) FROM events WHERE cls=? AND seq>?", (cls, state.delivered_seq)
        )[0][0]
        assert (state.stored_events, state.stored_bytes, state.pending_events) == (stored, nbytes, pending), (
            CLASS_NAMES[cls]
        )
        # The writer thread takes its in-memory counters a moment after the COMMIT this connection sees (a step
        # of housekeeping may be committing right now): give it that moment.
        for _ in range(500):
            if journal.state[cls] == state:
                break
            time.sleep(0.01)
        assert journal.state[cls] == state, CLASS_NAMES[cls]
    return on_disk


def used_bytes(journal: Journal) -> int:
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


class Lengths:
    """Envelope length of every committed seq, from the commit listener (bodies are in seq order)."""

    def __init__(self, journal: Journal) -> None:
        self.by_seq: dict[int, int] = {}
        journal.add_listener(self._on_commit)

    def _on_commit(self, committed: Committed) -> None:
        for n, body in enumerate(committed.bodies):
            self.by_seq[committed.first_seq + n] = len(body)


# --- classes --------------------------------------------------------------------------------------


def test_kind_classes_defaults_overrides_and_unknown_kinds() -> None:
    default = KindClasses()
    assert {kind: default(kind) for kind in DEFAULT_KIND_CLASSES} == dict(DEFAULT_KIND_CLASSES)
    assert default("alert.raised") == default("outbox.evicted") == CRITICAL
    assert default("pos.sale") == default("stock.adjusted") == default("clock.synced") == TRANSACTION
    assert default("document.updated") == STATE
    assert default("sensor.reading") == TELEMETRY
    assert default("something.new") == TELEMETRY

    moved = KindClasses(
        {"device.status": "critical", "sensor.reading": "state", "custom.kind": "transaction"}
    )
    assert moved("device.status") == CRITICAL
    assert moved("sensor.reading") == STATE
    assert moved("custom.kind") == TRANSACTION
    assert moved("pos.sale") == TRANSACTION


async def test_events_store_their_class_with_config_overrides(tmp_path: Path) -> None:
    outbox = OutboxConfig(min_free_bytes=0, kinds={"device.status": "critical", "custom.kind": "state"})
    journal = outbox_journal(tmp_path, outbox)
    async with running(journal):
        for kind in ("alert.raised", "pos.sale", "device.status", "gateway.status", "sensor.reading"):
            journal.submit(draft(kind, 1))
        journal.submit(draft("custom.kind", 1))
        journal.submit(draft("never.heard.of", 1))
        await flushed(journal)
        assert query(journal, "SELECT kind, cls FROM events ORDER BY seq") == [
            ("alert.raised", CRITICAL),
            ("pos.sale", TRANSACTION),
            ("device.status", CRITICAL),
            ("gateway.status", STATE),
            ("sensor.reading", TELEMETRY),
            ("custom.kind", STATE),
            ("never.heard.of", TELEMETRY),
        ]
        assert journal.class_last_seq == {CRITICAL: 3, TRANSACTION: 2, STATE: 6, TELEMETRY: 7}
        check_counters(journal)


def test_eviction_reports_split_long_range_lists_and_keep_the_bytes() -> None:
    seqs = list(range(1, 2 * (MAX_RANGES_PER_REPORT + 10), 2))  # every other seq: one run each
    sizes = [(seq, 100 + seq % 7) for seq in seqs]
    parts: list[dict[str, Any]] = eviction_reports(TELEMETRY, "disk_budget", sizes)
    assert len(parts) == 2
    assert [run_seqs(p["ranges"]) for p in parts] == [
        seqs[:MAX_RANGES_PER_REPORT],
        seqs[MAX_RANGES_PER_REPORT:],
    ]
    assert sum(p["count"] for p in parts) == len(seqs)
    assert [p["bytes"] for p in parts] == [
        sum(size for _, size in sizes[:MAX_RANGES_PER_REPORT]),
        sum(size for _, size in sizes[MAX_RANGES_PER_REPORT:]),
    ]
    refused = eviction_reports(TELEMETRY, "disk_low", [], refused=7, refused_bytes=500)
    assert refused == [{"class": "telemetry", "reason": "disk_low", "count": 7, "bytes": 500, "ranges": []}]


# --- counters and watermarks ----------------------------------------------------------------------


async def test_counters_are_exact_after_commits_acks_and_restart(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path)
    async with running(journal):
        for i in range(30):
            journal.submit((reading, sale, status)[i % 3](i))
        journal.submit(draft("alert.raised", 99))
        await flushed(journal)
        state = check_counters(journal)
        assert [state[c].stored_events for c in (CRITICAL, TRANSACTION, STATE, TELEMETRY)] == [1, 10, 10, 10]
        assert all(s.pending_events == s.stored_events and s.delivered_seq == 0 for s in state.values())
        assert journal.backlog == 31
        assert not journal.caught_up

        sales = seqs_of(journal, TRANSACTION)
        journal.note_delivered(TRANSACTION, sales[3])
        journal.note_delivered(TELEMETRY, seqs_of(journal, TELEMETRY)[-1])
        await flushed(journal)
        state = check_counters(journal)
        assert state[TRANSACTION].delivered_seq == sales[3]
        assert state[TRANSACTION].pending_events == 6
        assert state[TELEMETRY].pending_events == 0
        assert journal.backlog == 1 + 6 + 10
        # The global watermark: below the first undelivered seq of any class.
        assert journal.delivered_seq == 0
        journal.note_delivered(CRITICAL, 31)
        journal.note_delivered(STATE, seqs_of(journal, STATE)[-1])
        await flushed(journal)
        assert journal.delivered_seq == sales[3]
        check_counters(journal)

    journal = outbox_journal(tmp_path)
    async with running(journal):
        state = check_counters(journal)
        assert state[TRANSACTION].delivered_seq == sales[3]
        assert journal.delivered == {c: s.delivered_seq for c, s in state.items()}
        assert journal.backlog == 6
        assert journal.delivered_seq == sales[3]
        assert journal.class_last_seq[TRANSACTION] == sales[-1]
        journal.submit(sale(100))
        await flushed(journal)
        assert check_counters(journal)[TRANSACTION].pending_events == 7


async def test_acks_are_persisted_by_the_next_commit_and_flush_waits_for_them(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = outbox_journal(tmp_path, metrics=metrics)
    persisted: list[bool] = []
    journal.add_persist_listener(lambda: persisted.append(journal.acks_persisted))
    async with running(journal):
        for i in range(5):
            journal.submit(sale(i))
        await flushed(journal)
        assert journal.acks_persisted
        assert persisted == []

        journal.note_delivered(TRANSACTION, 3)
        assert journal.delivered[TRANSACTION] == 3
        assert not journal.acks_persisted
        assert query(journal, "SELECT delivered_seq FROM outbox_state WHERE cls=?", (TRANSACTION,)) == [(0,)]
        await flushed(journal)  # returns only once the watermark is on disk
        assert query(journal, "SELECT delivered_seq FROM outbox_state WHERE cls=?", (TRANSACTION,)) == [(3,)]
        assert journal.acks_persisted
        assert persisted == [True]
        # A commit of acknowledgements alone (no event) still refreshes the outbox gauges.
        assert sample(metrics, "storegw_outbox_pending", **{"class": "transaction"}) == 2

        journal.note_delivered(TRANSACTION, 2)  # behind the watermark: nothing to write
        assert journal.acks_persisted
        journal.note_delivered(TRANSACTION, 4)
        journal.note_delivered(TRANSACTION, 5)  # two acks, one commit
        await flushed(journal)
        assert persisted == [True, True]
        assert check_counters(journal)[TRANSACTION] == ClassState(5, 5, journal.state[1].stored_bytes, 0, 0)
        assert journal.caught_up

    metrics = Metrics()
    journal = outbox_journal(tmp_path, metrics=metrics)
    async with running(journal):  # the gauges are right from the start, before any commit
        nbytes = journal.state[TRANSACTION].stored_bytes
        assert nbytes > 0
        assert sample(metrics, "storegw_outbox_bytes", **{"class": "transaction"}) == nbytes


async def test_migrating_a_journal_from_before_the_outbox_keeps_its_delivered_state(tmp_path: Path) -> None:
    """A pre-outbox journal: no cls column, no outbox_state, one global watermark in meta."""
    path = tmp_path / "journal.db"
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    kinds = ["pos.sale", "sensor.reading", "device.status", "alert.raised", "pos.return"]
    kinds += ["stock.level", "custom.kind", "sensor.reading", "pos.sale", "gateway.status"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            """
            CREATE TABLE events(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
                device_id TEXT, recorded_at TEXT NOT NULL, dedup_key TEXT UNIQUE, body BLOB NOT NULL);
            CREATE INDEX events_kind ON events(kind, seq);
            CREATE TABLE quarantine(qid INTEGER PRIMARY KEY, received_at TEXT NOT NULL, driver TEXT NOT NULL,
                device_id TEXT, topic TEXT, reason TEXT NOT NULL, detail TEXT, size INTEGER NOT NULL,
                payload BLOB);
            CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """
        )
        for seq, kind in enumerate(kinds, 1):
            body = orjson.dumps({"seq": seq, "kind": kind, "pad": "y" * seq})
            conn.execute(
                "INSERT INTO events VALUES (?,?,?,?,?,?,?)",
                (seq, f"id-{seq}", kind, None, now, None, body),
            )
        conn.executemany("INSERT INTO meta VALUES (?,?)", [("last_seq", "10"), ("delivered_seq", "6")])
        conn.commit()

    outbox = OutboxConfig(min_free_bytes=0, kinds={"custom.kind": "state"})
    journal = outbox_journal(tmp_path, outbox)
    async with running(journal):
        expected = [KindClasses({"custom.kind": "state"})(kind) for kind in kinds]
        assert [r[0] for r in query(journal, "SELECT cls FROM events ORDER BY seq")] == expected
        assert expected[6] == STATE  # the override applies to migrated events too
        state = check_counters(journal)
        assert {s.delivered_seq for s in state.values()} == {6}
        assert journal.delivered_seq == 6
        assert journal.last_seq == 10
        assert journal.backlog == 4  # seqs 7..10
        assert query(journal, "SELECT name FROM sqlite_master WHERE name='events_cls'") == [("events_cls",)]
        journal.submit(sale(11))
        await flushed(journal)
        assert journal.last_seq == 11

    journal = outbox_journal(tmp_path, outbox)
    async with running(journal):
        assert check_counters(journal)[TRANSACTION].pending_events == 2  # seqs 9 and 11
        assert journal.delivered_seq == 6
        assert journal.backlog == 5


# --- class budget ---------------------------------------------------------------------------------


async def test_class_budget_evicts_delivered_first_then_the_oldest_undelivered(tmp_path: Path) -> None:
    budget = 64 * 1024
    metrics = Metrics()
    outbox = OutboxConfig(min_free_bytes=0, classes={"state": ClassBudget(max_bytes=budget)})
    journal = outbox_journal(tmp_path, outbox, metrics)
    lengths = Lengths(journal)
    async with running(journal):
        for i in range(100):
            journal.submit(status(i))
        journal.submit(sale(0))
        await flushed(journal)
        journal.note_delivered(STATE, 100)
        await flushed(journal)
        assert journal.state[STATE].stored_bytes < budget

        for i in range(100, 400):  # one commit: the class goes over its cap at once
            journal.submit(status(i))
        journal.submit(reading(0))
        await flushed(journal)
        await until(lambda: len(reports(journal)) == 1, "the class_budget report")
        await until(lambda: journal.state[STATE].stored_bytes <= budget, "the state class back under its cap")

        state_seqs = [s for s in range(1, 403) if s != 101 and s != 402]  # 101 is the sale, 402 the reading
        total = sum(lengths.by_seq[s] for s in state_seqs)
        excess = total - int(budget * 0.95)
        delivered_bytes = sum(lengths.by_seq[s] for s in range(1, 101))
        assert delivered_bytes < excess  # every delivered event goes, then undelivered ones
        freed, last = delivered_bytes, 101
        while freed < excess:
            last += 1
            freed += lengths.by_seq[last]
        evicted = list(range(102, last + 1))

        [(_, report)] = reports(journal)
        assert report == {
            "class": "state",
            "reason": "class_budget",
            "count": len(evicted),
            "bytes": sum(lengths.by_seq[s] for s in evicted),
            "ranges": [[102, last]],
        }
        assert seqs_of(journal, STATE) == list(range(last + 1, 402))
        assert seqs_of(journal, TRANSACTION) == [101]
        assert seqs_of(journal, TELEMETRY) == [402]
        state = check_counters(journal)
        assert state[STATE].delivered_seq == last  # nobody waits for what was evicted
        assert state[STATE].evicted_events == len(evicted)
        assert state[CRITICAL].pending_events == 1  # the report itself, on its way to HQ
        assert sample(metrics, "storegw_outbox_pruned_total", **{"class": "state"}) == 100
        assert sample(
            metrics, "storegw_outbox_evicted_total", **{"class": "state", "reason": "class_budget"}
        ) == len(evicted)
        await until(  # set on the event loop right after the COMMIT
            lambda: sample(metrics, "storegw_outbox_pending", **{"class": "state"}) == 400 - last + 1,
            "the pending gauge",
        )


# --- overall disk budget --------------------------------------------------------------------------


@pytest.mark.parametrize("states_per_round", [25, 70])
async def test_disk_budget_while_hq_is_down_evicts_telemetry_then_state_and_keeps_transactions(
    tmp_path: Path, states_per_round: int
) -> None:
    """25 state events per round: transactions and state fit, only the oldest telemetry goes. 70: they do not,
    all telemetry goes, then the oldest state; transactions and alerts always stay."""
    cap = 2 * 1024 * 1024
    metrics = Metrics()
    outbox = OutboxConfig(max_bytes=cap, min_free_bytes=0)
    journal = outbox_journal(tmp_path, outbox, metrics, JournalConfig(commit_max_events=200))
    kinds: dict[int, int] = {}
    commit_of: dict[int, int] = {}
    """Seq -> first seq of the transaction that committed it."""

    def on_commit(committed: Committed) -> None:
        for n, body in enumerate(committed.bodies):
            kinds[committed.first_seq + n] = KindClasses()(orjson.loads(body)["kind"])
            commit_of[committed.first_seq + n] = committed.first_seq

    journal.add_listener(on_commit)
    async with running(journal):
        # A day of a store with HQ down: telemetry dominates; sales and status changes trickle in.
        for round_ in range(40):
            for i in range(200):
                journal.submit(reading(round_ * 200 + i, pad=300))
            for i in range(states_per_round):
                journal.submit(status(round_ * states_per_round + i, pad=300))
            for i in range(15):
                journal.submit(sale(round_ * 15 + i, pad=300))
            if round_ == 20:
                journal.submit(draft("alert.raised", round_))
            await flushed(journal)
        await until(lambda: used_bytes(journal) <= cap, "the journal back under its disk budget")
        await flushed(journal)
    # The writer has stopped: one consistent snapshot of what is left and what was reported.

    present = set(seqs_of(journal))
    missing = set(range(1, journal.last_seq + 1)) - present
    all_reports = reports(journal)
    explained = [s for _, r in all_reports for s in run_seqs(r["ranges"])]
    assert len(explained) == len(set(explained)), "a seq reported evicted twice"
    assert set(explained) == missing  # every missing seq is explained, and nothing else
    assert {r["reason"] for _, r in all_reports} == {"disk_budget"}
    evicted_classes = {r["class"] for _, r in all_reports}
    kept = {cls: [s for s in sorted(present) if kinds.get(s) == cls] for cls in range(4)}
    lost = {cls: [s for s in sorted(missing) if kinds[s] == cls] for cls in range(4)}
    if states_per_round == 25:
        assert evicted_classes == {"telemetry"}
        # Eviction frees about the excess, not every telemetry event: the newest readings stay and the journal
        # ends near its cap. (How many readings that is depends on their size, and so on the digits of the
        # monotonic clock in each envelope: 177 to 419 here. Bound it by bytes, not by a count.)
        assert max(kept[TELEMETRY]) == max(s for s, c in kinds.items() if c == TELEMETRY)
        assert used_bytes(journal) > cap * 0.8, "eviction freed far more than the excess"
    else:
        assert evicted_classes == {"telemetry", "state"}
    # Transactions and alerts all survive while anything else is left.
    assert lost[TRANSACTION] == lost[CRITICAL] == []
    assert len(kept[TRANSACTION]) == 600
    assert len(kept[CRITICAL]) == 1 + len(all_reports)
    # Telemetry goes first: when a state event is evicted, every telemetry event on disk then is gone already
    # (intake committed in the same transaction as an eviction step is inserted after it, below its report).
    for seq, report in all_reports:
        if report["class"] == "state":
            gone_before = {s for r_seq, r in all_reports if r_seq <= seq for s in run_seqs(r["ranges"])}
            older = {s for s, c in kinds.items() if c == TELEMETRY and s < commit_of[seq]}
            assert older <= gone_before
    # Oldest first within a class.
    for cls in (TELEMETRY, STATE):
        if kept[cls] and lost[cls]:
            assert lost[cls][-1] < kept[cls][0]
    state = check_counters(journal)
    for cls, name in ((TELEMETRY, "telemetry"), (STATE, "state")):
        count = sum(r["count"] for _, r in all_reports if r["class"] == name)
        assert state[cls].evicted_events == len(lost[cls]) == count
        assert (
            sample(metrics, "storegw_outbox_evicted_total", **{"class": name, "reason": "disk_budget"})
            == count
        )


# --- TTL ------------------------------------------------------------------------------------------


async def _age(journal: Journal, seqs: Sequence[int], recorded_at: str = "2020-01-01T00:00:00.000Z") -> None:
    """Make events look recorded long ago (the journal is closed while we do it)."""
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        conn.executemany("UPDATE events SET recorded_at=? WHERE seq=?", [(recorded_at, s) for s in seqs])
        conn.commit()


async def test_ttl_removes_old_events_reports_undelivered_and_prunes_delivered(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path)
    async with running(journal):
        for i in range(20):
            journal.submit(reading(i))
        for i in range(5):
            journal.submit(sale(i))
        await flushed(journal)
        journal.note_delivered(TELEMETRY, 10)
        await flushed(journal)
    await _age(journal, [*range(1, 16), 21])  # telemetry 1..15 (1..10 delivered), sale 21

    metrics = Metrics()
    outbox = OutboxConfig(min_free_bytes=0, housekeeping_interval_s=0.1)
    journal = outbox_journal(tmp_path, outbox, metrics)
    async with running(journal):
        await until(lambda: len(reports(journal)) == 2, "TTL reports for telemetry and the transaction")
        await flushed(journal)
        by_class = {r["class"]: r for _, r in reports(journal)}
        assert by_class["telemetry"]["reason"] == "ttl"
        assert by_class["telemetry"]["ranges"] == [[11, 15]]
        assert by_class["telemetry"]["count"] == 5
        assert by_class["transaction"]["ranges"] == [[21, 21]]
        assert seqs_of(journal, TELEMETRY) == list(range(16, 21))
        assert seqs_of(journal, TRANSACTION) == [22, 23, 24, 25]
        assert sample(metrics, "storegw_outbox_pruned_total", **{"class": "telemetry"}) == 10
        assert sample(metrics, "storegw_outbox_evicted_total", **{"class": "telemetry", "reason": "ttl"}) == 5
        assert (
            sample(metrics, "storegw_outbox_evicted_total", **{"class": "transaction", "reason": "ttl"}) == 1
        )
        state = check_counters(journal)
        assert state[TELEMETRY].delivered_seq == 15
        assert state[TELEMETRY].evicted_events == 5
        assert state[TRANSACTION].delivered_seq == 21
        assert state[TRANSACTION].pending_events == 4


async def test_ttl_only_removes_the_expired_prefix_when_the_clock_went_backwards(tmp_path: Path) -> None:
    """Wall-clock steps make recorded_at non-monotonic in seq: an unexpired event between expired ones stays
    (and so does every later one: eviction only ever removes a prefix of the class)."""
    journal = outbox_journal(tmp_path)
    async with running(journal):
        for i in range(6):
            journal.submit(reading(i))
        await flushed(journal)
    await _age(journal, [1, 2, 4, 5])  # 3 and 6 are recent

    journal = outbox_journal(tmp_path, OutboxConfig(min_free_bytes=0, housekeeping_interval_s=0.1))
    async with running(journal):
        await until(lambda: len(reports(journal)) == 1, "the TTL report")
        await flushed(journal)
        [(_, report)] = reports(journal)
        assert report["ranges"] == [[1, 2]]
        assert seqs_of(journal, TELEMETRY) == [3, 4, 5, 6]
        assert check_counters(journal)[TELEMETRY].pending_events == 4


# --- low disk -------------------------------------------------------------------------------------


async def test_low_disk_refuses_telemetry_acks_it_and_reports_once(tmp_path: Path) -> None:
    metrics = Metrics()
    outbox = OutboxConfig(min_free_bytes=2**62, housekeeping_interval_s=0.1)
    journal = outbox_journal(tmp_path, outbox, metrics)
    async with running(journal):
        await until(lambda: journal.disk_low, "the journal to notice the disk is low")
        acked: list[str] = []
        refused = [reading(i) for i in range(7)]
        for n, item in enumerate(refused):
            item.ack = lambda n=n: acked.append(f"reading {n}")
            assert journal.submit(item)
        assert acked == [f"reading {n}" for n in range(7)]  # acknowledged at once, never stored
        for i in range(3):
            journal.submit(sale(i))
        await flushed(journal)
        await until(lambda: len(reports(journal)) == 1, "the disk_low report")
        [(_, report)] = reports(journal)
        assert report == {
            "class": "telemetry",
            "reason": "disk_low",
            "count": 7,
            "bytes": sum(len(d.data_json) for d in refused),
            "ranges": [],
        }
        assert seqs_of(journal, TELEMETRY) == []
        assert seqs_of(journal, TRANSACTION) == [1, 2, 3]
        assert sample(metrics, "storegw_outbox_refused_total") == 7
        assert (
            sample(metrics, "storegw_outbox_evicted_total", **{"class": "telemetry", "reason": "disk_low"})
            == 7
        )
        # Later housekeeping rounds (the writer runs them after commits) have nothing more to report.
        rounds = journal._next_housekeeping
        async with asyncio.timeout(20):
            while journal._next_housekeeping < rounds + 0.2:
                journal.submit(sale(99))
                await flushed(journal)
                await asyncio.sleep(0.02)
        assert len(reports(journal)) == 1
        check_counters(journal)


# --- quarantine -----------------------------------------------------------------------------------


async def test_housekeeping_trims_the_quarantine_to_its_cap(tmp_path: Path) -> None:
    outbox = OutboxConfig(min_free_bytes=0, quarantine_max_rows=100, housekeeping_interval_s=0.1)
    journal = outbox_journal(tmp_path, outbox)
    async with running(journal):
        for i in range(130):
            journal.submit(Rejected("store-mqtt", "bad_json", f"reject {i}", 3, b"{{{"))
        await flushed(journal)
        await until(lambda: query(journal, "SELECT COUNT(*) FROM quarantine")[0][0] == 100, "the trim")
        details = [r[0] for r in query(journal, "SELECT detail FROM quarantine ORDER BY qid")]
        assert details == [f"reject {i}" for i in range(30, 130)]


@pytest.mark.parametrize("on_disk", [True, False])
async def test_flush_with_acks_only_waits_for_their_commit(tmp_path: Path, on_disk: bool) -> None:
    """An ack for a class whose events are all evicted or never existed still persists the watermark."""
    journal = outbox_journal(tmp_path)
    async with running(journal):
        if on_disk:
            journal.submit(reading(1))
            await flushed(journal)
        journal.note_delivered(TELEMETRY, 1)
        async with asyncio.timeout(20):
            await journal.flush()
        assert query(journal, "SELECT delivered_seq FROM outbox_state WHERE cls=?", (TELEMETRY,)) == [(1,)]
        check_counters(journal)


async def test_ttl_never_expires_undelivered_events_stamped_by_an_unsynced_clock(tmp_path: Path) -> None:
    """A Pi without a real-time clock may stamp today's sales with last year's date while it waits for NTP:
    undelivered ones must not look expired (delivered ones may go: HQ has them)."""
    journal = Journal(
        tmp_path / "journal.db",
        STORE_ID,
        GATEWAY_ID,
        JournalConfig(),
        Metrics(),
        (),
        ClockState(override=False),  # the kernel says: not synchronised
        OutboxConfig(min_free_bytes=0),
    )
    async with running(journal):
        for i in range(6):
            journal.submit(sale(i))
        await flushed(journal)
        journal.note_delivered(TRANSACTION, 2)
        await flushed(journal)
    await _age(journal, range(1, 7))

    journal = outbox_journal(tmp_path, OutboxConfig(min_free_bytes=0, housekeeping_interval_s=0.1))
    async with running(journal):
        await until(lambda: seqs_of(journal, TRANSACTION) == [3, 4, 5, 6], "the delivered ones pruned")
        # The writer thread takes its in-memory counters a moment after the COMMIT another connection sees.
        await until(lambda: journal.state[TRANSACTION].stored_events == 4, "the counters after the prune")
        await flushed(journal)
        assert reports(journal) == []  # nothing undelivered was evicted
        assert check_counters(journal)[TRANSACTION].pending_events == 4


async def test_fragmented_pages_never_cost_undelivered_sales(tmp_path: Path) -> None:
    """Telemetry and sales interleave in the table's pages; evicting telemetry leaves part-full pages that
    SQLite keeps. Once the events left are well under the cap, no undelivered sale is evicted to chase pages."""
    cap = 2 * 1024 * 1024
    journal = outbox_journal(tmp_path, OutboxConfig(max_bytes=cap, min_free_bytes=0))
    async with running(journal):
        for i in range(3000):
            journal.submit(reading(i, pad=700))
            journal.submit(sale(i, pad=100))  # the sales alone (~1 MB with indexes) fit the 2 MiB cap
            if i % 250 == 249:
                await flushed(journal)
        await flushed(journal)
        await until(
            lambda: journal.stored_bytes * 1.5 <= cap * 0.95 or used_bytes(journal) <= cap, "eviction"
        )
        await flushed(journal)
        lost_sales = [r for _, r in reports(journal) if r["class"] == "transaction"]
        assert lost_sales == []
        assert len(seqs_of(journal, TRANSACTION)) == 3000
