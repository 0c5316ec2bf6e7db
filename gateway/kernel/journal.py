"""The journal: one SQLite database (WAL) and one writer that group-commits.

Drivers hand the journal :class:`Draft` events and :class:`Rejected` messages. The writer takes what has
queued (up to ``commit_max_events``), and in ONE transaction: drops redeliveries already committed (by
``dedup_key``), gives each new event the next ``seq``, stores the envelope bytes, stores rejects in the
quarantine, runs the processors (the stock ledger) which may add derived events, and records the last seq.
Only after COMMIT returns does it call each item's ``ack`` (the MQTT PUBACK): acknowledge-after-commit.

SQLite work runs on one dedicated thread, so the event loop never waits on fsync; reads for the uplink use a
second connection on their own thread (WAL lets readers run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import sqlite3
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import orjson

from gateway.kernel.clock import BOOT_ID, ClockState
from gateway.kernel.config import JournalConfig, OutboxConfig
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.events import SCHEMA_VERSION, uuid7
from gateway.kernel.metrics import Metrics
from gateway.kernel.outbox import (
    CLASSES,
    STATE,
    TELEMETRY,
    TRANSACTION,
    ClassState,
    KindClasses,
    eviction_order,
    eviction_reports,
)
from gateway.kernel.recovery import (
    Salvage,
    SalvagedRow,
    SeqReservation,
    aside_target,
    clear_damage_mark,
    clear_salvage_plan,
    corrupt_alert,
    is_blank,
    is_damage,
    mark_damaged,
    missing_alert,
    move_aside,
    move_orphans_aside,
    probe,
    quick_check,
    ranges_for_alert,
    read_damage_record,
    read_meta,
    read_salvage_plan,
    salvage_delivered,
    salvage_events,
    salvage_idempotency,
    salvage_last_seq,
    salvage_watermarks,
    write_salvage_plan,
)

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

QUARANTINE_KEEP_BYTES: Final = 4096
"""How much of a rejected payload is kept for debugging."""
QUARANTINE_TOPIC_CHARS: Final = 256
"""How much of a rejected message's topic is kept (MQTT allows 64 KiB)."""

CACHE_KIB: Final = 1024
"""SQLite page cache per connection. Appends and tail reads touch few pages; the default 2 MiB is RSS we skip."""

QUEUE_LIMIT: Final = 100_000
"""Items waiting for a commit. QoS 1 intake is bounded far below this by MQTT flow control (receive maximum)."""

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    device_id TEXT,
    recorded_at TEXT NOT NULL,
    dedup_key TEXT UNIQUE,
    body BLOB NOT NULL,
    cls INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, seq);
CREATE TABLE IF NOT EXISTS outbox_state(
    cls INTEGER PRIMARY KEY,
    delivered_seq INTEGER NOT NULL,
    stored_events INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    pending_events INTEGER NOT NULL,
    evicted_events INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine(
    qid INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    driver TEXT NOT NULL,
    device_id TEXT,
    topic TEXT,
    reason TEXT NOT NULL,
    detail TEXT,
    size INTEGER NOT NULL,
    payload BLOB
);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency(
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency(expires_at);
"""
CLASS_INDEX: Final = "CREATE INDEX IF NOT EXISTS events_cls ON events(cls, seq)"

EVICT_CHUNK: Final = 2000
"""Rows deleted per eviction step (one transaction each, so intake never waits long)."""
BUDGET_HEADROOM: Final = 0.95
"""Eviction frees space down to this share of a cap, so it does not run again at the next commit."""
BALLAST_FILE: Final = "journal.reserve"
BALLAST_BYTES: Final = 8 * 1024 * 1024
"""Disk space kept in reserve next to the journal for a full disk (see :class:`Ballast`)."""
PAGE_OVERHEAD: Final = 1.5
"""Pages a journal needs per byte of events (table and indexes), for telling data over the cap from
fragmented pages."""
ACK_ONLY_DELAY_S: Final = 0.05
"""A commit that would only record HQ acknowledgements waits this long for intake to join it (SD wear)."""
DISK_CHECK_S: Final = 1.0
"""How often free disk space is read (statvfs)."""
QUICK_CHECK_S: Final = 600.0
"""How often a background ``PRAGMA quick_check`` looks for damaged pages before a commit trips on them."""
DISK_SHARE: Final = 0.8
"""``outbox.max_bytes`` is lowered to this share of the space the journal can have at start (its pages plus the
free space above ``min_free_bytes``): a cap larger than the disk is no cap, and SQLITE_FULL comes first."""
QUICK_CHECK_FIRST_S: Final = 30.0
"""The first background check runs this soon after start: a damaged page the start-up probe missed (and whose
damage mark could not be written) is found before the process has run long on it."""
URGENT_EVICT_BYTES: Final = 512 * 1024
"""Undelivered telemetry evicted per step to make room for sales on a full disk."""
SALVAGED_FROM: Final = "salvaged_from"
"""``meta`` key: the damaged journal (file name) whose salvage this fresh journal committed."""
HANDLED_DAMAGE: Final = "handled_damage"
"""``meta`` key: ids of the damage records (mark, lock file) this journal's replacement handled."""
PENDING_ALERT: Final = "pending_alert"
"""``meta`` key of the replacement alert until it is committed as an event (a crash in between loses neither)."""
STALL_S: Final = 10.0
"""A journal that has not been able to commit for this long makes /health say so (503)."""
RECOVERED_S: Final = 10.0
"""A stall ends after this long of commits without a failure (not at the first one that succeeds)."""

Row = tuple[int, str, str, str | None, str, str | None, bytes, int]
Extra = Callable[[sqlite3.Connection, dict[int, ClassState], dict[int, int]], list["Draft"]]
"""Work run inside a commit transaction: may change the class counters (second argument, in place) and record
delivered watermarks that moved past evicted events (third argument); returns drafts to commit with it."""


@dataclass(slots=True)
class Draft:
    """An event ready to commit; ``data_json`` is the validated payload, serialised once."""

    kind: str
    device_id: str | None
    data_json: bytes
    model: Any = None
    occurred_at: str | None = None
    dedup_key: str | None = None
    ack: Callable[[], None] | None = None
    driver: str = "gateway"
    origin: object = None
    """The connection it came in on; its items are dropped if that connection dies before they commit."""
    done: Callable[[int | None], None] | None = None
    """Called after COMMIT, on the journal's writer thread, with the event's seq, or None when it was a redelivery
    (dedup key seen before). Keep it tiny; ``ack`` runs on the event loop afterwards."""


@dataclass(slots=True)
class Rejected:
    """A message that could not become an event: quarantined with its reason, then acknowledged."""

    driver: str
    reason: str
    detail: str
    size: int
    payload: bytes
    topic: str | None = None
    device_id: str | None = None
    ack: Callable[[], None] | None = None
    origin: object = None


@dataclass(slots=True)
class Committed:
    """What one group commit wrote; listeners (uplink, live display) get it after COMMIT."""

    first_seq: int
    last_seq: int
    kinds: dict[str, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    duplicates_by_driver: dict[str, int] = field(default_factory=dict)
    classes: set[int] = field(default_factory=set)
    """Outbox classes that got new events."""
    evicted_through: dict[int, int] = field(default_factory=dict)
    """Per class: undelivered events up to this seq were evicted (the delivered watermark moves past them)."""

    @property
    def duplicates(self) -> int:
        """Redeliveries dropped by this commit."""
        return sum(self.duplicates_by_driver.values())


class Processor(Protocol):
    """Runs inside the commit transaction (the stock ledger; later the rule engine)."""

    def setup(self, conn: sqlite3.Connection) -> None: ...

    def apply(self, seq: int, draft: Draft) -> None: ...

    def flush(self, conn: sqlite3.Connection, first_seq: int, last_seq: int) -> list[Draft]:
        """Write state changed since the last flush; return derived events to commit in the same transaction."""
        ...

    def rollback(self, conn: sqlite3.Connection) -> None:
        """The transaction failed: reload in-memory state from the database."""
        ...


class JournalError(StoreGatewayError):
    """The journal cannot open or write its database."""


class JournalCorruptError(JournalError):
    """The running journal found its database damaged. Nothing more is acknowledged; the process exits and the
    next start moves the file aside, salvages what it can and goes on (docs/OUTBOX.md, "Corrupt journal")."""


def connect(path: Path, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            path.absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            # Deleted rows are overwritten with zeros: staff ids and GPS fixes of evicted or expired events do not
            # linger in free pages.
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


class Journal:
    """The gateway's durable, ordered event log, and the outbox HQ is fed from (docs/OUTBOX.md)."""

    def __init__(
        self,
        path: Path,
        store_id: str,
        gateway_id: str,
        config: JournalConfig,
        metrics: Metrics,
        processors: Sequence[Processor] = (),
        clock: ClockState | None = None,
        outbox: OutboxConfig | None = None,
    ) -> None:
        self.path = path
        self._store_id = store_id
        self._gateway_id = gateway_id
        self._config = config
        self._outbox = outbox or OutboxConfig()
        self.kind_class = KindClasses(self._outbox.kinds)
        self._metrics = metrics
        self._processors = list(processors)
        self._clock = clock or ClockState()
        self._queue: deque[Draft | Rejected] = deque()
        self._wakeup = asyncio.Event()
        self._intake = asyncio.Event()
        """Set when an item arrives in an empty queue (ends an acks-only commit's wait for company)."""
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._listeners: list[Callable[[Committed], None]] = []
        self._persist_listeners: list[Callable[[], None]] = []
        self._stopping = False
        self._failing = False
        self._busy = False
        self._resume_waiters: list[tuple[int, Callable[[], None]]] = []
        self._commit_done = asyncio.Event()
        self._submitted = 0
        self._finished = 0
        self.seq_floor = 0
        """A fresh journal's first seq is above this (seqs never go backwards, see gateway/kernel/recovery.py)."""
        self._reservation = SeqReservation(path.parent)
        self._ballast = Ballast(path.parent / BALLAST_FILE)
        self._replaced_draft: Draft | None = None
        self.replaced: dict[str, Any] | None = None
        """The ``alert.raised`` payload when a corrupt journal was moved aside, or a missing one replaced, at open."""
        self.corrupt: str | None = None
        """Why the database was found damaged while running (then nothing more is committed or acknowledged)."""
        self.quick_check_interval_s = QUICK_CHECK_S
        self._failing_since: float | None = None
        self._failure = "journal_stalled"
        self._ok_since: float | None = None
        """First intake commit that succeeded since the last failure: the stall ends RECOVERED_S after it."""
        self._waiting_since: float | None = None
        """Since when items have waited in the queue without a commit taking any (None: the queue is empty)."""
        self._damaged: tuple[Path, str, int] | None = None
        """A journal moved aside at open, whose events are salvaged into the fresh one once it exists."""
        self.used_before = False
        """Set by the runtime when the data directory was used before (its lock file was there): a journal missing
        together with its seq reservation is then a loss, not a first start, and the open refuses it."""
        self.damage_hint: tuple[str, str] | None = None
        """Set by the runtime when the data directory's lock file says a run stopped on a damaged journal: handled
        like the damage mark (which a failing disk may not have taken)."""
        self.on_damage_handled: Callable[[], None] | None = None
        """Called once a damaged journal is replaced (the runtime clears the lock file's record)."""
        self.damage_id: str | None = None
        """Names the damage found while running (in ``journal.damaged`` and the lock file)."""
        self.new_journal = False
        """``run --new-journal``: the operator accepts a fresh journal from seq 1 after losing both files."""
        self.last_seq = 0
        self.state: dict[int, ClassState] = {c: ClassState() for c in range(len(CLASSES))}
        """Per-class outbox counters as of the last COMMIT (owned by the writer thread)."""
        self.delivered: dict[int, int] = dict.fromkeys(range(len(CLASSES)), 0)
        """Per-class delivered watermark as the uplink knows it (may be ahead of what is persisted)."""
        self.class_last_seq: dict[int, int] = dict.fromkeys(range(len(CLASSES)), 0)
        self._acks: dict[int, int] = {}
        self._ack_gen = 0
        self._ack_gen_persisted = 0
        self._refused = 0
        self._refused_bytes = 0
        self.disk_low = False
        self.max_bytes = self._outbox.max_bytes
        """The cap in force: ``outbox.max_bytes``, lowered at open to what the disk can hold (DISK_SHARE)."""
        self._disk_checked = 0.0
        self._budget_checked_bytes = 0
        self._next_housekeeping = 0.0
        self._progress = 0
        """Eviction steps committed (read by the loop between steps to tell progress from a failed commit)."""
        self._after_commit: list[Callable[[], None]] = []
        """Bookkeeping of work done inside the current transaction (writer thread): run after its COMMIT,
        dropped on rollback, so metrics and counters never count what was rolled back."""
        self._overall_evicting = False
        self._fragmented_warned = False
        prefix = orjson.dumps({"store_id": store_id, "gateway_id": gateway_id})
        self._ids_json = prefix[1:-1]

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_sync)
        self._rconn = await loop.run_in_executor(self._reader, connect, self.path, "NORMAL", True)

    def _open_sync(self) -> None:
        try:
            self._open_once()
        except JournalError as err:
            # A full disk must not keep the gateway from starting (and restarting for ever under systemd):
            # give back the space kept for this moment, and try once more.
            if not (isinstance(err.__cause__, sqlite3.Error) and _disk_full(err.__cause__)):
                raise
            if not self._ballast.release("the journal could not open on a full disk"):
                raise
            self._open_once()

    def _open_once(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reservation.load()
        self._ballast.ensure(self._outbox.min_free_bytes)
        records = [r for r in (read_damage_record(self.path), self.damage_hint) if r is not None]
        plan = read_salvage_plan(self.path)
        if plan is not None and self.path.with_name(plan["moved"]).exists():
            self._resume_replacement(plan)
        else:
            try:
                reason = probe(self.path)
            except (sqlite3.Error, OSError) as err:  # locked, permissions: not damage, never moved aside
                raise JournalError(f"cannot open journal {self.path}: {err}") from err
            if reason is None and plan is not None and self.path.exists():
                reason = plan["reason"]  # found damaged, and stopped before it was moved aside
            if reason is None and records and self.path.exists():
                # A record this journal's own replacement already handled (it could not be cleared) is stale.
                handled = (read_meta(self.path, HANDLED_DAMAGE) or "").split()
                live = [r for r in records if not r[0] or r[0] not in handled]
                if live:
                    reason = f"found damaged while running: {live[0][1]}"
            if reason is not None:
                self._replace_corrupt(reason)
            elif not self.path.exists():
                self._replace_missing()
            elif is_blank(self.path) and self._reservation.reserved_through > 0:
                # Zero bytes and no WAL, yet seqs were reserved: the schema (committed before the first
                # reservation) is gone, so the file lost its contents. Kept aside, then treated as missing.
                move_aside(self.path)
                self._replace_missing()
        try:
            conn = connect(self.path, self._config.synchronous)
        except sqlite3.DatabaseError as err:
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        try:
            conn.executescript(SCHEMA)
            if self.seq_floor or self.replaced is not None:
                # Durable before anything else is copied in: a crash during the salvage below must not leave a
                # sound, empty journal that a restart would number from 1. A missing journal's alert is kept
                # with it until committed as an event.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)",
                    (str(max(self.seq_floor, _meta_last_seq(conn))),),
                )
                if self.replaced is not None:
                    conn.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (PENDING_ALERT, orjson.dumps(self.replaced).decode()),
                    )
                conn.execute("COMMIT")
            self._migrate(conn)
            for proc in self._processors:
                proc.setup(conn)
            if self._damaged is not None:
                moved = self._damaged[0]
                if _meta_value(conn, SALVAGED_FROM) != moved.name:  # not committed by a start cut short
                    self._salvage_into(conn, *self._damaged, handled=[r[0] for r in records if r[0]])
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if self.replaced is None and PENDING_ALERT in meta:
                # The alert of a replacement whose start stopped before committing it.
                self.replaced = orjson.loads(meta[PENDING_ALERT])
            max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            self._load_state(conn, int(meta.get("delivered_seq", 0)))
            # No per-commit write of the last seq (SD wear): the highest stored seq, or, when the newest
            # events were evicted or pruned, their class's delivered watermark, which moved past them.
            watermarks = max(s.delivered_seq for s in self.state.values())
            self.last_seq = max(int(meta.get("last_seq", 0)), int(max_seq), watermarks, self.seq_floor)
            if self.seq_floor and self.seq_floor >= max(int(max_seq), watermarks):
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(self.last_seq),))
        except sqlite3.DatabaseError as err:
            conn.close()
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        except BaseException:
            conn.close()
            raise
        if self._damaged is not None or records:
            # Only now: the damaged file is aside and what could be salvaged is committed (with the ids of these
            # records, so one that cannot be cleared is known as handled). The plan goes last: a start cut
            # short before this line resumes the replacement and finds the salvage committed.
            clear_damage_mark(self.path)
            if self.on_damage_handled is not None:
                self.on_damage_handled()
            clear_salvage_plan(self.path)
            self._damaged = None
        self._conn = conn
        _keep_private(self.path)
        self._cap_to_disk()
        self._reservation.ensure(self.last_seq)
        self._metrics.last_seq.set(self.last_seq)
        self._metrics.delivered_seq.set(self.delivered_seq)
        self._outbox_gauges()

    def _resume_replacement(self, plan: dict[str, Any]) -> None:
        """A start moved a damaged journal aside and stopped before the replacement was complete: finish it. The
        journal file here, if any, is the fresh one (the records of damage are about the file moved aside)."""
        moved = self.path.with_name(plan["moved"])
        if self.path.exists():
            try:
                fresh_damaged = probe(self.path)
            except (sqlite3.Error, OSError) as err:
                raise JournalError(f"cannot open journal {self.path}: {err}") from err
            if (
                fresh_damaged is not None
            ):  # it holds nothing but copies: they are salvaged again from the original
                move_aside(self.path)
        self.seq_floor = max(self.seq_floor, plan["floor"])
        self._damaged = (moved, plan["reason"], plan["through"])
        _LOGGER.critical(
            "finishing the replacement of the damaged journal (moved aside to %s), cut short by the last start",
            moved.name,
        )

    def _cap_to_disk(self) -> None:
        """Lower the cap in force to a safe share of what this disk can give the journal (seen at start)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        used = self._used_bytes()
        room = used + max(0, free - self._outbox.min_free_bytes)
        # Never below what is stored already: a cap under it would make the budget evict undelivered sales at
        # every start on a full disk. It only stops further growth; pruning delivered events makes room.
        safe = max(1024 * 1024, int(room * DISK_SHARE), used)
        if safe < self._outbox.max_bytes:
            _LOGGER.warning(
                "outbox.max_bytes %d MiB is more than this disk can hold: capping the journal at %d MiB "
                "(%d%% of its pages plus the free space above outbox.min_free_bytes)",
                self._outbox.max_bytes // 2**20,
                safe // 2**20,
                int(DISK_SHARE * 100),
            )
            self.max_bytes = safe

    def _replace_corrupt(self, reason: str) -> None:
        """Move an unreadable journal aside; the fresh one starts above every seq the old one may have used, with
        the old one's readable undelivered events copied in (:meth:`_salvage_into`), and the alert
        (``self.replaced``) is committed first thing by the runtime."""
        last = salvage_last_seq(self.path)
        start = self._reservation.start_after_corruption(last)
        self.seq_floor = max(self.seq_floor, start - 1)
        target = aside_target(self.path)
        through = last or self.seq_floor
        plan = {"moved": target.name, "reason": reason, "through": through, "floor": self.seq_floor}
        try:
            write_salvage_plan(self.path, plan)
        except OSError as err:  # a failing or full disk: the replacement still goes ahead, resumable or not
            _LOGGER.error("cannot write the salvage plan next to %s: %s", self.path, err)
        moved = move_aside(self.path, target=target)
        self._damaged = (moved, reason, through)
        _LOGGER.critical(
            "journal %s is corrupt (%s): moved aside to %s; a fresh journal starts at seq %d",
            self.path,
            reason,
            moved.name,
            start,
        )

    def _salvage_into(
        self, conn: sqlite3.Connection, moved: Path, reason: str, through: int, handled: Sequence[str] = ()
    ) -> None:
        """Copy the undelivered events still readable in the damaged journal into the fresh one, keeping their
        seqs (all below the fresh start), ids and dedup keys, so the uplink sends them and redeliveries of them
        are still dropped. The per-class delivered watermarks come along; the alert lists the seqs that could
        not be read. One transaction: a crash half-way leaves a fresh journal without the copies (the damaged
        file stays aside for a technician), still above the reservation, so seqs stay safe."""
        watermarks = salvage_watermarks(moved)
        fallback = salvage_delivered(moved) or 0
        delivered = {c: watermarks.get(c, fallback) for c in self.state}
        floor = min(delivered.values())
        work = {c: ClassState(delivered[c], 0, 0, 0, 0) for c in self.state}

        def keep(row: SalvagedRow) -> bool:
            return row[7] in delivered and row[0] > delivered[row[7]]

        expires = time.time() + self._config.dedup_retention_days * 86400

        def sink(rows: list[SalvagedRow]) -> None:
            conn.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
            keyed = [(row[5], row[0], expires) for row in rows if row[5] is not None]
            conn.executemany("INSERT OR IGNORE INTO idempotency VALUES (?,?,?)", keyed)
            for row in rows:
                work[row[7]] = work[row[7]].stored(1, len(row[6]))

        conn.execute("BEGIN IMMEDIATE")
        try:
            result = salvage_events(moved, floor, through, keep, sink)
            # The dedup keys of events HQ already had too: a till's redelivery of a delivered sale stays a
            # duplicate after the replacement (best effort: what the damaged file still shows).
            for keys in salvage_idempotency(moved):
                conn.executemany("INSERT OR IGNORE INTO idempotency VALUES (?,?,?)", keys)
            if result.count:
                self._write_state(conn, work)
            start = max(self.seq_floor, result.last_seq) + 1
            alert = self._salvage_alert(moved, reason, floor, start, result)
            conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    (SALVAGED_FROM, moved.name),
                    (HANDLED_DAMAGE, " ".join(handled)),
                    (PENDING_ALERT, orjson.dumps(alert).decode()),
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.seq_floor = start - 1
        self.replaced = alert
        _LOGGER.critical(
            "salvaged %d undelivered events from %s; unreadable seqs: %s",
            result.count,
            moved.name,
            alert["details"]["unreadable_seqs"][:20] or "none",
        )

    def _salvage_alert(
        self, moved: Path, reason: str, floor: int, start: int, result: Salvage
    ) -> dict[str, Any]:
        unreadable = [r for r in result.unreadable if r[1] > floor]
        # Lost, possibly: the unreadable seqs, and whatever the file no longer shows above the highest seq read
        # (a WAL cut short); the salvaged ones are not lost (they are sent again from the fresh journal).
        first_lost = min([r[0] for r in unreadable] + [max(floor, result.last_seq) + 1])
        alert = corrupt_alert(self.path, moved, reason, first_lost - 1, start)
        alert["details"]["salvaged"] = result.count
        alert["details"]["salvaged_seqs"] = ranges_for_alert(result.copied)
        alert["details"]["unreadable_seqs"] = ranges_for_alert(unreadable)
        return alert

    def _replace_missing(self) -> None:
        """No journal file. A first start, or a journal lost (deleted, a wiped card, a restore that missed it):
        seqs must not start again at 1, or HQ refuses the new events as seq conflicts. The reservation sidecar
        says how far the lost journal may have gone; with neither file, a data directory used before cannot
        know, and the open refuses unless the operator asked for a new journal."""
        move_orphans_aside(self.path)
        reserved = self._reservation.reserved_through
        if reserved > 0:
            start = reserved + 1
            self.seq_floor = max(self.seq_floor, reserved)
            self.replaced = missing_alert(self.path, reserved, start)
            _LOGGER.critical(
                "journal %s is missing; a fresh journal starts at seq %d, above the seq reservation",
                self.path,
                start,
            )
        elif self.used_before:
            if not self.new_journal:
                raise JournalError(
                    f"journal {self.path} and its seq reservation {self._reservation.path.name} are both missing "
                    f"from a data directory used before: the seqs already sent to HQ are unknown. Restore "
                    f"them, or run 'store-gateway run --new-journal' to start a new journal at seq 1 "
                    f"(HQ may refuse seqs it has seen)"
                )
            start = self.seq_floor + 1
            self.replaced = missing_alert(self.path, 0, start, forced=True)
            _LOGGER.critical(
                "journal %s and its seq reservation are missing: new journal (--new-journal)", self.path
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Journals from before the outbox have no ``cls`` column: add it and classify their events once, with
        the same mapping new events get (config overrides; unknown kinds are telemetry). One transaction: a
        crash half-way must not leave a column whose presence says the events are classified when they are not."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        if "cls" not in columns:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("ALTER TABLE events ADD COLUMN cls INTEGER NOT NULL DEFAULT 1")
                kinds = [row[0] for row in conn.execute("SELECT DISTINCT kind FROM events")]
                conn.executemany(
                    "UPDATE events SET cls=? WHERE kind=?", [(self.kind_class(kind), kind) for kind in kinds]
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        conn.execute(CLASS_INDEX)
        if _meta_value(conn, "idempotency") is None:
            # Journals from before the idempotency table: their events' keys go in once, so nothing they hold
            # is taken twice after the upgrade.
            expires = time.time() + self._config.dedup_retention_days * 86400
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT OR IGNORE INTO idempotency SELECT dedup_key, seq, ? FROM events"
                    " WHERE dedup_key IS NOT NULL",
                    (expires,),
                )
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('idempotency', '1')")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _load_state(self, conn: sqlite3.Connection, legacy_delivered: int) -> None:
        """Per-class counters: read in O(1) from ``outbox_state``; built by one scan only the first time."""
        rows = conn.execute(
            "SELECT cls, delivered_seq, stored_events, stored_bytes, pending_events, evicted_events FROM outbox_state"
        ).fetchall()
        if rows:
            for cls, *values in rows:
                self.state[cls] = ClassState(*values)
        else:
            conn.execute("BEGIN IMMEDIATE")
            for cls in self.state:
                stored, nbytes = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events WHERE cls=?", (cls,)
                ).fetchone()
                pending = conn.execute(
                    "SELECT COUNT(*) FROM events WHERE cls=? AND seq>?", (cls, legacy_delivered)
                ).fetchone()[0]
                self.state[cls] = ClassState(legacy_delivered, stored, nbytes, pending, 0)
            self._write_state(conn, self.state)
            conn.execute("COMMIT")
        for cls in self.state:
            self.delivered[cls] = self.state[cls].delivered_seq
            self.class_last_seq[cls] = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE cls=?", (cls,)
            ).fetchone()[0]
        self._budget_checked_bytes = self.stored_bytes

    @staticmethod
    def _write_state(conn: sqlite3.Connection, states: dict[int, ClassState]) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO outbox_state VALUES (?,?,?,?,?,?)",
            [
                (cls, s.delivered_seq, s.stored_events, s.stored_bytes, s.pending_events, s.evicted_events)
                for cls, s in states.items()
            ],
        )

    def replaced_draft(self) -> Draft:
        """The ``alert.raised`` event for :attr:`replaced`; committing it clears the alert kept in ``meta``."""
        assert self.replaced is not None
        self._replaced_draft = Draft("alert.raised", None, orjson.dumps(self.replaced))
        return self._replaced_draft

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        # The reader first: SQLite checkpoints the WAL into the main file when the LAST connection closes, and
        # only a writable connection can; a clean stop then leaves a self-contained journal.db behind.
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        if self._conn is not None:
            await loop.run_in_executor(self._writer, self._conn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # --- outbox views -------------------------------------------------------------------------------

    @property
    def delivered_seq(self) -> int:
        """Every event with a seq at or below this is delivered (or evicted): a conservative global watermark."""
        waiting = [self.delivered[c] for c in self.delivered if self.class_last_seq[c] > self.delivered[c]]
        return min(waiting) if waiting else self.last_seq

    @property
    def caught_up(self) -> bool:
        return all(self.class_last_seq[c] <= self.delivered[c] for c in self.delivered)

    @property
    def backlog(self) -> int:
        """Events waiting for HQ, as of the last commit."""
        return sum(s.pending_events for s in self.state.values())

    @property
    def stored_bytes(self) -> int:
        return sum(s.stored_bytes for s in self.state.values())

    def add_persist_listener(self, listener: Callable[[], None]) -> None:
        """Called after a commit that recorded acknowledgements (the uplink frees window slots then)."""
        self._persist_listeners.append(listener)

    @property
    def acks_persisted(self) -> bool:
        return self._ack_gen_persisted >= self._ack_gen

    @property
    def ack_generation(self) -> tuple[int, int]:
        """(acknowledgements noted, acknowledgements persisted): each note_delivered adds one to the first."""
        return self._ack_gen, self._ack_gen_persisted

    # --- intake -----------------------------------------------------------------------------------

    def submit(self, item: Draft | Rejected) -> bool:
        """Queue an item for the next commit. False (and nothing queued) if the journal is over its limit."""
        if len(self._queue) >= QUEUE_LIMIT or self._stopping or self.corrupt is not None:
            return False
        if isinstance(item, Draft):
            if len(item.data_json) > self._config.max_payload_bytes:
                limit = self._config.max_payload_bytes
                detail = f"event body {len(item.data_json)} bytes > journal.max_payload_bytes {limit}"
                item = _as_rejected(item, ValueError(detail), reason="too_large")
            elif self.disk_low and self.kind_class(item.kind) == TELEMETRY:
                # Low disk: telemetry gives way to transactions. Acknowledged, counted, reported to HQ.
                self._refused += 1
                self._refused_bytes += len(item.data_json)
                self._metrics.outbox_refused.inc()
                if item.ack is not None:
                    item.ack()
                return True
        self._queue.append(item)
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._submitted += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        if len(self._queue) == 1:
            self._intake.set()
        return True

    def discard(self, origin: object) -> int:
        """Drop queued items that came in on ``origin``, a connection that died: their acknowledgements can no
        longer reach the broker, which redelivers them to the next session. Returns how many were dropped."""
        kept = deque(item for item in self._queue if item.origin is not origin or origin is None)
        dropped = len(self._queue) - len(kept)
        if dropped:
            self._queue = kept
            if not kept:
                self._waiting_since = None
            self._finished += dropped
            self._commit_done.set()
        return dropped

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def high_water(self) -> int:
        """Drivers stop reading from their devices while this many items wait for a commit."""
        return self._config.commit_max_events

    def when_below(self, level: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, after a commit leaves fewer than ``level`` items waiting."""
        self._resume_waiters.append((level, callback))

    def _wake_waiters(self) -> None:
        if not self._resume_waiters:
            return
        pending = len(self._queue)
        ready = [cb for level, cb in self._resume_waiters if pending < level]
        self._resume_waiters = [(lv, cb) for lv, cb in self._resume_waiters if pending >= lv]
        for callback in ready:
            callback()

    def add_listener(self, listener: Callable[[Committed], None]) -> None:
        self._listeners.append(listener)

    def note_delivered(self, cls: int, seq: int) -> None:
        """HQ acknowledged every event of class ``cls`` up to ``seq``; persisted by the next commit."""
        if seq > self.delivered[cls]:
            self.delivered[cls] = seq
            self._acks[cls] = seq
            self._ack_gen += 1
            self._metrics.delivered_seq.set(self.delivered_seq)
            self._wakeup.set()

    async def flush(self) -> None:
        """Wait until everything submitted before this call is committed (and acknowledged), or discarded, and
        the acknowledgements noted so far are persisted. Later submissions do not extend the wait. The writer
        must be running."""
        target = self._submitted
        acks = self._ack_gen
        while self._finished < target or self._ack_gen_persisted < acks:
            self._commit_done.clear()
            await self._commit_done.wait()

    async def transact(self, work: Callable[[sqlite3.Connection], tuple[T, list[Draft]]]) -> T:
        """Run ``work(conn)`` in its own transaction on the writer thread, between group commits; the drafts it
        returns are committed in the same transaction. On any error everything rolls back (processors reload
        their state) and the error is raised. After success, processors reload too (``work`` may have changed
        their tables, e.g. stock thresholds)."""
        loop = asyncio.get_running_loop()
        box: list[T] = []

        def run(conn: sqlite3.Connection) -> list[Draft]:
            result, drafts = work(conn)
            box.append(result)
            return drafts

        committed = await loop.run_in_executor(self._writer, self._transact_sync, run)
        if committed is not None:
            self._publish(committed)
        return box[0]

    def _transact_sync(self, run: Callable[[sqlite3.Connection], list[Draft]]) -> Committed | None:
        committed = self._commit_batch([], {}, lambda conn, _work, _moved: run(conn))
        conn = self._conn
        assert conn is not None
        for proc in self._processors:
            proc.rollback(conn)
        return committed

    # --- the writer ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer loop: group-commit what has queued until cancelled; then commit what is left. Between
        commits it enforces the disk budget and, every ``housekeeping_interval_s``, TTLs and the quarantine cap."""
        loop = asyncio.get_running_loop()
        delay = self._config.commit_max_delay_ms / 1000
        idle = min(DISK_CHECK_S, self._outbox.housekeeping_interval_s)
        try:
            while True:
                if self.corrupt is not None:
                    raise JournalCorruptError(f"journal {self.path} is damaged: {self.corrupt}")
                # First thing at start (disk check, TTL), then after every commit or idle second.
                try:
                    await self._maintain(loop)
                except sqlite3.Error as err:
                    if is_damage(err):
                        self.declare_corrupt(str(err))
                        continue
                    _LOGGER.error("outbox housekeeping failed, retrying later: %s", err)
                except Exception:  # a bug here must not stop the journal: log it, keep committing
                    _LOGGER.exception("outbox housekeeping failed, retrying later")
                if self._queue:
                    self._wakeup.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await self._wakeup.wait()
                if self._wakeup.is_set():
                    if not self._queue and self._acks and not self._stopping:
                        # Only HQ acknowledgements to record: give intake a moment to share the commit
                        # (one fsync instead of two; the uplink's window holds those batches meanwhile).
                        self._intake.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(ACK_ONLY_DELAY_S):
                                await self._intake.wait()  # the first intake item ends the wait
                    if delay and len(self._queue) < self._config.commit_max_events:
                        await asyncio.sleep(delay)
                    self._wakeup.clear()
                    await self._commit_once(loop)
        finally:
            self._stopping = True
            await asyncio.shield(self._drain(loop))

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.corrupt is not None:
            _LOGGER.error("journal damaged: %d uncommitted items left (never acknowledged)", len(self._queue))
            return
        for _ in range(3 + len(self._queue) // self._config.commit_max_events):
            if not self._queue and not self._acks:
                return
            await self._commit_once(loop)
        if self._queue:
            _LOGGER.error("journal stopped with %d uncommitted items (never acknowledged)", len(self._queue))

    async def _commit_once(
        self,
        loop: asyncio.AbstractEventLoop,
        extra: Extra | None = None,
        intake: bool = True,
    ) -> None:
        """One group commit. ``intake=False`` leaves queued items for the next one (a pruning step on a low
        disk must not fail for the space the sales would take)."""
        if self.corrupt is not None:
            return  # a damaged file commits nothing more: what waits is never acknowledged, and is redelivered
        n = min(len(self._queue), self._config.commit_max_events) if intake else 0
        items = [self._queue.popleft() for _ in range(n)]
        acks, self._acks = self._acks, {}
        ack_gen = self._ack_gen
        if not items and not acks and extra is None:
            return
        started = time.perf_counter()
        self._busy = True
        cancelled: asyncio.CancelledError | None = None
        leftover: list[Draft | Rejected] = []
        result: Committed | None = None
        acks_written = False
        try:
            future = loop.run_in_executor(self._writer, self._commit_sync, items, acks, extra)
            while True:
                try:
                    result, leftover = await asyncio.shield(future)
                    # Acks were written by the first transaction, which committed.
                    self._ack_gen_persisted = max(self._ack_gen_persisted, ack_gen)
                    acks_written = bool(acks)
                    break
                except asyncio.CancelledError as err:
                    # Once the thread may COMMIT, its acks must follow: finish the bookkeeping, then stop.
                    cancelled = err
        except sqlite3.Error as err:
            result, leftover = None, items
            if (
                acks
                and items
                and (_disk_full(err) or isinstance(err, SeqReservationError))
                and not is_damage(err)
            ):
                # HQ's acknowledgements must get to disk even when intake cannot: they are what lets the uplink
                # move on and the delivered events be pruned to make room. Tried alone, they need one page.
                acks_written, stop = await self._commit_acks_alone(loop, acks)
                cancelled = cancelled or stop
                if acks_written:
                    self._ack_gen_persisted = max(self._ack_gen_persisted, ack_gen)
            self._commit_failed(err, {} if acks_written else acks)
        finally:
            self._busy = False
        if items and len(leftover) < len(items):
            self._waiting_since = time.monotonic() if self._queue or leftover else None
        if leftover:
            # Nothing of the leftover was committed or acknowledged: put it back in order, retry after a pause.
            self._queue.extendleft(reversed(leftover))
            items = items[: len(items) - len(leftover)]
            self._failing = True
            self._note_failure()
        elif items or not self._queue:  # a pruning step alone does not show that intake commits again
            if self._failing_since is not None and self._ok_since is None:
                self._ok_since = time.monotonic()
            if self._failing:
                _LOGGER.warning("journal commits work again")
                self._failing = False
        self._metrics.commits.observe(time.perf_counter() - started)
        for item in items:
            if item.ack is not None:
                item.ack()
        self._finished += len(items)
        self._wake_waiters()
        self._commit_done.set()
        if result is not None:
            self._publish(result)
        elif not leftover:
            self._outbox_gauges()
        if acks_written:
            for listener in self._persist_listeners:
                listener()
        if cancelled is not None:
            raise cancelled
        if leftover:
            await asyncio.sleep(1)

    async def _commit_acks_alone(
        self, loop: asyncio.AbstractEventLoop, acks: dict[int, int]
    ) -> tuple[bool, asyncio.CancelledError | None]:
        """Commit only ``acks`` (after a combined commit failed on a full disk): (written, a cancellation that
        arrived meanwhile, to re-raise once the bookkeeping is done)."""
        future = loop.run_in_executor(self._writer, self._commit_batch, [], acks)
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError as err:
                cancelled = err
                continue
            except sqlite3.Error as err:
                _LOGGER.debug("recording HQ acknowledgements alone failed too: %s", err)
                return False, cancelled
            _LOGGER.info("disk full: recorded HQ acknowledgements in a commit of their own")
            return True, cancelled

    def _commit_failed(self, err: sqlite3.Error, acks: dict[int, int]) -> None:
        for cls, seq in acks.items():  # not persisted: written again by the next commit
            self._acks[cls] = max(seq, self._acks.get(cls, 0))
        self._note_failure()
        if is_damage(err):
            self._failure = "journal_corrupt"
            self.declare_corrupt(str(err))
            return
        self._failure = "disk_full" if _disk_full(err) else "journal_stalled"
        if _disk_full(err):
            self._ballast.release("a commit found the disk full")
        if not self._failing:
            _LOGGER.error("journal commit failed, retrying every second: %s", err)
        self._failing = True

    def declare_corrupt(self, reason: str) -> None:
        """The database is damaged (a commit, a read or the integrity check said so): acknowledge nothing more,
        leave the mark for the next start, and wake the writer, which stops (the runtime exits, the supervisor
        restarts, the start-up path moves the file aside and salvages). Event loop only."""
        if self.corrupt is not None:
            return
        self.corrupt = reason
        self.damage_id = uuid7()
        self._failure = "journal_corrupt"
        self._note_failure()
        _LOGGER.critical(
            "journal %s is damaged (%s): stopping; the next start replaces it", self.path, reason
        )
        mark_damaged(self.path, reason, self.damage_id)
        self._wakeup.set()

    def _note_failure(self) -> None:
        now = time.monotonic()
        if self._failing_since is None or self._recovered(now):
            self._failing_since = now
        self._ok_since = None

    def _recovered(self, now: float) -> bool:
        return self.corrupt is None and self._ok_since is not None and now - self._ok_since >= RECOVERED_S

    @property
    def stall(self) -> tuple[str, float] | None:
        """(reason, seconds) while commits fail, or one has not returned for a second: ``journal_corrupt``,
        ``disk_full`` or ``journal_stalled``. A stall ends only after RECOVERED_S of commits without a failure:
        a disk that takes one small commit in three is still failing, and /health must not flap."""
        now = time.monotonic()
        if self._failing_since is not None and not self._recovered(now):
            # Frozen while commits work again: a short blip that healed never grows into a 503 later.
            until = now if self._ok_since is None else self._ok_since
            return self._failure, until - self._failing_since
        # Items waiting with no commit taking them: a commit hung in fsync, or the writer held up by anything else
        # (a checkpoint, an eviction step, a transaction) on a card that stopped answering.
        waiting = None if self._waiting_since is None else now - self._waiting_since
        if waiting is not None and waiting >= 1.0:
            return "journal_stalled", waiting
        return None

    async def watch_integrity(self) -> None:
        """Every ``quick_check_interval_s``, run ``PRAGMA quick_check`` on its own read-only connection and
        thread: a damaged page deep in the file is found before a commit or the uplink trips on it."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-check")
        try:
            wait = min(QUICK_CHECK_FIRST_S, self.quick_check_interval_s)
            while self.corrupt is None:
                await asyncio.sleep(wait)
                wait = self.quick_check_interval_s
                try:
                    problem = await loop.run_in_executor(pool, quick_check, self.path)
                except (sqlite3.Error, OSError) as err:
                    _LOGGER.warning("journal integrity check could not run: %s", err)
                    continue
                if problem is not None:
                    self.declare_corrupt(f"quick_check: {problem}")
        finally:
            # Never wait here for a check still running (it may take minutes on a large journal): the event
            # loop would stall with it. The thread ends with its check; its read-only connection is its own.
            pool.shutdown(wait=False)

    def _publish(self, result: Committed) -> None:
        """Metrics, listeners and ``done`` callbacks, after COMMIT."""
        for cls, through in result.evicted_through.items():
            self.delivered[cls] = max(self.delivered[cls], through)
        self._metrics.last_seq.set(self.last_seq)
        self._metrics.delivered_seq.set(self.delivered_seq)
        for kind, count in result.kinds.items():
            self._metrics.committed.labels(kind).inc(count)
        for driver, count in result.duplicates_by_driver.items():
            self._metrics.duplicates.labels(driver).inc(count)
        for r in result.rejected:
            self._metrics.quarantined.labels(r.driver, r.reason).inc()
        self._outbox_gauges()
        for listener in self._listeners:
            listener(result)

    def _outbox_gauges(self) -> None:
        """After every COMMIT, also those that wrote no event (acknowledgements, pruning delivered events)."""
        for cls, state in self.state.items():
            name = CLASSES[cls]
            self._metrics.outbox_pending.labels(name).set(state.pending_events)
            self._metrics.outbox_bytes.labels(name).set(state.stored_bytes)

    def _commit_sync(
        self,
        items: list[Draft | Rejected],
        acks: dict[int, int],
        extra: Extra | None = None,
    ) -> tuple[Committed | None, list[Draft | Rejected]]:
        """Commit the batch; returns what was committed and the items NOT committed (a SQLite failure)."""
        try:
            return self._commit_batch(items, acks, extra), []
        except sqlite3.Error:
            raise
        except Exception:
            if extra is not None and not items:
                raise
            _LOGGER.exception("processing a batch of %d failed; committing its items one by one", len(items))
        # A bug or a poison event must not hold back good data: commit each item alone, and quarantine
        # (with the error) the ones that fail on their own.
        merged: Committed | None = None
        for index, item in enumerate(items):
            marks = acks if index == 0 else {}
            try:
                try:
                    part = self._commit_batch([item], marks)
                except sqlite3.Error:
                    raise
                except Exception as err:
                    part = self._commit_batch([_as_rejected(item, err)], marks)
            except sqlite3.Error as err:
                if index == 0:
                    raise
                _LOGGER.error("journal commit failed after %d of %d items: %s", index, len(items), err)
                return merged, items[index:]
            merged = _merge(merged, part)
        return merged, []

    def _commit_batch(
        self,
        items: list[Draft | Rejected],
        acks: dict[int, int],
        extra: Extra | None = None,
    ) -> Committed | None:
        conn = self._conn
        assert conn is not None
        drafts = [i for i in items if isinstance(i, Draft)]
        rejected = [i for i in items if isinstance(i, Rejected)]
        if items:
            self._check_intake_room(conn, items)
        work = dict(self.state)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for cls, seq in acks.items():
                on_disk = conn.execute(
                    "SELECT COUNT(*) FROM events WHERE cls=? AND seq>? AND seq<=?",
                    (cls, work[cls].delivered_seq, seq),
                ).fetchone()[0]
                work[cls] = work[cls].acknowledged(seq, on_disk)
            fresh, duplicates = self._drop_redeliveries(conn, drafts)
            first = self.last_seq + 1
            seq = self.last_seq
            now = time.time()
            rows: list[Row] = []
            seq = self._envelopes(fresh, seq, now, rows)
            for proc in self._processors:
                for row_draft, row in zip(fresh, rows, strict=True):
                    proc.apply(row[0], row_draft)
            for proc in self._processors:
                derived = proc.flush(conn, first, seq)
                if derived:
                    seq = self._envelopes(derived, seq, now, rows)
            moved: dict[int, int] = {}
            if extra is not None:
                seq = self._envelopes(extra(conn, work, moved), seq, now, rows)
            conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
            expires = now + self._config.dedup_retention_days * 86400
            keyed = [(row[5], row[0], expires) for row in rows if row[5] is not None]
            if keyed:
                # Kept apart from the events: a replay is still known after TTL or the disk budget removed them.
                conn.executemany("INSERT OR REPLACE INTO idempotency VALUES (?,?,?)", keyed)
            classes: set[int] = set()
            for row in rows:
                cls = row[7]
                work[cls] = work[cls].stored(1, len(row[6]))
                classes.add(cls)
            if rejected:
                self._quarantine(conn, rejected, now)
            if self._replaced_draft is not None and any(d is self._replaced_draft for d in fresh):
                conn.execute("DELETE FROM meta WHERE key = ?", (PENDING_ALERT,))
                self._after_commit.append(functools.partial(setattr, self, "_replaced_draft", None))
            changed = {c: s for c, s in work.items() if s is not self.state[c]}
            if changed:
                self._write_state(conn, changed)
            if seq > self.last_seq:
                self._within_reservation(seq)
            conn.execute("COMMIT")
        except BaseException:
            self._after_commit.clear()
            # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR): a ROLLBACK then fails,
            # and must neither hide the real error nor skip reloading the processors' in-memory state.
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                _LOGGER.debug("ROLLBACK after a failed commit failed too", exc_info=True)
            finally:
                for proc in self._processors:
                    proc.rollback(conn)
            raise
        self.state = work
        for row in rows:  # before last_seq: delivered_seq reads last_seq when no class seems to wait
            self.class_last_seq[row[7]] = row[0]
        self.last_seq = seq
        hooks, self._after_commit = self._after_commit, []
        for hook in hooks:
            hook()
        self._reservation.ensure(seq)
        seq_of = {id(d): r[0] for d, r in zip(fresh, rows, strict=False)}
        for draft in drafts:
            if draft.done is not None:
                draft.done(seq_of.get(id(draft)))
        if not rows and not rejected and not duplicates:
            return None
        kinds: dict[str, int] = {}
        for row in rows:
            kinds[row[2]] = kinds.get(row[2], 0) + 1
        return Committed(first, seq, kinds, [r[6] for r in rows], rejected, duplicates, classes, moved)

    def _within_reservation(self, seq: int) -> None:
        """Never commit a seq the reservation on disk does not cover: a journal lost after this commit would
        restart below it and hand the seq out twice. The reservation is normally a tenth of a block ahead; it
        runs out only when writing it has kept failing, and then intake waits (a stall /health reports)."""
        if seq <= self._reservation.reserved_through:
            return
        self._reservation.ensure(seq)
        if seq > self._reservation.reserved_through:
            raise SeqReservationError(
                f"seq {seq} is past the seq reservation ({self._reservation.reserved_through}) and "
                f"{self._reservation.path.name} cannot be written: holding intake back"
            )

    def _check_intake_room(self, conn: sqlite3.Connection, items: Sequence[Draft | Rejected]) -> None:
        """Raise :class:`IntakeReserveError` when committing ``items`` would eat into the last
        :meth:`_intake_reserve` bytes of the disk and the file has too few free pages of its own to hold them.

        That space is kept for HQ's acknowledgements, pruning steps and the WAL checkpoint: if sales took it,
        nothing could be pruned and the disk would stay full after HQ is back."""
        try:
            st = os.statvfs(self.path.parent)  # now, not at the last check: one commit can take megabytes
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free >= self._intake_reserve():
            return
        need = 64 * 1024 + 3 * sum(
            len(i.data_json) if isinstance(i, Draft) else min(i.size, QUARANTINE_KEEP_BYTES) for i in items
        )
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        reusable = conn.execute("PRAGMA freelist_count").fetchone()[0] * page_size
        if reusable < need:
            raise IntakeReserveError(
                f"disk full: {free} bytes free, kept for acknowledgements and pruning; "
                f"{reusable} bytes of free pages in the journal"
            )

    def _checkpoint(self) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _intake_reserve(self) -> int:
        return max(1024 * 1024, min(self._outbox.min_free_bytes // 2, BALLAST_BYTES))

    def _drop_redeliveries(
        self, conn: sqlite3.Connection, drafts: list[Draft]
    ) -> tuple[list[Draft], dict[str, int]]:
        """Drafts whose dedup key is not committed yet; and the count of those dropped, per driver."""
        keys = [d.dedup_key for d in drafts if d.dedup_key is not None]
        if not keys:
            return drafts, {}
        seen: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            seen.update(
                r[0]
                for r in conn.execute(f"SELECT key FROM idempotency WHERE key IN ({marks})", chunk)  # noqa: S608
            )
        fresh: list[Draft] = []
        duplicates: dict[str, int] = {}
        for draft in drafts:
            key = draft.dedup_key
            if key is not None:
                if key in seen:
                    duplicates[draft.driver] = duplicates.get(draft.driver, 0) + 1
                    continue
                seen.add(key)
            fresh.append(draft)
        return fresh, duplicates

    def _envelopes(self, drafts: list[Draft], seq: int, now: float, rows: list[Row]) -> int:
        """Give each draft the next seq and build its envelope bytes (the data bytes are spliced in as they are)."""
        recorded_at = (
            datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        common = b'"recorded_at":"%s","boot_id":"%s","clock_synced":%s,"schema":%d,' % (
            recorded_at.encode(),
            BOOT_ID.encode(),
            b"true" if self._clock.synced() else b"false",
            SCHEMA_VERSION,
        )
        mono = time.monotonic_ns()
        ids = self._ids_json
        kind_class = self.kind_class
        entropy = os.urandom(8 * len(drafts))
        for n, draft in enumerate(drafts):
            seq += 1
            event_id = uuid7(int.from_bytes(entropy[8 * n : 8 * n + 8]))
            head = orjson.dumps(
                {
                    "id": event_id,
                    "seq": seq,
                    "kind": draft.kind,
                    "device_id": draft.device_id,
                    "occurred_at": draft.occurred_at,
                    "mono_ns": mono,
                }
            )
            body = b"".join((head[:-1], b",", ids, b",", common, b'"data":', draft.data_json, b"}"))
            rows.append(
                (
                    seq,
                    event_id,
                    draft.kind,
                    draft.device_id,
                    recorded_at,
                    draft.dedup_key,
                    body,
                    kind_class(draft.kind),
                )
            )
        return seq

    def _quarantine(self, conn: sqlite3.Connection, rejected: list[Rejected], now: float) -> None:
        received_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        conn.executemany(
            "INSERT INTO quarantine(received_at, driver, device_id, topic, reason, detail, size, payload)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [
                (
                    received_at,
                    r.driver,
                    r.device_id,
                    None if r.topic is None else r.topic[:QUARANTINE_TOPIC_CHARS],
                    r.reason,
                    r.detail[:1000],
                    r.size,
                    r.payload[:QUARANTINE_KEEP_BYTES],
                )
                for r in rejected
            ],
        )

    # --- disk budget, TTL, low disk -----------------------------------------------------------------

    async def _maintain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Between commits: read free disk space (each second), enforce budgets when they may be exceeded, run
        TTL and quarantine housekeeping on its interval. Each step is its own short transaction."""
        now = time.monotonic()
        if now - self._disk_checked >= DISK_CHECK_S:
            self._disk_checked = now
            self._check_disk()
        housekeeping = now >= self._next_housekeeping
        if housekeeping:
            self._next_housekeeping = now + self._outbox.housekeeping_interval_s
        over = self._over_class_budget() is not None
        grown = self.stored_bytes - self._budget_checked_bytes > min(1024 * 1024, self.max_bytes // 100)
        if self._refused and (housekeeping or not self.disk_low):
            count, nbytes = self._refused, self._refused_bytes
            reported: list[bool] = []
            await self._commit_once(loop, functools.partial(self._report_refused, count, nbytes, reported))
            if reported:  # else the commit failed: the refusals stay counted for the next try
                self._refused -= count
                self._refused_bytes -= nbytes
        if self.disk_low:
            # SQLite checkpoints only once the WAL holds 1000 pages (4 MiB more disk); on a low disk, checkpoint
            # now, so the next commit writes the WAL from its start again, in blocks the file already has.
            try:
                await loop.run_in_executor(self._writer, self._checkpoint)
            except sqlite3.Error as err:
                if is_damage(err):
                    raise
                # The main file may have to grow to take the WAL's pages: pruning below can still free some.
                _LOGGER.debug("checkpoint on a low disk failed: %s", err)
        if not (housekeeping or over or grown or self.disk_low):
            return
        for _ in range(100_000):  # bounded: each step evicts a chunk or stops
            # Read again before every step: once the waiting sales commit, nothing more is evicted for them.
            urgent = self._refused_class()
            step = await loop.run_in_executor(self._writer, self._plan_eviction, housekeeping, urgent)
            if step is None:
                break
            progress = self._progress
            await self._commit_once(loop, step, intake=not self.disk_low)
            if self._progress == progress:
                break  # nothing removed (or the commit failed): try again later
            if self._queue:
                await self._commit_once(loop)  # intake keeps flowing between eviction steps
        # Growth is measured from what is left after evicting: measured from before, whatever was freed would
        # have to be written again before the next check, and the journal would overshoot its cap by that much.
        self._budget_checked_bytes = self.stored_bytes
        if housekeeping:
            await loop.run_in_executor(self._writer, self._trim_quarantine)
            await loop.run_in_executor(self._writer, self._expire_idempotency)

    def _check_disk(self) -> None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        self._metrics.disk_free.set(free)
        low = free < self._outbox.min_free_bytes
        if low != self.disk_low:
            if low:
                _LOGGER.warning("disk low: %d MiB free; refusing new telemetry", free // 2**20)
            else:
                _LOGGER.info("disk space recovered: %d MiB free; accepting telemetry again", free // 2**20)
            self.disk_low = low

    def _report_refused(
        self,
        count: int,
        nbytes: int,
        reported: list[bool],
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
    ) -> list[Draft]:
        reports = eviction_reports(TELEMETRY, "disk_low", [], refused=count, refused_bytes=nbytes)

        def committed() -> None:
            self._metrics.outbox_evicted.labels("telemetry", "disk_low").inc(count)
            reported.append(True)

        self._after_commit.append(committed)
        return [Draft("outbox.evicted", None, orjson.dumps(r)) for r in reports]

    def _over_class_budget(self) -> int | None:
        for name, budget in self._outbox.classes.items():
            cls = CLASSES.index(name)
            if budget.max_bytes is not None and self.state[cls].stored_bytes > budget.max_bytes:
                return cls
        return None

    def _used_bytes(self) -> int:
        conn = self._conn
        assert conn is not None
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _refused_class(self) -> int | None:
        """``transaction`` or ``critical`` (the highest waiting) while the full disk keeps such events out of the
        journal; else None (state and telemetry never make room for each other)."""
        if not (self._failing and self._failure == "disk_full" and self._queue):
            return None
        classes = [self.kind_class(item.kind) for item in self._queue if isinstance(item, Draft)]
        urgent = min(classes, default=None)
        return urgent if urgent is not None and urgent <= TRANSACTION else None

    def _plan_eviction(self, housekeeping: bool, urgent: int | None = None) -> Extra | None:
        """On the writer thread: the next eviction step (a function run inside a commit), or None if within
        every budget and TTL. ``urgent``: a class the full disk keeps out (sales waiting); undelivered events of
        lower classes then make room for it, when nothing delivered is left to prune."""
        if housekeeping:
            for name, budget in self._outbox.classes.items():
                if budget.ttl_days is None:
                    continue
                cutoff = datetime.fromtimestamp(time.time() - budget.ttl_days * 86400, UTC)
                text = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                step = self._ttl_step(CLASSES.index(name), text)
                if step is not None:
                    return step
        if self.disk_low:
            # Low disk: events HQ already has go first, to make room (pages freed inside the file are reused by
            # the next commits, so the file stops growing). Nothing undelivered is touched here.
            for victim in eviction_order(self.state, False):
                if self._has_rows(victim.cls, True):
                    return functools.partial(
                        self._evict, victim.cls, True, "disk_low", None, self._outbox.min_free_bytes
                    )
            # The disk filled (with HQ away, or by something else on it) and sales wait while telemetry HQ has not
            # taken yet is kept: the lower classes go first, oldest first, counted and reported like any eviction.
            for lower in (TELEMETRY, STATE):
                if urgent is not None and lower > urgent and self._has_rows(lower, False):
                    # Small steps: each one's WAL pages must fit on the nearly full disk.
                    return functools.partial(self._evict, lower, False, "disk_low", None, URGENT_EVICT_BYTES)
        cls = self._over_class_budget()
        if cls is not None:
            budget_bytes = self._outbox.classes[CLASSES[cls]].max_bytes
            assert budget_bytes is not None
            delivered = self.state[cls].stored_events > self.state[cls].pending_events
            return functools.partial(
                self._evict, cls, delivered, "class_budget", int(budget_bytes * BUDGET_HEADROOM), None
            )
        limit = self.max_bytes
        used = self._used_bytes()
        if used > limit or (self._overall_evicting and used > limit * BUDGET_HEADROOM):
            self._overall_evicting = True
            # Event bytes stand in for pages (a row frees at least its body, plus index entries); each step frees
            # about the excess and the next one measures again, so eviction stops near 5% under the cap
            # instead of removing whole chunks.
            free = max(1, used - int(limit * BUDGET_HEADROOM))
            # Classes share the table's pages: evicting one leaves pages part-full, which SQLite does not give
            # back. Undelivered events go only while the event bytes themselves could fill the cap; otherwise
            # the pages are fragmented, and dropping sales would not shrink them (min_free_bytes still guards
            # the disk).
            undelivered = self.stored_bytes * PAGE_OVERHEAD > limit * BUDGET_HEADROOM
            if any(self._has_rows(v.cls, v.delivered) for v in eviction_order(self.state, undelivered)):
                return functools.partial(self._evict_for_disk, free, undelivered)
            if not undelivered and not self._fragmented_warned:
                self._fragmented_warned = True
                _LOGGER.warning(
                    "journal uses %d MiB of pages for %d MiB of events (over outbox.max_bytes, fragmented): "
                    "keeping undelivered events; stop the gateway and VACUUM the journal to compact it",
                    used // 2**20,
                    self.stored_bytes // 2**20,
                )
        self._overall_evicting = False
        return None

    def _has_rows(self, cls: int, delivered: bool) -> bool:
        conn = self._conn
        assert conn is not None
        op = "<=" if delivered else ">"
        sql = f"SELECT 1 FROM events WHERE cls=? AND seq{op}? LIMIT 1"  # noqa: S608 - op is one of two literals
        return conn.execute(sql, (cls, self.state[cls].delivered_seq)).fetchone() is not None

    def _ttl_step(self, cls: int, cutoff: str) -> Extra | None:
        conn = self._conn
        assert conn is not None
        oldest = conn.execute(
            "SELECT recorded_at FROM events WHERE cls=? ORDER BY seq LIMIT 1", (cls,)
        ).fetchone()
        if oldest is None or oldest[0] >= cutoff:
            return None
        return functools.partial(self._evict_expired, cls, cutoff)

    def _evict_expired(
        self,
        cls: int,
        cutoff: str,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
    ) -> list[Draft]:
        rows = conn.execute(
            "SELECT seq, length(body), recorded_at, instr(body, '\"clock_synced\":false') > 0"
            " FROM events WHERE cls=? ORDER BY seq LIMIT ?",
            (cls, EVICT_CHUNK),
        ).fetchall()
        delivered = work[cls].delivered_seq
        # Only the expired prefix: a wall-clock step back makes recorded_at non-monotonic in seq, and eviction
        # removes a seq range and moves the delivered watermark past it, so it must never skip a live row. An
        # undelivered event stamped by an unsynchronised clock is never "expired": a Pi without a real-time
        # clock may have stamped today's sale with last year's date.
        expired = [
            (seq, size)
            for seq, size, _, _ in itertools.takewhile(
                lambda r: r[2] < cutoff and not (r[3] and r[0] > delivered), rows
            )
        ]
        if not expired:
            return []
        return self._remove(conn, work, moved, cls, expired, "ttl")

    def _evict_for_disk(
        self,
        free_bytes: int,
        undelivered: bool,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
    ) -> list[Draft]:
        """One disk-budget step: free ``free_bytes`` going down the eviction order, at most EVICT_CHUNK rows.

        The whole order in one step: intake commits between steps, and a step that took only its first victim
        would find fresh telemetry every time and never reach ``state`` while the journal grows past its cap."""
        drafts: list[Draft] = []
        left = EVICT_CHUNK
        limit = self.max_bytes * BUDGET_HEADROOM
        for victim in eviction_order(work, undelivered):
            if free_bytes <= 0 or left <= 0:
                break
            if not victim.delivered and sum(s.stored_bytes for s in work.values()) * PAGE_OVERHEAD <= limit:
                break  # what is left fits: the rest of the excess is part-full pages (see _plan_eviction)
            before = work[victim.cls].stored_bytes
            stored = work[victim.cls].stored_events
            drafts += self._evict(
                victim.cls, victim.delivered, "disk_budget", None, free_bytes, conn, work, moved, left
            )
            free_bytes -= before - work[victim.cls].stored_bytes
            left -= stored - work[victim.cls].stored_events
        return drafts

    def _evict(
        self,
        cls: int,
        delivered: bool,
        reason: str,
        down_to: int | None,
        free_bytes: int | None,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
        max_rows: int = EVICT_CHUNK,
    ) -> list[Draft]:
        """Remove the oldest events of ``cls`` (delivered ones, or undelivered ones) in one chunk: just enough to
        bring the class's bytes down to ``down_to`` (class budget), or to free ``free_bytes`` (disk budget)."""
        state = work[cls]
        if delivered:
            sql = "SELECT seq, length(body) FROM events WHERE cls=? AND seq<=? ORDER BY seq LIMIT ?"
        else:
            sql = "SELECT seq, length(body) FROM events WHERE cls=? AND seq>? ORDER BY seq LIMIT ?"
        rows = conn.execute(sql, (cls, state.delivered_seq, max_rows)).fetchall()
        excess = state.stored_bytes - down_to if down_to is not None else free_bytes
        if excess is not None:
            total = 0
            for n, (_, size) in enumerate(rows):
                total += size
                if total >= excess:
                    rows = rows[: n + 1]
                    break
        if not rows:
            return []
        return self._remove(conn, work, moved, cls, rows, reason)

    def _remove(
        self,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
        cls: int,
        rows: list[tuple[int, int]],
        reason: str,
    ) -> list[Draft]:
        """Delete these rows of class ``cls`` (a seq-ordered prefix of the class). Undelivered ones are counted
        and reported in ``outbox.evicted`` drafts, committed in the same transaction."""
        state = work[cls]
        first, last = rows[0][0], rows[-1][0]
        conn.execute("DELETE FROM events WHERE cls=? AND seq>=? AND seq<=?", (cls, first, last))
        lost = [(seq, size) for seq, size in rows if seq > state.delivered_seq]
        nbytes = sum(size for _, size in rows)
        new = state.removed(len(rows), nbytes, len(lost), last if lost else None)
        work[cls] = new
        name = CLASSES[cls]

        def committed() -> None:
            self._progress += 1
            if len(rows) > len(lost):  # a chunk may hold both (TTL): delivered ones are pruned, not lost
                self._metrics.outbox_pruned.labels(name).inc(len(rows) - len(lost))
            if lost:
                self._metrics.outbox_evicted.labels(name, reason).inc(len(lost))
                _LOGGER.warning(
                    "outbox: evicted %d undelivered %s events (seq %d..%d, %s)",
                    len(lost),
                    name,
                    lost[0][0],
                    last,
                    reason,
                )

        self._after_commit.append(committed)
        if not lost:
            return []
        moved[cls] = last
        reports = eviction_reports(cls, reason, lost)
        return [Draft("outbox.evicted", None, orjson.dumps(r)) for r in reports]

    def _expire_idempotency(self) -> None:
        """Forget dedup keys older than ``journal.dedup_retention_days``, in bounded steps. A key whose event is
        still stored is kept for another period instead (the events' UNIQUE dedup_key would otherwise turn a
        replay into a failed commit): the table never forgets sooner than the events do."""
        conn = self._conn
        assert conn is not None
        now = time.time()
        later = now + self._config.dedup_retention_days * 86400
        for _ in range(100):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A key that expired more than a whole retention ago was stamped by a clock far behind (a box
                # that booted near 1970 and synced since), or the box was off that long: kept another period
                # rather than trusted to be old, like a key whose event is still stored.
                rows = conn.execute(
                    "SELECT key, expires_at < ? OR EXISTS (SELECT 1 FROM events WHERE dedup_key = idempotency.key)"
                    " FROM idempotency WHERE expires_at < ? ORDER BY expires_at LIMIT ?",
                    (now - self._config.dedup_retention_days * 86400, now, EVICT_CHUNK),
                ).fetchall()
                conn.executemany(
                    "DELETE FROM idempotency WHERE key = ?", [(k,) for k, kept in rows if not kept]
                )
                conn.executemany(
                    "UPDATE idempotency SET expires_at = ? WHERE key = ?",
                    [(later, k) for k, kept in rows if kept],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if len(rows) < EVICT_CHUNK:
                return

    def dedup_seq(self, key: str) -> int | None:
        """The seq committed under ``key`` within the dedup retention (its event may be gone), or None. Reader
        thread: call from :meth:`query`'s executor, or tests."""
        rconn = self._rconn
        assert rconn is not None
        row = rconn.execute("SELECT seq FROM idempotency WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _trim_quarantine(self) -> None:
        conn = self._conn
        assert conn is not None
        keep = self._outbox.quarantine_max_rows
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "DELETE FROM quarantine WHERE qid <= (SELECT COALESCE(MAX(qid), 0) FROM quarantine) - ?",
                (keep,),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # --- reads (uplink, API) ----------------------------------------------------------------------

    async def read_class(
        self, cls: int, after_seq: int, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Committed events of one class with seq > after_seq, in order, within the budgets (at least one)."""
        return await self._read(
            "SELECT seq, body FROM events WHERE cls=? AND seq>? ORDER BY seq LIMIT ?",
            (cls, after_seq, max_events),
            max_bytes,
        )

    async def read_range(
        self, first: int, last: int, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Events (any class) with first <= seq <= last still on disk, in order, within the budgets."""
        return await self._read(
            "SELECT seq, body FROM events WHERE seq>=? AND seq<=? ORDER BY seq LIMIT ?",
            (first, last, max_events),
            max_bytes,
        )

    async def read_after(self, after_seq: int, max_events: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Committed events with seq > after_seq, in order, within the count and byte budgets (at least one)."""
        return await self.read_range(after_seq + 1, 2**63 - 1, max_events, max_bytes)

    async def _read(self, sql: str, params: tuple[int, ...], max_bytes: int) -> list[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, self._read_sync, sql, params, max_bytes)
        except sqlite3.Error as err:
            # A damaged page in the backlog: retrying the read for ever would hold HQ's copy back silently. The
            # journal is replaced like one damaged under a commit (what is still readable is salvaged).
            if is_damage(err):
                self.declare_corrupt(f"reading events: {err}")
            raise

    def _read_sync(self, sql: str, params: tuple[int, ...], max_bytes: int) -> list[tuple[int, bytes]]:
        assert self._rconn is not None
        out: list[tuple[int, bytes]] = []
        total = 0
        cur = self._rconn.execute(sql, params)
        for seq, body in cur:
            if out and total + len(body) > max_bytes:
                break
            out.append((seq, body))
            total += len(body)
        cur.close()
        return out

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read-only query on the reader connection (tests and the demo)."""
        loop = asyncio.get_running_loop()
        rconn = self._rconn
        assert rconn is not None
        return await loop.run_in_executor(self._reader, lambda: rconn.execute(sql, params).fetchall())


class SeqReservationError(sqlite3.OperationalError):
    """A commit would pass the seq reservation on disk, which cannot be written (a transient failure: retried)."""


class IntakeReserveError(sqlite3.OperationalError):
    """Intake would take the disk space kept for acknowledgements and pruning: handled like SQLITE_FULL."""


def _disk_full(err: sqlite3.Error) -> bool:
    """SQLITE_FULL, or the I/O error SQLite reports when it cannot even create its -wal/-shm files."""
    if isinstance(err, IntakeReserveError):
        return True
    code = getattr(err, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR)


class Ballast:
    """A file of reserved space next to the journal (``BALLAST_BYTES``), released when the disk is full: the
    journal can then still open (start-up) and commit for a while (transactions, alerts) before it must pause."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self, min_free_bytes: int) -> None:
        """Create it if missing and the disk has room to spare (never the file that fills it)."""
        if self.path.exists():
            return
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < BALLAST_BYTES + min_free_bytes + BALLAST_BYTES:
                return
            with self.path.open("wb") as fh:
                try:  # real blocks, not a sparse file; allocated without writing them (no SD wear)
                    os.posix_fallocate(fh.fileno(), 0, BALLAST_BYTES)
                except OSError:  # a filesystem without fallocate
                    fh.write(bytes(BALLAST_BYTES))
        except OSError as err:
            _LOGGER.warning("cannot reserve %d MiB of disk in %s: %s", BALLAST_BYTES // 2**20, self.path, err)
            self.path.unlink(missing_ok=True)

    def release(self, why: str) -> bool:
        """Delete it; True if there was one to delete."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as err:
            _LOGGER.error("cannot release the disk reserve %s: %s", self.path, err)
            return False
        _LOGGER.critical("%s: released the %d MiB disk reserve %s", why, BALLAST_BYTES // 2**20, self.path)
        return True


def _as_rejected(draft: Draft | Rejected, error: Exception, reason: str = "processing_error") -> Rejected:
    """An item that cannot be committed as an event, kept in quarantine with the error."""
    if isinstance(draft, Rejected):
        return Rejected(
            draft.driver,
            reason,
            f"{draft.reason}: {error!r}"[:1000],
            draft.size,
            draft.payload,
            draft.topic,
            draft.device_id,
            draft.ack,
            draft.origin,
        )
    return Rejected(
        draft.driver,
        reason,
        f"{draft.kind}: {error!r}"[:1000],
        len(draft.data_json),
        draft.data_json[:QUARANTINE_KEEP_BYTES],
        None,
        draft.device_id,
        draft.ack,
        draft.origin,
    )


def _merge(total: Committed | None, part: Committed | None) -> Committed | None:
    if total is None or part is None:
        return part or total
    for kind, count in part.kinds.items():
        total.kinds[kind] = total.kinds.get(kind, 0) + count
    for driver, count in part.duplicates_by_driver.items():
        total.duplicates_by_driver[driver] = total.duplicates_by_driver.get(driver, 0) + count
    total.first_seq = min(total.first_seq, part.first_seq) if total.bodies else part.first_seq
    total.last_seq = max(total.last_seq, part.last_seq)
    total.bodies += part.bodies
    total.rejected += part.rejected
    total.classes |= part.classes
    return total


def _keep_private(path: Path) -> None:
    """The journal holds staff ids and GPS fixes: its directory 0700 and its files 0600, where this process owns
    them (SQLite gives the -wal and -shm it creates later the database file's mode). A directory someone else
    owns (a volume mounted for us) is left as it is, with a warning if others can read it."""
    directory = path.parent
    uid = os.geteuid()
    try:
        st = directory.stat()
        if st.st_mode & 0o077:
            if st.st_uid == uid:
                directory.chmod(0o700)
            else:
                _LOGGER.warning("data directory %s can be read by other users: make it 0700", directory)
        for name in os.listdir(directory):
            file = directory / name
            fst = file.lstat()
            if stat.S_ISREG(fst.st_mode) and fst.st_mode & 0o077 and fst.st_uid == uid:
                file.chmod(0o600)
    except OSError as err:
        _LOGGER.warning("cannot make the data directory %s private: %s", directory, err)


def _meta_value(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _meta_last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(row[0]) if row else 0
