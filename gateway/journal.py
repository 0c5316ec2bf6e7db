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
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from gateway.clock import BOOT_ID, ClockState
from gateway.config import JournalConfig
from gateway.events import SCHEMA_VERSION, uuid7
from gateway.metrics import Metrics

_LOGGER = logging.getLogger(__name__)

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
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, seq);
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
"""


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


class JournalError(Exception):
    """The journal cannot open or write its database."""


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
            conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


class Journal:
    """The gateway's durable, ordered event log."""

    def __init__(
        self,
        path: Path,
        store_id: str,
        gateway_id: str,
        config: JournalConfig,
        metrics: Metrics,
        processors: Sequence[Processor] = (),
        clock: ClockState | None = None,
    ) -> None:
        self.path = path
        self._store_id = store_id
        self._gateway_id = gateway_id
        self._config = config
        self._metrics = metrics
        self._processors = list(processors)
        self._clock = clock or ClockState()
        self._queue: deque[Draft | Rejected] = deque()
        self._wakeup = asyncio.Event()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._listeners: list[Callable[[Committed], None]] = []
        self._delivered_pending: int | None = None
        self._stopping = False
        self._failing = False
        self._busy = False
        self._resume_waiters: list[tuple[int, Callable[[], None]]] = []
        self._commit_done = asyncio.Event()
        self._submitted = 0
        self._finished = 0
        self._delivered_persisted = 0
        self.last_seq = 0
        self.delivered_seq = 0
        prefix = orjson.dumps({"store_id": store_id, "gateway_id": gateway_id})
        self._ids_json = prefix[1:-1]

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_sync)
        self._rconn = await loop.run_in_executor(self._reader, connect, self.path, "NORMAL", True)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = connect(self.path, self._config.synchronous)
        except sqlite3.DatabaseError as err:
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        try:
            conn.executescript(SCHEMA)
            for proc in self._processors:
                proc.setup(conn)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            conn.close()
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        except BaseException:
            conn.close()
            raise
        max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        self.last_seq = max(int(meta.get("last_seq", 0)), int(max_seq))
        self.delivered_seq = int(meta.get("delivered_seq", 0))
        self._delivered_persisted = self.delivered_seq
        self._conn = conn
        self._metrics.last_seq.set(self.last_seq)
        self._metrics.delivered_seq.set(self.delivered_seq)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._writer, self._conn.close)
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # --- intake -----------------------------------------------------------------------------------

    def submit(self, item: Draft | Rejected) -> bool:
        """Queue an item for the next commit. False (and nothing queued) if the journal is over its limit."""
        if len(self._queue) >= QUEUE_LIMIT or self._stopping:
            return False
        if isinstance(item, Draft) and len(item.data_json) > self._config.max_payload_bytes:
            limit = self._config.max_payload_bytes
            detail = f"event body {len(item.data_json)} bytes > journal.max_payload_bytes {limit}"
            item = _as_rejected(item, ValueError(detail), reason="too_large")
        self._queue.append(item)
        self._submitted += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    def discard(self, origin: object) -> int:
        """Drop queued items that came in on ``origin``, a connection that died: their acknowledgements can no
        longer reach the broker, which redelivers them to the next session. Returns how many were dropped."""
        kept = deque(item for item in self._queue if item.origin is not origin or origin is None)
        dropped = len(self._queue) - len(kept)
        if dropped:
            self._queue = kept
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

    def note_delivered(self, seq: int) -> None:
        """HQ acknowledged everything up to ``seq``; persisted with the next commit (or on its own)."""
        if seq > self.delivered_seq:
            self.delivered_seq = seq
            self._delivered_pending = seq
            self._metrics.delivered_seq.set(seq)
            self._wakeup.set()

    async def flush(self) -> None:
        """Wait until everything submitted before this call is committed (and acknowledged), or discarded.
        Later submissions do not extend the wait. The writer must be running."""
        target = self._submitted
        delivered = self.delivered_seq
        while self._finished < target or self._delivered_persisted < delivered:
            self._commit_done.clear()
            await self._commit_done.wait()

    # --- the writer ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer loop: group-commit what has queued until cancelled; then commit what is left."""
        loop = asyncio.get_running_loop()
        delay = self._config.commit_max_delay_ms / 1000
        try:
            while True:
                await self._wakeup.wait()
                if delay and len(self._queue) < self._config.commit_max_events:
                    await asyncio.sleep(delay)
                self._wakeup.clear()
                await self._commit_once(loop)
                if self._queue:
                    self._wakeup.set()
        finally:
            self._stopping = True
            await asyncio.shield(self._drain(loop))

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(3 + len(self._queue) // self._config.commit_max_events):
            if not self._queue and self._delivered_pending is None:
                return
            await self._commit_once(loop)
        if self._queue:
            _LOGGER.error("journal stopped with %d uncommitted items (never acknowledged)", len(self._queue))

    async def _commit_once(self, loop: asyncio.AbstractEventLoop) -> None:
        n = min(len(self._queue), self._config.commit_max_events)
        items = [self._queue.popleft() for _ in range(n)]
        delivered = self._delivered_pending
        self._delivered_pending = None
        if not items and delivered is None:
            return
        started = time.perf_counter()
        self._busy = True
        cancelled: asyncio.CancelledError | None = None
        leftover: list[Draft | Rejected] = []
        try:
            future = loop.run_in_executor(self._writer, self._commit_sync, items, delivered)
            while True:
                try:
                    result, leftover = await asyncio.shield(future)
                    if delivered is not None:  # written by the first transaction, which committed
                        self._delivered_persisted = max(self._delivered_persisted, delivered)
                    break
                except asyncio.CancelledError as err:
                    # Once the thread may COMMIT, its acks must follow: finish the bookkeeping, then stop.
                    cancelled = err
        except sqlite3.Error as err:
            result, leftover = None, items
            self._commit_failed(err, delivered)
        finally:
            self._busy = False
        if leftover:
            # Nothing of the leftover was committed or acknowledged: put it back in order, retry after a pause.
            self._queue.extendleft(reversed(leftover))
            items = items[: len(items) - len(leftover)]
            self._failing = True
        elif self._failing:
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
        if cancelled is not None:
            raise cancelled
        if leftover:
            await asyncio.sleep(1)

    def _commit_failed(self, err: sqlite3.Error, delivered: int | None) -> None:
        if delivered is not None and self._delivered_pending is None:
            self._delivered_pending = delivered
        if not self._failing:
            _LOGGER.error("journal commit failed, retrying every second: %s", err)
        self._failing = True

    def _publish(self, result: Committed) -> None:
        """Metrics and listeners, after COMMIT."""
        self.last_seq = result.last_seq
        self._metrics.last_seq.set(result.last_seq)
        for kind, count in result.kinds.items():
            self._metrics.committed.labels(kind).inc(count)
        for driver, count in result.duplicates_by_driver.items():
            self._metrics.duplicates.labels(driver).inc(count)
        for r in result.rejected:
            self._metrics.quarantined.labels(r.driver, r.reason).inc()
        for listener in self._listeners:
            listener(result)

    def _commit_sync(
        self, items: list[Draft | Rejected], delivered: int | None
    ) -> tuple[Committed | None, list[Draft | Rejected]]:
        """Commit the batch; returns what was committed and the items NOT committed (a SQLite failure)."""
        try:
            return self._commit_batch(items, delivered), []
        except sqlite3.Error:
            raise
        except Exception:
            _LOGGER.exception("processing a batch of %d failed; committing its items one by one", len(items))
        # A bug or a poison event must not hold back good data: commit each item alone, and quarantine
        # (with the error) the ones that fail on their own.
        merged: Committed | None = None
        for index, item in enumerate(items):
            mark = delivered if index == 0 else None
            try:
                try:
                    part = self._commit_batch([item], mark)
                except sqlite3.Error:
                    raise
                except Exception as err:
                    part = self._commit_batch([_as_rejected(item, err)], mark)
            except sqlite3.Error as err:
                if index == 0:
                    raise
                _LOGGER.error("journal commit failed after %d of %d items: %s", index, len(items), err)
                return merged, items[index:]
            merged = _merge(merged, part)
        return merged, []

    def _commit_batch(self, items: list[Draft | Rejected], delivered: int | None) -> Committed | None:
        conn = self._conn
        assert conn is not None
        drafts = [i for i in items if isinstance(i, Draft)]
        rejected = [i for i in items if isinstance(i, Rejected)]
        conn.execute("BEGIN IMMEDIATE")
        try:
            fresh, duplicates = self._drop_redeliveries(conn, drafts)
            first = self.last_seq + 1
            seq = self.last_seq
            now = time.time()
            rows: list[tuple[int, str, str, str | None, str, str | None, bytes]] = []
            seq = self._envelopes(fresh, seq, now, rows)
            for proc in self._processors:
                for row_draft, row in zip(fresh, rows, strict=True):
                    proc.apply(row[0], row_draft)
            for proc in self._processors:
                derived = proc.flush(conn, first, seq)
                if derived:
                    seq = self._envelopes(derived, seq, now, rows)
            conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?)", rows)
            if rejected:
                self._quarantine(conn, rejected, now)
            if rows:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seq),))
            if delivered is not None:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('delivered_seq', ?)", (str(delivered),))
            conn.execute("COMMIT")
        except BaseException:
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
        self.last_seq = seq
        if not rows and not rejected and not duplicates:
            return None
        kinds: dict[str, int] = {}
        for row in rows:
            kinds[row[2]] = kinds.get(row[2], 0) + 1
        return Committed(first, seq, kinds, [r[6] for r in rows], rejected, duplicates)

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
                for r in conn.execute(f"SELECT dedup_key FROM events WHERE dedup_key IN ({marks})", chunk)  # noqa: S608
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

    def _envelopes(
        self,
        drafts: list[Draft],
        seq: int,
        now: float,
        rows: list[tuple[int, str, str, str | None, str, str | None, bytes]],
    ) -> int:
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
            rows.append((seq, event_id, draft.kind, draft.device_id, recorded_at, draft.dedup_key, body))
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

    # --- reads (uplink, API) ----------------------------------------------------------------------

    async def read_after(self, after_seq: int, max_events: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Committed events with seq > after_seq, in order, within the count and byte budgets (at least one)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._reader, self._read_after_sync, after_seq, max_events, max_bytes
        )

    def _read_after_sync(self, after_seq: int, max_events: int, max_bytes: int) -> list[tuple[int, bytes]]:
        assert self._rconn is not None
        out: list[tuple[int, bytes]] = []
        total = 0
        cur = self._rconn.execute(
            "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, max_events)
        )
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
    return total
