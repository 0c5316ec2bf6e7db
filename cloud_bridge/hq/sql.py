"""The HQ receiver's database logic, written once for SQLite and PostgreSQL (their modules add a dialect).

Tables: ``events`` (every event once: primary key ``id``, unique ``(store_id, gateway_id, seq)``), ``gateways``
(per-gateway counters, ``max_seq``, ``complete_through`` and the lost watermark, resend bookkeeping), ``runs``
(the stored seqs of each gateway as contiguous runs, kept merged on every insert, so gaps cost the number of
gaps, not of events), ``explained`` (ranges a gateway reported evicted or possibly lost), ``anchors``
(``clock.synced`` anchors) and ``rejected`` (messages not stored, and why); beside them ``conflicts`` (events
that came under a seq another event holds), ``single_range`` (gateways asked one range per resend command) and
``subscriptions`` (each receiver's MQTT subscriptions, to drop the ones it no longer wants).

Receipts: ``events.receipt_no`` and ``events.original_receipt_no`` hold what a ``pos.sale`` or ``pos.return``
says (``data.receipt_no``; ``data.original_receipt_no`` of a return), filled from the envelope at insert, with
partial indexes, so proving that a receipt reached HQ (:meth:`SqlReceiverStore.receipt`) is an index lookup.
The columns came after schema 3 without a new schema number: they only add to it, so a receiver of before them
still opens the database and stores into it (leaving them NULL), and the first receiver with them adds and
fills them in its schema transaction (one pass over the events: during it, other receivers wait). Sales and
returns with ``receipt_no`` NULL (stored by such an older receiver) are read from their bodies by every
receipt lookup of their store (index ``events_receipt_unfilled``), so a lookup never misses one.

Several receivers may share one PostgreSQL database. Each batch first locks its gateway's row (an upsert),
so the events, runs and counters of one gateway are changed by one transaction at a time; the receiver
gives a transaction's batches sorted by (store, gateway), so two receivers take their locks in the same
order, and a deadlock (possible only through an event id forged into another gateway) is retried. Events
go in with ``ON CONFLICT DO NOTHING``: whoever inserts an event first stores it; everyone else counts a
duplicate (same id at that seq) or a conflict (a different id holds the seq, or the id is elsewhere).

A missing seq at or below ``complete_through`` is called lost only once HQ has known that watermark for a
grace period (:class:`LostWatermark`): with several receivers, the batch holding it may still be in another
receiver's queue. Classifying a gateway's gaps reads its runs and explained ranges; the result is kept per
gateway for as long as its event count and upper bound stay the same (both change with every stored event).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final, Protocol

import orjson

from cloud_bridge.commands import MAX_RESEND_RANGES as RESEND_MAX_RANGES
from cloud_bridge.commands import MAX_RESEND_SEQS as RESEND_MAX_SEQS
from cloud_bridge.hq.model import (
    LOST_GRACE_S,
    MAX_TEXT_ID,
    REPORT_KINDS,
    SINGLE_RANGE_COMMANDS,
    Anchor,
    BatchRejectedError,
    BatchToStore,
    ConflictRow,
    EventRow,
    EventTime,
    Explanation,
    GatewaySummary,
    LostWatermark,
    RejectedRow,
    Rejection,
    ReportError,
    ResendRequest,
    StoreResult,
    StoreUnavailableError,
    corrected_ns,
    event_rows,
    from_utc_ns,
    nearest_anchor,
    one_line,
    parse_report,
    parse_time,
)
from cloud_bridge.hq.ranges import (
    GapClasses,
    Range,
    classify_split,
    clip,
    merge,
    size,
    split_gaps,
)
from cloud_bridge.wire import MAX_SEQ, Batch
from gateway.kernel.outbox import seq_ranges

_LOGGER = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3
IN_CHUNK: Final = 500
"""Seqs per ``IN (...)`` list (SQLite limits bound parameters)."""
MAX_RESEND_GATEWAYS: Final = 1000
"""Gateways claimed per resend round: a round's work stays bounded with thousands of stores; the others are
claimed in the next round (oldest claim first)."""
GAP_CACHE_MAX_RANGES: Final = 1000
"""A gateway's classified gaps are kept in memory up to this many ranges (a forged pattern of a million gaps
is read again each time rather than held)."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    seq {int} NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    recorded_at {time} NOT NULL,
    received_at {time} NOT NULL,
    boot_id TEXT,
    mono_ns {int},
    clock_synced {bool},
    corrected_ns {int},
    anchor_mono_ns {int},
    corrected_at {corrected_at},
    body {blob} NOT NULL,
    receipt_no TEXT,
    original_receipt_no TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_store_gateway_seq ON events (store_id, gateway_id, seq);
CREATE INDEX IF NOT EXISTS events_unsynced ON events (store_id, gateway_id, boot_id) WHERE NOT clock_synced;
CREATE TABLE IF NOT EXISTS gateways (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    max_seq {int} NOT NULL DEFAULT 0,
    complete_through {int},
    events {int} NOT NULL DEFAULT 0,
    duplicates {int} NOT NULL DEFAULT 0,
    conflicts {int} NOT NULL DEFAULT 0,
    bad_reports {int} NOT NULL DEFAULT 0,
    newest_recorded_at {time},
    last_received_at {time},
    resend_at_ms {int},
    resend_commands {int} NOT NULL DEFAULT 0,
    mark_through {int} NOT NULL DEFAULT 0,
    mark_at {time},
    lost_through {int} NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, gateway_id)
);
CREATE TABLE IF NOT EXISTS runs (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    first_seq {int} NOT NULL,
    last_seq {int} NOT NULL,
    PRIMARY KEY (store_id, gateway_id, first_seq)
);
CREATE INDEX IF NOT EXISTS runs_last ON runs (store_id, gateway_id, last_seq);
CREATE TABLE IF NOT EXISTS explained (
    event_id TEXT NOT NULL,
    first_seq {int} NOT NULL,
    last_seq {int} NOT NULL,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (event_id, first_seq)
);
CREATE INDEX IF NOT EXISTS explained_gateway ON explained (store_id, gateway_id, first_seq);
CREATE TABLE IF NOT EXISTS anchors (
    event_id TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    mono_ns {int} NOT NULL,
    utc_ns {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS anchors_boot ON anchors (store_id, gateway_id, boot_id);
CREATE TABLE IF NOT EXISTS rejected (
    id {identity},
    received_at {time} NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size {int} NOT NULL
)
"""

POS_KINDS: Final = ("pos.sale", "pos.return")
"""The kinds that carry a receipt (docs/EVENTS.md)."""
_IS_POS: Final = "kind IN ('pos.sale', 'pos.return')"
"""The one spelling of "a sale or a return", in the unfilled index and the query that must match it."""
RECEIPT_COLUMNS: Final = ("receipt_no", "original_receipt_no")
_RECEIPT_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS events_receipt ON events (store_id, device_id, receipt_no)"
    " WHERE receipt_no IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_original_receipt ON events (store_id, original_receipt_no)"
    " WHERE original_receipt_no IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_receipt_unfilled ON events (store_id)"
    f" WHERE receipt_no IS NULL AND {_IS_POS}",
)
"""Created after the columns are filled (module docstring); ``IF NOT EXISTS``: every open runs them."""
RECEIPT_FILL_CHUNK: Final = 5000
"""Events read per step when the receipt columns are filled for an existing database."""
MAX_RECEIPT_EVENTS: Final = 100
"""Most events one receipt lookup returns per way of matching (a receipt has a sale and a few returns; more is
forged, and which ones come back then is arbitrary)."""
_RECEIPT_EVENT: Final = "id, store_id, gateway_id, seq, kind, device_id, received_at, corrected_ns, body"
"""The columns of a receipt lookup row (:meth:`SqlReceiverStore._receipt_event`)."""
_BY_RECEIPT: Final = (
    f"SELECT {_RECEIPT_EVENT} FROM events"  # noqa: S608 - constants
    " WHERE store_id = ? AND device_id = ? AND receipt_no = ? LIMIT ?"
)
_BY_ORIGINAL: Final = (
    f"SELECT {_RECEIPT_EVENT} FROM events"  # noqa: S608 - constants
    " WHERE store_id = ? AND original_receipt_no = ? LIMIT ?"
)
_UNFILLED: Final = (
    f"SELECT {_RECEIPT_EVENT} FROM events"  # noqa: S608 - constants
    f" WHERE store_id = ? AND receipt_no IS NULL AND {_IS_POS}"
)

_CONFLICTS: Final = """
CREATE TABLE IF NOT EXISTS conflicts (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    seq {int} NOT NULL,
    id TEXT NOT NULL,
    kept_id TEXT,
    kind TEXT NOT NULL,
    received_at {time} NOT NULL,
    body {blob} NOT NULL,
    PRIMARY KEY (store_id, gateway_id, seq, id)
)"""
"""Events that came under a seq another event id already holds (or whose id is stored at another seq): kept
here beside the stored one, never dropped. Created on every open (``IF NOT EXISTS``) rather than by a schema
number: it only adds, so an older receiver still opens the database (and does not fill it)."""
MAX_CONFLICTS_KEPT: Final = 10_000
"""Conflicting events kept per gateway: past this (a forged or broken gateway), they are counted and logged,
and the table stops growing for it."""
MAX_CONFLICT_BYTES_KEPT: Final = 64 * 1024 * 1024
"""Bytes of conflicting event bodies kept per gateway, the other cap: a body goes in whole while the gateway's
kept bodies stay within it; past it, conflicts are counted and logged, not kept (as past MAX_CONFLICTS_KEPT)."""
_SINGLE_RANGE: Final = """
CREATE TABLE IF NOT EXISTS single_range (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    marked_at_ms {int} NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (store_id, gateway_id)
)"""
"""Gateways that refused a multi-range ``resend`` (a release of before ``ranges``): asked one range per command.
Created on every open, like ``conflicts``."""
SINGLE_RANGE_RECHECK_S: Final = 7 * 24 * 3600.0
"""A gateway marked single-range is tried with a multi-range command again after this (it may have been
upgraded); refused again, it is marked again."""
_SUBSCRIPTIONS: Final = """
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    PRIMARY KEY (client_id, topic)
)"""
"""The topic filters each receiver (by MQTT client id) has subscribed in its persistent session, so a receiver
started with other ``--stores`` (or share group) unsubscribes the ones it no longer wants: a broker keeps a
session's subscriptions, and MQTT cannot list them."""
_INSERT_CONFLICT: Final = (
    "INSERT INTO conflicts (store_id, gateway_id, seq, id, kept_id, kind, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)

_WATERMARK_COLUMNS: Final = "complete_through, last_received_at, mark_through, mark_at, lost_through"
"""The columns of :class:`LostWatermark`, in its order (``_LOCK_GATEWAY`` returns them after max_seq)."""
_LOCK_GATEWAY: Final = (
    "INSERT INTO gateways (store_id, gateway_id) VALUES (?, ?)"
    " ON CONFLICT (store_id, gateway_id) DO UPDATE SET store_id = excluded.store_id"
    " RETURNING max_seq, complete_through, last_received_at, mark_through, mark_at, lost_through"
)
"""Creates the gateway's row or locks it (a no-op update takes the row lock) and reads its watermarks."""
_INSERT_EVENT: Final = (
    "INSERT INTO events (id, store_id, gateway_id, seq, kind, device_id, recorded_at, received_at,"
    " boot_id, mono_ns, clock_synced, body, receipt_no, original_receipt_no)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_UPDATE_GATEWAY: Final = (
    "UPDATE gateways SET max_seq = ?, complete_through = ?, events = events + ?, duplicates = duplicates + ?,"
    " conflicts = conflicts + ?, bad_reports = bad_reports + ?,"
    " newest_recorded_at = coalesce(?, newest_recorded_at), last_received_at = ?,"
    " mark_through = ?, mark_at = ?, lost_through = ?"
    " WHERE store_id = ? AND gateway_id = ?"
)
_APPLY_ANCHOR: Final = """
UPDATE events SET corrected_ns = ? - (? - mono_ns), anchor_mono_ns = ?
WHERE store_id = ? AND gateway_id = ? AND boot_id = ? AND NOT clock_synced AND mono_ns IS NOT NULL
  AND (anchor_mono_ns IS NULL OR abs(anchor_mono_ns - mono_ns) > abs(? - mono_ns)
       OR (abs(anchor_mono_ns - mono_ns) = abs(? - mono_ns) AND anchor_mono_ns > ?))
"""
"""Applies an anchor to every unsynced event of its boot it is nearer to than their current one (the rule of
``nearest_anchor``), so anchors and events may arrive in any order."""
_CLAIM_RESEND: Final = (
    "UPDATE gateways SET resend_at_ms = ?, resend_commands = resend_commands + ?"
    " WHERE store_id = ? AND gateway_id = ? AND (resend_at_ms IS NULL OR resend_at_ms <= ?)"
)
_GATEWAY_ROW: Final = f"store_id, gateway_id, events, max_seq, {_WATERMARK_COLUMNS}"
"""The columns of :class:`_GatewayRow`, in its order."""
_GATEWAYS: Final = (
    f"SELECT {_GATEWAY_ROW}, duplicates, conflicts, bad_reports, newest_recorded_at"  # noqa: S608 - constants
    " FROM gateways ORDER BY store_id, gateway_id"
)
_UPGRADE_2: Final = (
    "ALTER TABLE gateways ADD COLUMN mark_through {int} NOT NULL DEFAULT 0",
    "ALTER TABLE gateways ADD COLUMN mark_at {time}",
    "ALTER TABLE gateways ADD COLUMN lost_through {int} NOT NULL DEFAULT 0",
    "UPDATE gateways SET lost_through = coalesce(complete_through, 0)",  # what schema 2 called lost
    "UPDATE meta SET value = '3' WHERE key = 'schema'",
)
"""Schema 2 to 3: when missing seqs count as lost (issue #3 review)."""
_TOUCHED_RUNS: Final = (
    "SELECT first_seq, last_seq FROM runs"
    " WHERE store_id = ? AND gateway_id = ? AND last_seq >= ? AND first_seq <= ?"
)
_DELETE_TOUCHED_RUNS: Final = (
    "DELETE FROM runs WHERE store_id = ? AND gateway_id = ? AND last_seq >= ? AND first_seq <= ?"
)


class Cursor(Protocol):
    """The DB-API cursor surface both drivers share."""

    rowcount: int

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, sql: Any, params: Any, /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the databases; the SQL above is written with ``?`` placeholders."""

    begin_write: str
    begin_read: str
    types: dict[str, str]
    placeholder: str = "?"


@dataclass(frozen=True, slots=True)
class _GatewayRow:
    store_id: str
    gateway_id: str
    events: int
    max_seq: int
    complete_through: int | None
    watermark: LostWatermark

    @property
    def upper(self) -> int:
        """Seqs 1..upper should be at HQ: up to the highest stored, or promised complete if higher."""
        return max(self.max_seq, self.complete_through or 0)

    @property
    def key(self) -> tuple[str, str]:
        return self.store_id, self.gateway_id


RECEIPT_MATCH: Final = "receipt_no"
"""How an event matched a receipt lookup: it is the receipt (its device and ``receipt_no``)..."""
RETURN_MATCH: Final = "original_receipt_no"
"""... or a ``pos.return`` of the store (any device) whose ``original_receipt_no`` names it."""


@dataclass(frozen=True, slots=True)
class ReceiptEvent:
    """One stored event a receipt lookup found; times as HQ holds them."""

    match: str
    """:data:`RECEIPT_MATCH` or :data:`RETURN_MATCH`."""
    store_id: str
    gateway_id: str
    seq: int
    kind: str
    id: str
    device_id: str | None
    receipt_no: str | None
    original_receipt_no: str | None
    register_id: str | None
    occurred_at: str | None
    """The till's clock, as the envelope says (with the till's UTC offset)."""
    recorded_at: str
    """The gateway's clock at commit, as the envelope says."""
    corrected_at: datetime | None
    """``recorded_at`` corrected by a ``clock.synced`` anchor (an event committed before the clock synced)."""
    received_at: datetime
    """When HQ stored it (the receiver's clock)."""


@dataclass(frozen=True, slots=True)
class GatewayCompleteness:
    """What HQ is missing of one gateway's seqs 1..``through_seq``."""

    store_id: str
    gateway_id: str
    holds_receipt: bool
    """Whether the receipt itself is among this gateway's events: ``through_seq`` is then its (highest) seq;
    otherwise the highest seq of a return naming it, or, when HQ has no such receipt, the gateway's upper
    bound (highest stored or promised seq)."""
    through_seq: int
    gaps: GapClasses
    """Missing seqs in 1..through_seq, by class."""

    @property
    def missing(self) -> int:
        return size(self.gaps.gaps)


@dataclass(frozen=True, slots=True)
class ReceiptProof:
    """What HQ holds for one receipt of one device of a store (:meth:`SqlReceiverStore.receipt`)."""

    store_id: str
    device_id: str
    receipt_no: str
    events: list[ReceiptEvent]
    """Its own events (``match`` = receipt_no) and returns naming it, by gateway and seq."""
    gateways: list[GatewayCompleteness]
    """Each gateway holding one of ``events``; when the receipt is not found, every gateway of the store."""

    @property
    def found(self) -> bool:
        return any(e.match == RECEIPT_MATCH for e in self.events)

    @property
    def lost_below(self) -> bool:
        """A seq up to the receipt's own, of a gateway holding it, is lost (not explained or pending)."""
        return any(g.gaps.lost for g in self.gateways if g.holds_receipt)


def receipt_fields(kind: str, event: dict[str, Any]) -> tuple[str | None, str | None]:
    """(receipt_no, original_receipt_no) of a sale or return, each None when absent or not a receipt number
    (a string of 1..64 characters without NUL): what the receipt columns hold."""
    if kind not in POS_KINDS:
        return None, None
    data = event.get("data")
    if not isinstance(data, dict):
        return None, None
    original = data.get("original_receipt_no") if kind == "pos.return" else None
    return _receipt_text(data.get("receipt_no")), _receipt_text(original)


def _receipt_text(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_TEXT_ID and "\x00" not in value:
        return value
    return None


class SqlReceiverStore:
    """Receiver storage over a DB-API connection; subclasses connect and name their :class:`Dialect`.

    All methods are thread-safe (one lock around the one connection): the receiver calls them from a worker
    thread, reports may come from any thread.
    """

    dialect: ClassVar[Dialect]
    db_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, *, lost_grace_s: float = LOST_GRACE_S) -> None:
        self._lock = threading.Lock()
        self._sql_cache: dict[str, str] = {}
        self._grace = timedelta(seconds=lost_grace_s)
        self._gaps: dict[tuple[str, str], tuple[tuple[int, int], list[Range], list[Range]]] = {}
        """(store, gateway) -> ((events, upper) they were read at, explained gaps, other gaps)."""
        self._nothing_lost: dict[tuple[str, str], tuple[_GatewayRow, datetime | None]] = {}
        """(store, gateway) -> (its row when a resend round found none of its missing seqs lost, the time up to
        which that holds unless the row changes): later rounds skip it without reading its gaps."""
        self._conn: Any = None
        with self._lock:
            self._conn = self._connect()
        try:
            self._create_schema()
        except BaseException:
            self._conn.close()
            raise

    # --- what a backend provides ------------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _ensure_connected(self) -> None:
        """Reconnect if the connection was lost (PostgreSQL); SQLite has nothing to do."""

    def _is_data_error(self, err: Exception) -> bool:
        """Whether a database error is about one batch's data (reject it), not the database (retry)."""
        raise NotImplementedError

    def _time_param(self, value: datetime) -> Any:
        raise NotImplementedError

    def _in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """SQL testing ``column`` against values, and its parameters (at most IN_CHUNK values)."""
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    def _schema_lock(self, cur: Cursor) -> None:
        """Serialise schema creation between receivers starting together (PostgreSQL)."""

    def _column_exists(self, cur: Cursor, table: str, column: str) -> bool:
        raise NotImplementedError

    # --- plumbing ---------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _sql(self, text: str) -> str:
        cached = self._sql_cache.get(text)
        if cached is None:
            cached = self._sql_cache[text] = text.replace("?", self.dialect.placeholder)
        return cached

    def _x(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur.execute(self._sql(sql), params)
        return cur

    def _rows(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._x(cur, sql, params).fetchall()

    @contextmanager
    def _session(self) -> Iterator[Cursor]:
        """The connection under the lock; database failures become :class:`StoreUnavailableError`."""
        with self._lock:
            try:
                self._ensure_connected()
                yield self._conn.cursor()
            except self.db_errors as err:
                raise StoreUnavailableError(one_line(err)) from err

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Cursor]:
        with self._session() as cur:
            cur.execute(begin)
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                self._rollback(cur)
                raise

    def _rollback(self, cur: Cursor) -> None:
        try:
            cur.execute("ROLLBACK")
        except self.db_errors:
            _LOGGER.debug("rollback failed (the connection is gone?)", exc_info=True)

    def _create_schema(self) -> None:
        with self._transaction(self.dialect.begin_write) as cur:
            self._schema_lock(cur)
            row = None
            if self._table_exists(cur, "meta"):
                row = self._x(cur, "SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is not None and int(row[0]) == 2:
                for statement in _UPGRADE_2:
                    cur.execute(statement.format(**self.dialect.types))
                _LOGGER.info("upgraded the receiver database from schema 2 to %d", SCHEMA_VERSION)
            elif row is not None and int(row[0]) != SCHEMA_VERSION:
                raise StoreUnavailableError(f"database schema {row[0]}, this receiver needs {SCHEMA_VERSION}")
            if row is None and self._table_exists(cur, "events"):
                self._upgrade_v1(cur)
            else:
                self._create_tables(cur)
            if row is None:
                self._x(cur, "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._add_receipt_columns(cur)
            for table in (_CONFLICTS, _SINGLE_RANGE, _SUBSCRIPTIONS):
                cur.execute(table.format(**self.dialect.types))

    def _add_receipt_columns(self, cur: Cursor) -> None:
        """Add and fill the receipt columns of a database made before them, then (always) their indexes."""
        if not self._column_exists(cur, "events", "receipt_no"):
            for column in RECEIPT_COLUMNS:
                cur.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
            filled = self._fill_receipt_columns(cur)
            _LOGGER.info("added the receipt columns to the receiver database (%d sales and returns)", filled)
        for statement in _RECEIPT_INDEXES:
            cur.execute(statement)

    def _fill_receipt_columns(self, cur: Cursor) -> int:
        """One pass over the events in id order, a chunk at a time (a big database need not fit in memory)."""
        after, filled = "", 0
        while True:
            rows = self._rows(
                cur,
                f"SELECT id, kind, body FROM events WHERE id > ? AND {_IS_POS}"  # noqa: S608 - constants
                " ORDER BY id LIMIT ?",
                (after, RECEIPT_FILL_CHUNK),
            )
            if not rows:
                return filled
            updates = []
            for event_id, kind, body in rows:
                try:
                    event = orjson.loads(bytes(body))
                except orjson.JSONDecodeError:
                    continue  # not ours to judge now: it stays unfilled, and lookups read it
                fields = receipt_fields(kind, event) if isinstance(event, dict) else (None, None)
                if fields != (None, None):
                    updates.append((*fields, event_id))
            if updates:
                cur.executemany(
                    self._sql("UPDATE events SET receipt_no = ?, original_receipt_no = ? WHERE id = ?"),
                    updates,
                )
            filled += len(rows)
            after = rows[-1][0]

    def _create_tables(self, cur: Cursor) -> None:
        for statement in _SCHEMA.format(**self.dialect.types).split(";"):
            cur.execute(statement)

    def _upgrade_v1(self, cur: Cursor) -> None:
        """Bring a database of the receiver before issue #3 (schema 1, SQLite only) up to date."""
        raise StoreUnavailableError("this database has an events table but no schema version: not ours?")

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        raise NotImplementedError

    # --- writing ----------------------------------------------------------------------------------------

    def store_batch(self, topic_store_id: str, topic_gateway_id: str, batch: Batch) -> StoreResult:
        """Store one batch in one transaction; a bad batch raises :class:`BatchRejectedError`."""
        with self._transaction(self.dialect.begin_write) as cur:
            item = BatchToStore("", 0, topic_store_id, topic_gateway_id, batch)
            now = datetime.now(UTC)
            return self._store(cur, item, now, self._time_param(now))

    def record_rejected(self, topic: str, reason: str, size: int) -> None:
        self.apply([Rejection(topic, reason, size)])

    def apply(self, items: Iterable[BatchToStore | Rejection]) -> list[StoreResult | Rejection]:
        """Store several messages in one transaction: batches are stored or rejected, rejections recorded.

        ``items`` is consumed inside the transaction, so a generator can decode one batch at a time. Give
        them sorted by (store, gateway) when several receivers share the database (see the module docstring).
        """
        now = datetime.now(UTC)
        received_at = self._time_param(now)
        results: list[StoreResult | Rejection] = []
        with self._transaction(self.dialect.begin_write) as cur:
            for item in items:
                result = (
                    self._apply_one(cur, item, now, received_at) if isinstance(item, BatchToStore) else item
                )
                if isinstance(result, Rejection):
                    self._record(cur, result, received_at)
                results.append(result)
        return results

    def _apply_one(
        self, cur: Cursor, item: BatchToStore, now: datetime, received_at: Any
    ) -> StoreResult | Rejection:
        """One batch inside a savepoint: a batch that cannot be stored leaves no trace but its rejection."""
        cur.execute("SAVEPOINT batch")
        try:
            result = self._store(cur, item, now, received_at)
        except BatchRejectedError as err:
            reason = str(err)
        except self.db_errors as err:
            if not self._is_data_error(err):
                raise
            reason = f"cannot store: {one_line(err)}"[:500]
        except Exception as err:
            reason = f"cannot store: {err!r}"[:500]
        else:
            cur.execute("RELEASE SAVEPOINT batch")
            return result
        cur.execute("ROLLBACK TO SAVEPOINT batch")
        cur.execute("RELEASE SAVEPOINT batch")
        return Rejection(item.topic, reason, item.size)

    def _record(self, cur: Cursor, rejection: Rejection, received_at: Any) -> None:
        topic, reason = (text.replace("\x00", "\\x00") for text in (rejection.topic, rejection.reason))
        self._x(
            cur,
            "INSERT INTO rejected (received_at, topic, reason, size) VALUES (?, ?, ?, ?)",
            (received_at, topic, reason, rejection.size),
        )
        _LOGGER.info("rejected a message on %s (%d bytes): %s", topic, rejection.size, reason)

    def _store(self, cur: Cursor, item: BatchToStore, now: datetime, received_at: Any) -> StoreResult:
        """One batch; ``received_at`` is ``now`` as the database takes it."""
        key = (item.store_id, item.gateway_id)
        rows = event_rows(item.store_id, item.gateway_id, item.batch)
        max_seq, *marks = self._x(cur, _LOCK_GATEWAY, key).fetchone()
        watermark = self._watermark(marks)
        complete_through = watermark.complete_through if marks[0] is not None else None
        unique: dict[int, EventRow] = {}
        duplicates = conflicts = 0
        clashes: list[tuple[EventRow, str | None]] = []
        for row in rows:  # schema 1 batches may repeat a seq
            kept = unique.setdefault(row.seq, row)
            if kept is not row:
                duplicates += kept.id == row.id
                if kept.id != row.id:
                    conflicts += 1
                    clashes.append((row, kept.id))
        reports = [r for r in unique.values() if r.kind in REPORT_KINDS]
        known = self._known_ids(cur, [r.id for r in reports])
        cur.executemany(
            self._sql(_INSERT_EVENT), [self._event_params(key, r, received_at) for r in unique.values()]
        )
        new = cur.rowcount
        if new == len(unique):  # the usual case: everything was new, so everything is ours
            stored = {seq: row.id for seq, row in unique.items()}
        else:
            stored = self._stored_ids(cur, key, sorted(unique))
        ours = [r for r in unique.values() if stored.get(r.seq) == r.id]
        for row in unique.values():
            if stored.get(row.seq) != row.id:
                conflicts += 1
                self._log_conflict(key, row, stored.get(row.seq))
                clashes.append((row, stored.get(row.seq)))
        if clashes:
            self._keep_conflicts(cur, key, clashes, received_at)
        duplicates += len(ours) - new
        ours_ids = {r.id for r in ours}
        bad = sum(self._apply_report(cur, key, r) for r in reports if r.id not in known and r.id in ours_ids)
        self._correct_clock(cur, key, [r for r in ours if r.clock_synced is False and r.mono_ns is not None])
        newest: str | None = None
        if stored:
            self._merge_runs(cur, key, sorted(stored))
            top = max(stored)
            if top > max_seq:
                max_seq = top
                newest = unique[top].recorded_at if stored[top] == unique[top].id else None
        through = item.batch.complete_through
        if through is not None and (complete_through is None or through > complete_through):
            complete_through = through
        after = watermark.after_batch(complete_through or 0, now, self._grace)
        mark_at = received_at if after.mark_at is now else marks[3]  # as stored, or now
        self._x(
            cur,
            _UPDATE_GATEWAY,
            (
                max_seq,
                complete_through,
                new,
                duplicates,
                conflicts,
                bad,
                newest,
                received_at,
                after.mark_through,
                mark_at,
                after.lost_through,
                *key,
            ),
        )
        return StoreResult(new, duplicates, conflicts)

    def _watermark(self, columns: Sequence[Any]) -> LostWatermark:
        """A :class:`LostWatermark` from the ``_WATERMARK_COLUMNS`` of a gateway row."""
        through, received, mark_through, mark_at, lost_through = columns
        return LostWatermark(
            int(through or 0),
            None if received is None else self._time_value(received),
            int(mark_through),
            None if mark_at is None else self._time_value(mark_at),
            int(lost_through),
        )

    def _gateway_row(self, row: Sequence[Any]) -> _GatewayRow:
        """A :class:`_GatewayRow` from the ``_GATEWAY_ROW`` columns."""
        store_id, gateway_id, events, max_seq, through = row[:5]
        return _GatewayRow(
            store_id,
            gateway_id,
            int(events),
            int(max_seq),
            None if through is None else int(through),
            self._watermark(row[4:9]),
        )

    def _event_params(self, key: tuple[str, str], row: EventRow, received_at: Any) -> tuple[Any, ...]:
        return (
            row.id,
            *key,
            row.seq,
            row.kind,
            row.device_id,
            row.recorded_at,
            received_at,
            row.boot_id,
            row.mono_ns,
            row.clock_synced,
            row.body,
            *receipt_fields(row.kind, row.event),
        )

    def _known_ids(self, cur: Cursor, ids: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(ids), IN_CHUNK):
            test, params = self._in_list("id", ids[i : i + IN_CHUNK])
            known.update(r[0] for r in self._rows(cur, f"SELECT id FROM events WHERE {test}", params))  # noqa: S608 - placeholders only
        return known

    def _stored_ids(self, cur: Cursor, key: tuple[str, str], seqs: Sequence[int]) -> dict[int, str]:
        """seq -> id of what is stored now at these seqs of the gateway."""
        stored: dict[int, str] = {}
        for i in range(0, len(seqs), IN_CHUNK):
            test, params = self._in_list("seq", seqs[i : i + IN_CHUNK])
            sql = f"SELECT seq, id FROM events WHERE store_id = ? AND gateway_id = ? AND {test}"  # noqa: S608
            stored.update((int(s), str(e)) for s, e in self._rows(cur, sql, [*key, *params]))
        return stored

    def _keep_conflicts(
        self,
        cur: Cursor,
        key: tuple[str, str],
        clashes: Sequence[tuple[EventRow, str | None]],
        received_at: Any,
    ) -> None:
        """Store conflicting events beside the kept ones (table ``conflicts``), up to MAX_CONFLICTS_KEPT events
        and MAX_CONFLICT_BYTES_KEPT bytes of bodies per gateway; the same conflicting event received again is
        stored once."""
        held, held_bytes = self._x(
            cur,
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM conflicts WHERE store_id = ? AND gateway_id = ?",
            key,
        ).fetchone()
        rows: list[tuple[Any, ...]] = []
        room, budget = MAX_CONFLICTS_KEPT - int(held), MAX_CONFLICT_BYTES_KEPT - int(held_bytes)
        for r, kept in clashes:
            if len(rows) >= room or len(r.body) > budget:
                break
            rows.append((*key, r.seq, r.id, kept, r.kind, received_at, r.body))
            budget -= len(r.body)
        if len(rows) < len(clashes):
            _LOGGER.warning(
                "conflict: store %s gateway %s has %d conflicting events (%d bytes) kept already; counting, not"
                " keeping, %d more",
                *key,
                int(held),
                int(held_bytes),
                len(clashes) - len(rows),
            )
        cur.executemany(self._sql(_INSERT_CONFLICT), rows)

    def conflicts(self, limit: int = 100) -> list[ConflictRow]:
        """Conflicting events kept (newest seqs first per gateway), at most ``limit``."""
        with self._session() as cur:
            rows = self._rows(
                cur,
                "SELECT store_id, gateway_id, seq, id, kept_id, kind, received_at FROM conflicts"
                " ORDER BY store_id, gateway_id, seq LIMIT ?",
                (limit,),
            )
        return [
            ConflictRow(
                str(a), str(b), int(c), str(d), None if e is None else str(e), str(f), self._time_value(g)
            )
            for a, b, c, d, e, f, g in rows
        ]

    @staticmethod
    def _log_conflict(key: tuple[str, str], row: EventRow, kept: str | None) -> None:
        if kept is None:
            _LOGGER.warning(
                "conflict: store %s gateway %s seq %d: event id %s is already stored elsewhere; kept it in"
                " conflicts",
                *key,
                row.seq,
                row.id,
            )
        else:
            _LOGGER.warning(
                "conflict: store %s gateway %s seq %d already holds event %s; kept event %s in conflicts",
                *key,
                row.seq,
                kept,
                row.id,
            )

    def _apply_report(self, cur: Cursor, key: tuple[str, str], row: EventRow) -> int:
        """Store what a new report event says; returns 1 if its data is unusable (counted), else 0."""
        try:
            report = parse_report(row)
        except ReportError as err:
            _LOGGER.warning("store %s gateway %s seq %d (%s): %s", *key, row.seq, row.kind, err)
            return 1
        if isinstance(report, Explanation):
            cur.executemany(
                self._sql(
                    "INSERT INTO explained (event_id, first_seq, last_seq, store_id, gateway_id, source)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                ),
                [(row.id, a, b, *key, report.source) for a, b in report.ranges],
            )
        elif isinstance(report, Anchor):
            self._x(
                cur,
                "INSERT INTO anchors (event_id, store_id, gateway_id, boot_id, mono_ns, utc_ns)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (row.id, *key, report.boot_id, report.mono_ns, report.utc_ns),
            )
            mono = report.mono_ns
            self._x(cur, _APPLY_ANCHOR, (report.utc_ns, mono, mono, *key, report.boot_id, mono, mono, mono))
        return 0

    def _correct_clock(self, cur: Cursor, key: tuple[str, str], rows: Sequence[EventRow]) -> None:
        """Corrected times for unsynced events whose boot already has anchors (anchor first, events later)."""
        by_boot: dict[str, list[EventRow]] = defaultdict(list)
        for row in rows:
            if row.boot_id is not None:
                by_boot[row.boot_id].append(row)
        for boot_id, boot_rows in by_boot.items():
            anchors = [
                (int(m), int(u))
                for m, u in self._rows(
                    cur,
                    "SELECT mono_ns, utc_ns FROM anchors WHERE store_id = ? AND gateway_id = ? AND boot_id = ?"
                    " ORDER BY mono_ns",
                    (*key, boot_id),
                )
            ]
            if not anchors:
                continue
            updates = []
            for row in boot_rows:
                assert row.mono_ns is not None
                anchor = nearest_anchor(anchors, row.mono_ns)
                updates.append((corrected_ns(anchor, row.mono_ns), anchor[0], row.id))
            cur.executemany(
                self._sql("UPDATE events SET corrected_ns = ?, anchor_mono_ns = ? WHERE id = ?"), updates
            )

    def _merge_runs(self, cur: Cursor, key: tuple[str, str], seqs: Sequence[int]) -> None:
        """Add stored seqs to the gateway's runs: read the runs they touch, write back the merged ones."""
        added = [(a, b) for a, b in seq_ranges(seqs)]
        low, high = max(added[0][0] - 1, 0), min(added[-1][1] + 1, MAX_SEQ)
        old = [(int(a), int(b)) for a, b in self._rows(cur, _TOUCHED_RUNS, (*key, low, high))]
        merged = merge([*old, *added])
        if merged == sorted(old):
            return
        self._x(cur, _DELETE_TOUCHED_RUNS, (*key, low, high))
        cur.executemany(
            self._sql("INSERT INTO runs (store_id, gateway_id, first_seq, last_seq) VALUES (?, ?, ?, ?)"),
            [(*key, a, b) for a, b in merged],
        )

    # --- reading ----------------------------------------------------------------------------------------

    def count(self) -> int:
        with self._session() as cur:
            (n,) = self._x(cur, "SELECT count(*) FROM events").fetchone()
        return int(n)

    def _store_of(self, cur: Cursor, gateway_id: str, store_id: str | None) -> str:
        """Gateway ids are unique within a store only: name the store, or let us find the one that has it."""
        if store_id is not None:
            return store_id
        stores = [
            s for (s,) in self._rows(cur, "SELECT store_id FROM gateways WHERE gateway_id = ?", (gateway_id,))
        ]
        if len(stores) > 1:
            raise ValueError(f"gateway {gateway_id!r} exists in stores {sorted(stores)}: name the store")
        return str(stores[0]) if stores else ""

    def _gateway(self, cur: Cursor, gateway_id: str, store_id: str | None) -> _GatewayRow | None:
        store = self._store_of(cur, gateway_id, store_id)
        row = self._x(
            cur,
            f"SELECT {_GATEWAY_ROW} FROM gateways WHERE store_id = ? AND gateway_id = ?",  # noqa: S608
            (store, gateway_id),
        ).fetchone()
        return None if row is None else self._gateway_row(row)

    def _classes(self, cur: Cursor, gw: _GatewayRow, now: datetime) -> GapClasses:
        """Classify a gateway's missing seqs; a gateway with every seq stored costs no query, and one whose
        events did not change since the last time costs none either (its gaps are kept)."""
        if gw.events >= gw.upper:
            self._gaps.pop(gw.key, None)
            return GapClasses()
        version = (gw.events, gw.upper)
        kept = self._gaps.get(gw.key)
        if kept is not None and kept[0] == version:
            covered, rest = kept[1], kept[2]
        else:
            runs = self._rows(
                cur,
                "SELECT first_seq, last_seq FROM runs WHERE store_id = ? AND gateway_id = ? ORDER BY first_seq",
                gw.key,
            )
            explained = self._rows(
                cur,
                "SELECT first_seq, last_seq FROM explained"
                " WHERE store_id = ? AND gateway_id = ? AND first_seq <= ?",
                (*gw.key, gw.upper),
            )
            covered, rest = split_gaps(
                [(int(a), int(b)) for a, b in runs], [(int(a), int(b)) for a, b in explained], gw.upper
            )
            if len(covered) + len(rest) <= GAP_CACHE_MAX_RANGES:
                self._gaps[gw.key] = (version, covered, rest)
            else:
                self._gaps.pop(gw.key, None)
        return classify_split(covered, rest, gw.upper, gw.watermark.at(now, self._grace))

    def classes(
        self, gateway_id: str, store_id: str | None = None, now: datetime | None = None
    ) -> GapClasses:
        """A gateway's missing seqs at ``now`` (default: now): explained, lost and pending ranges."""
        with self._transaction(self.dialect.begin_read) as cur:
            gw = self._gateway(cur, gateway_id, store_id)
            return GapClasses() if gw is None else self._classes(cur, gw, now or datetime.now(UTC))

    def gaps(self, gateway_id: str, store_id: str | None = None) -> list[Range]:
        """Missing seq ranges (first, last), inclusive, in 1..max(highest stored seq, complete_through)."""
        return self.classes(gateway_id, store_id).gaps

    def events(
        self, gateway_id: str, after_seq: int = 0, limit: int = 1000, store_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored envelopes of a gateway in seq order, parsed."""
        with self._session() as cur:
            store = self._store_of(cur, gateway_id, store_id)
            bodies = self._rows(
                cur,
                "SELECT body FROM events WHERE store_id = ? AND gateway_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (store, gateway_id, after_seq, limit),
            )
        return [orjson.loads(bytes(body)) for (body,) in bodies]

    def event_times(
        self, gateway_id: str, after_seq: int = 0, limit: int = 1000, store_id: str | None = None
    ) -> list[EventTime]:
        """recorded_at, clock_synced and corrected_at of a gateway's events in seq order."""
        with self._session() as cur:
            store = self._store_of(cur, gateway_id, store_id)
            rows = self._rows(
                cur,
                "SELECT seq, recorded_at, clock_synced, corrected_ns FROM events"
                " WHERE store_id = ? AND gateway_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (store, gateway_id, after_seq, limit),
            )
        return [
            EventTime(
                int(seq),
                self._time_value(recorded),
                None if synced is None else bool(synced),
                None if ns is None else from_utc_ns(int(ns)),
            )
            for seq, recorded, synced, ns in rows
        ]

    def receipt(
        self, store_id: str, device_id: str, receipt_no: str, now: datetime | None = None
    ) -> ReceiptProof:
        """What HQ holds for a receipt: the device's sales and returns with this ``receipt_no``, the store's
        returns naming it as ``original_receipt_no``, and what HQ misses of the seqs of each gateway holding
        them up to the receipt (gap classes at ``now``), all from one snapshot.

        Index lookups (events_receipt, events_original_receipt), plus the bodies of the store's sales and
        returns an older receiver stored without the receipt columns (events_receipt_unfilled; usually
        none)."""
        now = now or datetime.now(UTC)
        with self._transaction(self.dialect.begin_read) as cur:
            rows: dict[str, Sequence[Any]] = {}
            for sql, params in (
                (_BY_RECEIPT, (store_id, device_id, receipt_no, MAX_RECEIPT_EVENTS)),
                (_BY_ORIGINAL, (store_id, receipt_no, MAX_RECEIPT_EVENTS)),
                (_UNFILLED, (store_id,)),
            ):
                for row in self._rows(cur, sql, params):
                    rows.setdefault(str(row[0]), row)
            found = [self._receipt_event(row, device_id, receipt_no) for row in rows.values()]
            events = sorted((e for e in found if e is not None), key=lambda e: (e.gateway_id, e.seq, e.id))
            gateways = self._receipt_gateways(cur, store_id, events, now)
        return ReceiptProof(store_id, device_id, receipt_no, events, gateways)

    def _receipt_event(self, row: Sequence[Any], device_id: str, receipt_no: str) -> ReceiptEvent | None:
        """The row as a :class:`ReceiptEvent` if its body matches the lookup (an unfilled row may not)."""
        event_id, store_id, gateway_id, seq, kind, device, received_at, corrected, body = row
        try:
            event = orjson.loads(bytes(body))
        except orjson.JSONDecodeError:
            return None
        if kind not in POS_KINDS or not isinstance(event, dict):
            return None
        own, original = receipt_fields(kind, event)
        if device == device_id and own == receipt_no:
            match = RECEIPT_MATCH
        elif original == receipt_no:
            match = RETURN_MATCH
        else:
            return None
        data = event["data"]
        register, occurred, recorded = (
            data.get("register_id"),
            event.get("occurred_at"),
            event.get("recorded_at"),
        )
        return ReceiptEvent(
            match=match,
            store_id=str(store_id),
            gateway_id=str(gateway_id),
            seq=int(seq),
            kind=str(kind),
            id=str(event_id),
            device_id=None if device is None else str(device),
            receipt_no=own,
            original_receipt_no=original,
            register_id=register if isinstance(register, str) else None,
            occurred_at=occurred if isinstance(occurred, str) else None,
            recorded_at=str(recorded),
            corrected_at=None if corrected is None else from_utc_ns(int(corrected)),
            received_at=self._time_value(received_at),
        )

    def _receipt_gateways(
        self, cur: Cursor, store_id: str, events: Sequence[ReceiptEvent], now: datetime
    ) -> list[GatewayCompleteness]:
        """The gap state up to the receipt of each gateway holding a found event; when the receipt itself is
        not found, of every gateway of the store up to its upper bound (the receipt may be in a gap)."""
        found = any(e.match == RECEIPT_MATCH for e in events)
        gateways = self._rows(
            cur,
            f"SELECT {_GATEWAY_ROW} FROM gateways WHERE store_id = ? ORDER BY gateway_id",  # noqa: S608
            (store_id,),
        )
        holding = {e.gateway_id for e in events}
        out: list[GatewayCompleteness] = []
        for gw in map(self._gateway_row, gateways):
            if found and gw.gateway_id not in holding:
                continue
            seqs = [e.seq for e in events if e.gateway_id == gw.gateway_id]
            own = [e.seq for e in events if e.gateway_id == gw.gateway_id and e.match == RECEIPT_MATCH]
            through = max(own or seqs) if found else gw.upper
            classes = self._classes(cur, gw, now)
            gaps = GapClasses(
                *(clip(ranges, 1, through) for ranges in (classes.explained, classes.lost, classes.pending))
            )
            out.append(GatewayCompleteness(gw.store_id, gw.gateway_id, bool(own), through, gaps))
        return out

    @staticmethod
    def _time_value(value: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        parsed = parse_time(value)
        if parsed is None:
            raise ValueError(f"stored time {value!r} is not ISO 8601 with an offset")
        return parsed

    def count_rejected(self) -> int:
        with self._session() as cur:
            (n,) = self._x(cur, "SELECT count(*) FROM rejected").fetchone()
        return int(n)

    def rejections(self, limit: int = 100) -> list[RejectedRow]:
        """The most recent rejected messages, newest first."""
        with self._session() as cur:
            rows = self._rows(
                cur,
                "SELECT received_at, topic, reason, size FROM rejected ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        return [RejectedRow(self._time_value(r[0]), r[1], r[2], int(r[3])) for r in rows]

    def summary(self, now: datetime | None = None) -> list[GatewaySummary]:
        """One line per (store, gateway): counts, gap classes and lag, from one snapshot."""
        now = now or datetime.now(UTC)
        out: list[GatewaySummary] = []
        with self._transaction(self.dialect.begin_read) as cur:
            for row in self._rows(cur, _GATEWAYS):
                gw = self._gateway_row(row)
                dups, conflicts, bad, newest = row[9:]
                classes = self._classes(cur, gw, now)
                gaps = classes.gaps
                recorded = None if newest is None else self._time_value(newest)
                out.append(
                    GatewaySummary(
                        store_id=gw.store_id,
                        gateway_id=gw.gateway_id,
                        events=gw.events,
                        max_seq=gw.max_seq,
                        gaps=len(gaps),
                        missing=size(gaps),
                        duplicates=int(dups),
                        conflicts=int(conflicts),
                        lag=None if recorded is None else now - recorded,
                        last_received_at=gw.watermark.received_at,
                        complete_through=gw.complete_through,
                        explained=size(classes.explained),
                        lost=size(classes.lost),
                        pending=size(classes.pending),
                        bad_reports=int(bad),
                    )
                )
        return out

    # --- resend -----------------------------------------------------------------------------------------

    def claim_resends(
        self,
        interval_s: float,
        max_ranges: int = RESEND_MAX_RANGES,
        *,
        max_seqs: int = RESEND_MAX_SEQS,
        online_s: float | None = None,
        max_gateways: int = MAX_RESEND_GATEWAYS,
        single_ranges: int = SINGLE_RANGE_COMMANDS,
        now: datetime | None = None,
    ) -> list[ResendRequest]:
        """Lost ranges to ask for: per gateway not asked within ``interval_s``, its lowest lost ranges, at most
        ``max_ranges`` of them and ``max_seqs`` seqs in all (one multi-range command), for at most
        ``max_gateways`` gateways per call (the rest come in the next round). A gateway marked single-range
        (:meth:`mark_single_range`) gets at most ``single_ranges`` ranges, flagged ``single_range``: one command
        each.

        Every gateway with lost seqs is asked, quiet ones included: a gateway that sends nothing new must heal
        too (a till closed for the night, a gateway whose only traffic was the lost burst). The budget follows
        the gaps (one command carries up to a thousand holes), and each gateway has at most one claim per
        interval, so with the command's expiry (the receiver sets it to the interval) at most about one waits
        in a quiet gateway's session. ``online_s`` restricts it to gateways heard from within that time.
        Each gateway is claimed by a single-row conditional update, so of several receivers sharing the
        database one asks and the others skip it until the interval has passed again. A gateway whose missing
        seqs were all explained or pending at the last round is skipped without reading its gaps until its row
        changes or its lost watermark can move (:meth:`_nothing_lost_until`).
        """
        now = now or datetime.now(UTC)
        now_ms = int(now.timestamp() * 1000)
        due = now_ms - int(interval_s * 1000)
        # A gateway not heard from for QUIET_AFTER_S may be away: its commands wait in its session at the broker
        # (mosquitto keeps even expired ones queued until it reconnects, counted against its queue limit), so
        # it is asked again only every QUIET_RESEND_S, not every interval.
        quiet_due = now_ms - int(max(interval_s, QUIET_RESEND_S) * 1000)
        heard_since = self._time_param(now - timedelta(seconds=max(interval_s, QUIET_AFTER_S)))
        sql = (
            f"SELECT {_GATEWAY_ROW} FROM gateways"  # noqa: S608 - constants
            " WHERE complete_through > 0 AND (resend_at_ms IS NULL OR resend_at_ms <= ?"
            " OR (resend_at_ms <= ? AND last_received_at >= ?))"
            " AND (events < max_seq OR events < complete_through)"
        )
        params: list[Any] = [quiet_due, due, heard_since]
        if online_s is not None:
            sql += " AND last_received_at >= ?"
            params.append(self._time_param(now - timedelta(seconds=online_s)))
        sql += " ORDER BY coalesce(resend_at_ms, 0), store_id, gateway_id"
        out: list[ResendRequest] = []
        with self._session() as cur:
            candidates = self._rows(cur, sql, params)
            singles = {
                (str(a), str(b))
                for a, b in self._rows(
                    cur,
                    "SELECT store_id, gateway_id FROM single_range WHERE marked_at_ms > ?",
                    (now_ms - int(SINGLE_RANGE_RECHECK_S * 1000),),
                )
            }
            for row in candidates:
                if len(out) >= max_gateways:
                    break
                gw = self._gateway_row(row)
                skip = self._nothing_lost.get(gw.key)
                if skip is not None and skip[0] == gw and (skip[1] is None or now < skip[1]):
                    continue
                cur.execute(self.dialect.begin_read)
                try:  # the row again, in the snapshot its runs are read from
                    fresh = self._gateway(cur, gw.gateway_id, gw.store_id)
                    lost = [] if fresh is None else self._classes(cur, fresh, now).lost
                finally:
                    cur.execute("COMMIT")
                if fresh is not None and not lost:
                    self._nothing_lost[gw.key] = (fresh, self._nothing_lost_until(fresh, now))
                    continue
                self._nothing_lost.pop(gw.key, None)
                single = gw.key in singles
                per_gateway = min(max_ranges, single_ranges) if single else max_ranges
                if len(lost) > per_gateway or size(lost) > max_seqs:
                    # More holes than one command carries: start each ask where the previous one stopped, so
                    # low seqs the gateway no longer has (answered missing, never explained) cannot hide the
                    # recoverable holes above them forever.
                    (asked,) = self._rows(
                        cur,
                        "SELECT resend_commands FROM gateways WHERE store_id = ? AND gateway_id = ?",
                        gw.key,
                    )[0]
                    start = (int(asked or 0) * per_gateway) % len(lost)
                    lost = [*lost[start:], *lost[:start]]
                ranges = sorted(take_ranges(lost, per_gateway, max_seqs))
                if not ranges:
                    continue
                self._x(cur, _CLAIM_RESEND, (now_ms, 1, *gw.key, due))
                if cur.rowcount == 1:
                    out.append(ResendRequest(*gw.key, ranges, single_range=single))
        return out

    def _nothing_lost_until(self, gw: _GatewayRow, now: datetime) -> datetime | None:
        """Until when a gateway with nothing lost at ``now`` stays so while its row does not change: the next
        time its lost watermark can move (a grace period after its last batch or its mark), None for never."""
        if self._grace <= timedelta(0):
            return None
        mark = gw.watermark
        times = [t + self._grace for t in (mark.received_at, mark.mark_at) if t is not None]
        return min((t for t in times if t > now), default=None)

    def mark_single_range(
        self, store_id: str, gateway_id: str, reason: str, now: datetime | None = None
    ) -> bool:
        """Remember that a gateway refused a multi-range ``resend`` (``reason``: its answer): it is asked one
        range per command from now on, for SINGLE_RANGE_RECHECK_S. Returns whether it was not marked yet."""
        now_ms = int((now or datetime.now(UTC)).timestamp() * 1000)
        with self._transaction(self.dialect.begin_write) as cur:
            before = self._rows(
                cur,
                "SELECT marked_at_ms FROM single_range WHERE store_id = ? AND gateway_id = ?",
                (store_id, gateway_id),
            )
            self._x(
                cur,
                "INSERT INTO single_range (store_id, gateway_id, marked_at_ms, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (store_id, gateway_id) DO UPDATE"
                " SET marked_at_ms = excluded.marked_at_ms, reason = excluded.reason",
                (store_id, gateway_id, now_ms, reason.replace("\x00", "")[:500]),
            )
        return not before or int(before[0][0]) <= now_ms - int(SINGLE_RANGE_RECHECK_S * 1000)

    def single_range_gateways(self) -> list[tuple[str, str]]:
        """The gateways marked single-range (whatever the age of the mark), by store and gateway."""
        with self._session() as cur:
            rows = self._rows(
                cur, "SELECT store_id, gateway_id FROM single_range ORDER BY store_id, gateway_id"
            )
        return [(str(a), str(b)) for a, b in rows]

    # --- subscriptions ----------------------------------------------------------------------------------

    def subscriptions(self, client_id: str) -> list[str]:
        """The topic filters recorded as subscribed in the session of MQTT client ``client_id``."""
        with self._session() as cur:
            rows = self._rows(
                cur, "SELECT topic FROM subscriptions WHERE client_id = ? ORDER BY topic", (client_id,)
            )
        return [str(t) for (t,) in rows]

    def record_subscriptions(self, client_id: str, topics: Sequence[str], *, replace: bool) -> None:
        """Record ``topics`` as subscribed by ``client_id``: added to what is recorded, or (``replace``) as all
        of it."""
        with self._transaction(self.dialect.begin_write) as cur:
            if replace:
                self._x(cur, "DELETE FROM subscriptions WHERE client_id = ?", (client_id,))
            cur.executemany(
                self._sql(
                    "INSERT INTO subscriptions (client_id, topic) VALUES (?, ?) ON CONFLICT DO NOTHING"
                ),
                [(client_id, t) for t in dict.fromkeys(topics)],
            )


QUIET_AFTER_S: Final = 300.0
"""A gateway whose last batch is older than this (or than the resend interval) counts as quiet."""
QUIET_RESEND_S: Final = 3600.0
"""How often a gateway not heard from within the resend interval is asked again (at most 24 commands a day wait
in an away gateway's session, far below a broker's queue limit)."""


def take_ranges(ranges: Sequence[Range], max_ranges: int, max_seqs: int) -> list[Range]:
    """The lowest ``ranges``, at most ``max_ranges`` of them and ``max_seqs`` seqs in all (the last one cut)."""
    out: list[Range] = []
    budget = max_seqs
    for a, b in ranges:
        if len(out) >= max_ranges or budget <= 0:
            break
        end = min(b, a + budget - 1)
        out.append((a, end))
        budget -= end - a + 1
    return out
