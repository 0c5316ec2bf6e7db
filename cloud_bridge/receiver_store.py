"""The HQ reference receiver's database: every event once, per-gateway counters, gaps and rejected messages.

One SQLite file in WAL mode with ``synchronous=FULL``: the receiver sends PUBACK only after a commit, so a
commit must survive a power cut. Events are deduplicated by their id; a different id for a (gateway, seq)
already stored is a *conflict* (counted, first one kept, logged). All methods are thread-safe (one lock): the
receiver calls them from a single worker thread, reports from any thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson

from cloud_bridge.wire import Batch, BatchError

_LOGGER = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
MAX_SEQ: Final = 2**63 - 1
"""Largest seq SQLite can store as an INTEGER."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    recorded_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    body BLOB NOT NULL
);
DROP INDEX IF EXISTS events_gateway_seq;
CREATE UNIQUE INDEX IF NOT EXISTS events_store_gateway_seq ON events (store_id, gateway_id, seq);
CREATE TABLE IF NOT EXISTS gateways (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    max_seq INTEGER NOT NULL,
    events INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    conflicts INTEGER NOT NULL,
    last_received_at TEXT NOT NULL,
    PRIMARY KEY (store_id, gateway_id)
);
CREATE TABLE IF NOT EXISTS rejected (
    received_at TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""

_INSERT_EVENT: Final = (
    "INSERT OR IGNORE INTO events"
    " (id, store_id, gateway_id, seq, kind, device_id, recorded_at, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_GATEWAY: Final = """
INSERT INTO gateways (store_id, gateway_id, max_seq, events, duplicates, conflicts, last_received_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (store_id, gateway_id) DO UPDATE SET
    max_seq = max(max_seq, excluded.max_seq),
    events = events + excluded.events,
    duplicates = duplicates + excluded.duplicates,
    conflicts = conflicts + excluded.conflicts,
    last_received_at = excluded.last_received_at
"""
_GAPS: Final = """
SELECT prev + 1, seq - 1 FROM (
    SELECT seq, LAG(seq, 1, 0) OVER (ORDER BY seq) AS prev FROM events WHERE store_id = ? AND gateway_id = ?
) WHERE seq > prev + 1 ORDER BY seq
"""


class BatchRejectedError(BatchError):
    """A well-formed batch the receiver will not store: it disagrees with its topic, or an event is bad."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    new: int
    duplicates: int
    conflicts: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message that was not stored, and why; recorded in the ``rejected`` table."""

    topic: str
    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class BatchToStore:
    """A decoded batch and the store/gateway its topic names."""

    topic: str
    size: int
    store_id: str
    gateway_id: str
    batch: Batch


@dataclass(frozen=True, slots=True)
class GatewaySummary:
    store_id: str
    gateway_id: str
    events: int
    max_seq: int
    gaps: int
    missing: int
    duplicates: int
    conflicts: int
    lag: timedelta | None
    """Now minus ``recorded_at`` of the newest (highest seq) event."""
    last_received_at: datetime | None


@dataclass(frozen=True, slots=True)
class RejectedRow:
    received_at: datetime
    topic: str
    reason: str
    size: int


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _parse_time(text: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


_Row = tuple[str, str, str, int, str, str | None, str, str, bytes]


def _event_rows(store_id: str, gateway_id: str, batch: Batch, received_at: str) -> list[_Row]:
    """The rows to insert for a batch; raises :class:`BatchRejectedError` before anything is written."""
    if batch.store_id != store_id or batch.gateway_id != gateway_id:
        raise BatchRejectedError(
            f"batch says store {batch.store_id!r} gateway {batch.gateway_id!r}"
            f" but the topic says store {store_id!r} gateway {gateway_id!r}"
        )
    rows: list[_Row] = []
    for event in batch.events:
        seq, event_id = event["seq"], event["id"]
        if event.get("store_id") != store_id or event.get("gateway_id") != gateway_id:
            raise BatchRejectedError(
                f"event seq {seq} says store {event.get('store_id')!r} gateway {event.get('gateway_id')!r}"
                f" but the topic says store {store_id!r} gateway {gateway_id!r}"
            )
        if not 1 <= seq <= MAX_SEQ:
            raise BatchRejectedError(f"event seq {seq} out of range 1..{MAX_SEQ}")
        kind, device_id, recorded_at = event.get("kind"), event.get("device_id"), event.get("recorded_at")
        if not isinstance(kind, str) or not (device_id is None or isinstance(device_id, str)):
            raise BatchRejectedError(
                f"event seq {seq} needs a string 'kind' and a string or null 'device_id'"
            )
        if not isinstance(recorded_at, str) or _parse_time(recorded_at) is None:
            raise BatchRejectedError(
                f"event seq {seq} needs 'recorded_at' as an ISO 8601 time with a UTC offset"
            )
        body = orjson.dumps(event)
        rows.append((event_id, store_id, gateway_id, seq, kind, device_id, recorded_at, received_at, body))
    return rows


class ReceiverStore:
    """The receiver's SQLite database (see the module docstring)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # --- writing ----------------------------------------------------------------------------------------

    def store_batch(self, topic_store_id: str, topic_gateway_id: str, batch: Batch) -> StoreResult:
        """Store one batch in one transaction; a bad batch raises :class:`BatchRejectedError`."""
        with self._transaction() as db:
            return self._insert(db, topic_store_id, topic_gateway_id, batch, _now_text())

    def apply(self, items: Iterable[BatchToStore | Rejection]) -> list[StoreResult | Rejection]:
        """Store several messages in one transaction: batches are stored or rejected, rejections recorded.

        ``items`` is consumed inside the transaction, so a generator can decode one batch at a time.
        """
        received_at = _now_text()
        results: list[StoreResult | Rejection] = []
        with self._transaction() as db:
            for item in items:
                if isinstance(item, BatchToStore):
                    db.execute("SAVEPOINT batch")
                    try:
                        result = self._insert(db, item.store_id, item.gateway_id, item.batch, received_at)
                    except BatchRejectedError as err:
                        db.execute("ROLLBACK TO batch")
                        rejection = Rejection(item.topic, str(err), item.size)
                    except sqlite3.Error:
                        raise
                    except Exception as err:
                        db.execute("ROLLBACK TO batch")
                        rejection = Rejection(item.topic, f"cannot store: {err!r}"[:500], item.size)
                    else:
                        db.execute("RELEASE batch")
                        results.append(result)
                        continue
                else:
                    rejection = item
                db.execute(
                    "INSERT INTO rejected (received_at, topic, reason, size) VALUES (?, ?, ?, ?)",
                    (received_at, rejection.topic, rejection.reason, rejection.size),
                )
                _LOGGER.info(
                    "rejected a message on %s (%d bytes): %s",
                    rejection.topic,
                    rejection.size,
                    rejection.reason,
                )
                results.append(rejection)
        return results

    def record_rejected(self, topic: str, reason: str, size: int) -> None:
        self.apply([Rejection(topic, reason, size)])

    def _insert(
        self, db: sqlite3.Connection, store_id: str, gateway_id: str, batch: Batch, now: str
    ) -> StoreResult:
        rows = _event_rows(store_id, gateway_id, batch, now)
        (before,) = db.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
        new = db.executemany(_INSERT_EVENT, rows).rowcount
        duplicates = conflicts = 0
        if new < len(rows):
            duplicates, conflicts = self._classify_ignored(db, rows, before)
        db.execute(
            _UPSERT_GATEWAY,
            (store_id, gateway_id, max(r[3] for r in rows), new, duplicates, conflicts, now),
        )
        return StoreResult(new, duplicates, conflicts)

    @staticmethod
    def _classify_ignored(db: sqlite3.Connection, rows: list[_Row], before: int) -> tuple[int, int]:
        """Classify the rows INSERT OR IGNORE skipped: id stored = duplicate, else (gateway, seq) conflict."""
        inserted = {r[0] for r in db.execute("SELECT id FROM events WHERE rowid > ?", (before,))}
        ignored: list[_Row] = []
        for row in rows:
            if row[0] in inserted:
                inserted.discard(row[0])  # a second copy of the id in the same batch is a duplicate
            else:
                ignored.append(row)
        duplicates = conflicts = 0
        for row in ignored:
            if db.execute("SELECT 1 FROM events WHERE id = ?", (row[0],)).fetchone():
                duplicates += 1
                continue
            conflicts += 1
            kept = db.execute(
                "SELECT id FROM events WHERE store_id = ? AND gateway_id = ? AND seq = ?",
                (row[1], row[2], row[3]),
            ).fetchone()
            _LOGGER.warning(
                "conflict: store %s gateway %s seq %d already holds event %s; kept it and dropped event %s",
                row[1],
                row[2],
                row[3],
                kept[0] if kept else "?",
                row[0],
            )
        return duplicates, conflicts

    # --- reading ----------------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM events").fetchone()
        return int(n)

    def _store_of(self, gateway_id: str, store_id: str | None) -> str:
        """Gateway ids are unique within a store only: name the store, or let us find the one that has it."""
        if store_id is not None:
            return store_id
        stores = [
            s
            for (s,) in self._db.execute("SELECT store_id FROM gateways WHERE gateway_id = ?", (gateway_id,))
        ]
        if len(stores) > 1:
            raise ValueError(f"gateway {gateway_id!r} exists in stores {stores}: name the store")
        return stores[0] if stores else ""

    def gaps(self, gateway_id: str, store_id: str | None = None) -> list[tuple[int, int]]:
        """Missing seq ranges (first, last), inclusive, between 1 and the gateway's highest stored seq."""
        with self._lock:
            store = self._store_of(gateway_id, store_id)
            return [(int(a), int(b)) for a, b in self._db.execute(_GAPS, (store, gateway_id))]

    def events(
        self, gateway_id: str, after_seq: int = 0, limit: int = 1000, store_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored envelopes of a gateway in seq order, parsed."""
        with self._lock:
            store = self._store_of(gateway_id, store_id)
            cur = self._db.execute(
                "SELECT body FROM events WHERE store_id = ? AND gateway_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (store, gateway_id, after_seq, limit),
            )
            bodies = [body for (body,) in cur]
        return [orjson.loads(body) for body in bodies]

    def count_rejected(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM rejected").fetchone()
        return int(n)

    def rejections(self, limit: int = 100) -> list[RejectedRow]:
        """The most recent rejected messages, newest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT received_at, topic, reason, size FROM rejected ORDER BY rowid DESC LIMIT ?", (limit,)
            )
            rows = cur.fetchall()
        return [RejectedRow(datetime.fromisoformat(r[0]), r[1], r[2], int(r[3])) for r in rows]

    def summary(self, now: datetime | None = None) -> list[GatewaySummary]:
        """One line per (store, gateway): counts, gaps and lag."""
        now = now or datetime.now(UTC)
        with self._lock:
            gateways = self._db.execute(
                "SELECT store_id, gateway_id, events, max_seq, duplicates, conflicts, last_received_at"
                " FROM gateways ORDER BY store_id, gateway_id"
            ).fetchall()
            out: list[GatewaySummary] = []
            for store_id, gateway_id, events, max_seq, duplicates, conflicts, last_received in gateways:
                # Every stored event has its own seq in 1..max_seq, so the counters show a complete gateway
                # without scanning it; only an incomplete one needs the window query.
                gaps = [] if events >= max_seq else self._db.execute(_GAPS, (store_id, gateway_id)).fetchall()
                newest = self._db.execute(
                    "SELECT recorded_at FROM events WHERE store_id = ? AND gateway_id = ? ORDER BY seq DESC LIMIT 1",
                    (store_id, gateway_id),
                ).fetchone()
                recorded = _parse_time(newest[0]) if newest else None
                out.append(
                    GatewaySummary(
                        store_id=store_id,
                        gateway_id=gateway_id,
                        events=int(events),
                        max_seq=int(max_seq),
                        gaps=len(gaps),
                        missing=sum(int(b) - int(a) + 1 for a, b in gaps),
                        duplicates=int(duplicates),
                        conflicts=int(conflicts),
                        lag=now - recorded if recorded else None,
                        last_received_at=_parse_time(last_received),
                    )
                )
        return out
