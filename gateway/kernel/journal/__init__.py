"""The journal: one SQLite database (WAL) and one writer that group-commits; the gateway's durable, ordered
event log, and the outbox HQ is fed from (docs/OUTBOX.md).

SQLite work runs on one dedicated thread, so the event loop never waits on fsync; reads for the uplink use a
second connection on their own thread (WAL lets readers run beside the writer).

The package, one module per job: ``items`` (what goes in and comes out), ``store`` (schema, connections,
migrations), ``core`` (what every part shares), ``health`` (stalls, damage found while running), ``backlog``
(outbox counters, HQ acknowledgements, eviction, TTL, disk reserve), ``writer`` (intake, group commit,
processors), ``opening`` (open and close, with recovery), ``recovery`` and ``salvage`` (damaged and missing
journals), ``datadir`` (seq reservation, lock file, disk reserve file), ``reader`` (named reads). Nothing outside
the package runs SQL on the journal's tables: it calls the methods and functions here.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any

from gateway.kernel.consumer import CURSOR_PREFIX
from gateway.kernel.journal.backlog import (
    BUDGET_HEADROOM,
    DISK_CHECK_S,
    DISK_SHARE,
    EVICT_CHUNK,
    PAGE_OVERHEAD,
    URGENT_EVICT_BYTES,
    pages_needed,
)
from gateway.kernel.journal.datadir import BALLAST_BYTES, BALLAST_FILE, Ballast
from gateway.kernel.journal.health import QUICK_CHECK_FIRST_S, QUICK_CHECK_S, RECOVERED_S, STALL_S
from gateway.kernel.journal.items import (
    QUARANTINE_KEEP_BYTES,
    QUARANTINE_TOPIC_CHARS,
    Committed,
    Draft,
    Extra,
    Rejected,
    Row,
)
from gateway.kernel.journal.opening import Opening
from gateway.kernel.journal.store import (
    CACHE_KIB,
    CLASS_INDEX,
    HANDLED_DAMAGE,
    PENDING_ALERT,
    SALVAGED_FROM,
    SCHEMA,
    IntakeReserveError,
    JournalCorruptError,
    JournalError,
    SeqReservationError,
    connect,
    key_committed,
)
from gateway.kernel.journal.writer import ACK_HOLD_S, QUEUE_LIMIT
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event, Processor

__all__ = [
    "ACK_HOLD_S",
    "BALLAST_BYTES",
    "BALLAST_FILE",
    "BUDGET_HEADROOM",
    "CACHE_KIB",
    "CLASS_INDEX",
    "DISK_CHECK_S",
    "DISK_SHARE",
    "EVICT_CHUNK",
    "HANDLED_DAMAGE",
    "PAGE_OVERHEAD",
    "PENDING_ALERT",
    "QUARANTINE_KEEP_BYTES",
    "QUARANTINE_TOPIC_CHARS",
    "QUEUE_LIMIT",
    "QUICK_CHECK_FIRST_S",
    "QUICK_CHECK_S",
    "RECOVERED_S",
    "SALVAGED_FROM",
    "SCHEMA",
    "STALL_S",
    "URGENT_EVICT_BYTES",
    "Ballast",
    "Committed",
    "Draft",
    "Extra",
    "IntakeReserveError",
    "Journal",
    "JournalCorruptError",
    "JournalError",
    "Processor",
    "Rejected",
    "Row",
    "SeqReservationError",
    "connect",
    "key_committed",
    "pages_needed",
]


class Journal(Opening):
    """The gateway's durable, ordered event log, and the outbox HQ is fed from (docs/OUTBOX.md).

    Built in layers (``core`` < ``health`` < ``backlog`` < ``writer`` < ``opening``, see their modules); the reads
    go to :attr:`reader`."""

    async def read_class(
        self, cls: int, after_seq: int, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Committed events of one class with seq > after_seq, in order, within the budgets (at least one)."""
        return await self.reader.read_class(cls, after_seq, max_events, max_bytes)

    async def read_range(
        self, first: int, last: int, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Events (any class) with first <= seq <= last still on disk, in order, within the budgets."""
        return await self.reader.read_range(first, last, max_events, max_bytes)

    async def read_after(self, after_seq: int, max_events: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Committed events with seq > after_seq, in order, within the count and byte budgets (at least one)."""
        return await self.reader.read_range(after_seq + 1, 2**63 - 1, max_events, max_bytes)

    async def seqs_between(self, first: int, last: int) -> list[int]:
        """The seqs first..last (inclusive) still on disk, in order (the uplink's resend)."""
        return await self.reader.seqs_between(first, last)

    async def last_synced_recorded_at(self) -> str | None:
        """``recorded_at`` of the newest event stamped while the clock was synchronised, or None (the
        downlink's floor for command times when it has carried out none yet)."""
        return await self.reader.last_synced_recorded_at()

    async def seq_of_dedup_key(self, key: str) -> int | None:
        """The seq of the event committed under dedup key ``key``, or None (never, or longer ago than
        ``journal.dedup_retention_days``)."""
        return await self.reader.seq_of_dedup_key(key)

    async def stock_on_hand(self, sku: str) -> Any:
        """The stock ledger's on-hand quantity of ``sku`` as stored in the journal, or None."""
        return await self.reader.stock_on_hand(sku)

    async def record(
        self, kind: str, model: StrictModel, key: str | None, driver: str = "gateway"
    ) -> int | None:
        """Commit an event the gateway makes (an outcome, an acknowledgement) under the dedup key ``key``, waiting
        for room in the queue and for the commit: its seq, or None when an event was committed under that key
        before."""
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seqs: list[int | None] = []

        def committed() -> None:
            if not settled.done():
                settled.set_result(None)

        body = model.model_dump_json().encode()
        draft = Draft(kind, None, body, model, dedup_key=key, ack=committed, driver=driver, done=seqs.append)
        while not self.submit(draft):
            room = asyncio.Event()
            self.when_below(QUEUE_LIMIT, room.set)
            await room.wait()
        await settled
        return seqs[0] if seqs else None

    async def events_after(
        self, seq: int, kinds: frozenset[str] | None, limit: int
    ) -> tuple[list[Event], int]:
        """For consumers (:mod:`gateway.kernel.consumer`): committed events above ``seq``, of ``kinds`` (or all),
        in seq order, at most ``limit``; and the seq through which they were looked for."""
        return await self.reader.events_after(seq, kinds, limit, self.last_seq)

    async def key_known(self, key: str) -> bool:
        """Whether an event was committed under dedup key ``key`` (within the dedup retention)."""
        return bool(await self.reader.query("SELECT 1 FROM idempotency WHERE key = ?", (key,)))

    def skipped_by(self, seq: int) -> str | None:
        """The processor that skipped this recently committed event (it failed on it: counted and reported),
        or None. For a caller that must tell its sender, right after the commit."""
        return self._pipeline.skipped_by(seq)

    async def cursor(self, name: str) -> int | None:
        """A consumer's cursor: the one waiting for the next commit, else the committed one, else None."""
        pending = self.pending_cursor(name)
        return pending if pending is not None else await self.reader.cursor(name)

    async def forget_cursors(self, prefix: str, keep: set[str]) -> int:
        """Drop the saved cursors of consumers named ``prefix…`` other than ``keep`` (those no longer configured),
        so that one configured again later starts at the journal's end, not where it stopped long ago. How many
        were dropped."""
        start = CURSOR_PREFIX + prefix

        def work(conn: sqlite3.Connection) -> tuple[int, list[Draft]]:
            names = [
                key
                for (key,) in conn.execute("SELECT key FROM meta")
                if key.startswith(start) and key[len(CURSOR_PREFIX) :] not in keep
            ]
            conn.executemany("DELETE FROM meta WHERE key = ?", [(key,) for key in names])
            return len(names), []

        return await self.transact(work)

    def dedup_seq(self, key: str) -> int | None:
        """The seq committed under ``key`` within the dedup retention (its event may be gone), or None. Reader
        thread: call from :meth:`query`'s executor, or tests."""
        return self.reader.dedup_seq(key)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read-only query on the reader connection (tests and the demo)."""
        return await self.reader.query(sql, params)
