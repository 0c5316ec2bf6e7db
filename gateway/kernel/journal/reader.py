"""Named reads of the journal, so that nothing outside it writes SQL against its tables.

:class:`Reader` is the journal's own read side: one read-only connection on its own thread (WAL lets it run
beside the writer), for the uplink, the downlink and tests. The ``*_page`` and :func:`receipt_rows` functions
serve the local API: each opens a short-lived read-only connection of its own, so any thread may call them
(FastAPI's threadpool), and raises ``sqlite3.Error`` when the journal cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.kernel.consumer import CURSOR_PREFIX
from gateway.kernel.events import PAYLOADS
from gateway.kernel.journal.recovery import is_damage
from gateway.kernel.journal.store import connect
from gateway.kernel.outbox import of_class
from gateway.kernel.pipeline import Event

_LOGGER = logging.getLogger("gateway.kernel.journal")

SYNCED_TIME: Final = (
    "SELECT recorded_at FROM events WHERE instr(body, '\"clock_synced\":true') > 0 ORDER BY seq DESC LIMIT 1"
)
"""The newest event stamped by a synchronised clock."""


class Reader:
    """Reads on the journal's reader thread; a damaged page found by a read declares the journal corrupt."""

    def __init__(self, path: Path, on_damage: Callable[[str], None]) -> None:
        self._path = path
        self._on_damage = on_damage
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._pool, connect, self._path, "NORMAL", True)

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._conn.close)
        self._pool.shutdown(wait=True)

    async def read_class(
        self, cls: int, after_seq: int, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Committed events of one class with seq > after_seq, in order, within the budgets (at least one)."""
        return await self._read(
            f"SELECT seq, body FROM events WHERE {of_class(cls)} AND seq>? ORDER BY seq LIMIT ?",  # noqa: S608
            (after_seq, max_events),
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

    async def seqs_between(self, first: int, last: int) -> list[int]:
        """The seqs first..last (inclusive) still on disk, in order (no bodies)."""
        rows = await self.query("SELECT seq FROM events WHERE seq>=? AND seq<=? ORDER BY seq", (first, last))
        return [int(row[0]) for row in rows]

    async def last_synced_recorded_at(self) -> str | None:
        """``recorded_at`` of the newest event stamped while the clock was synchronised, or None."""
        rows = await self.query(SYNCED_TIME)
        return str(rows[0][0]) if rows else None

    async def seq_of_dedup_key(self, key: str) -> int | None:
        """The seq of the event committed under dedup key ``key``, or None (never, or longer ago than
        ``journal.dedup_retention_days``)."""
        rows = await self.query("SELECT seq FROM idempotency WHERE key=?", (key,))
        return int(rows[0][0]) if rows else None

    async def stock_on_hand(self, sku: str) -> Any:
        """The stock ledger's on-hand quantity of ``sku`` as stored (its table lives in the journal), or None."""
        rows = await self.query("SELECT on_hand FROM stock WHERE sku=?", (sku,))
        return rows[0][0] if rows else None

    async def events_after(
        self, seq: int, kinds: frozenset[str] | None, limit: int, last_seq: int
    ) -> tuple[list[Event], int]:
        """Committed events above ``seq`` (of ``kinds``, or all) in seq order, at most ``limit``, parsed; and the
        seq through which they were looked for (``last_seq``: the journal's when the read began)."""
        sql = "SELECT seq, kind, device_id, body FROM events WHERE seq > ?"
        params: list[Any] = [seq]
        if kinds is not None:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params += sorted(kinds)
        rows = await self.query(sql + " ORDER BY seq LIMIT ?", (*params, limit))
        events = []
        for found, kind, device_id, body in rows:
            try:
                data = orjson.loads(body)["data"]
                model = PAYLOADS[kind].model_validate(data)
            except (ValueError, KeyError) as err:  # stored by an older release under other rules: not for us
                _LOGGER.warning(
                    "seq %d (%s) does not read as a %s event today, skipped: %s", found, kind, kind, err
                )
                continue
            events.append(Event(int(found), kind, device_id, orjson.dumps(data), model))
        if len(rows) == limit:  # more may follow: through the last row read (some may have been skipped)
            return events, int(rows[-1][0])
        return events, max(last_seq, int(rows[-1][0]) if rows else seq)

    async def cursor(self, name: str) -> int | None:
        """A consumer's committed cursor, or None."""
        rows = await self.query("SELECT value FROM meta WHERE key = ?", (CURSOR_PREFIX + name,))
        return int(rows[0][0]) if rows else None

    def dedup_seq(self, key: str) -> int | None:
        """The seq committed under ``key`` within the dedup retention (its event may be gone), or None. Reader
        thread: call from :meth:`query`'s executor, or tests."""
        conn = self._conn
        assert conn is not None
        row = conn.execute("SELECT seq FROM idempotency WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    async def _read(self, sql: str, params: tuple[int, ...], max_bytes: int) -> list[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._read_sync, sql, params, max_bytes)
        except sqlite3.Error as err:
            # A damaged page in the backlog: retrying the read for ever would hold HQ's copy back silently. The
            # journal is replaced like one damaged under a commit (what is still readable is salvaged).
            if is_damage(err):
                self._on_damage(f"reading events: {err}")
            raise

    def _read_sync(self, sql: str, params: tuple[int, ...], max_bytes: int) -> list[tuple[int, bytes]]:
        assert self._conn is not None
        out: list[tuple[int, bytes]] = []
        total = 0
        cur = self._conn.execute(sql, params)
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
        conn = self._conn
        assert conn is not None
        return await loop.run_in_executor(self._pool, lambda: conn.execute(sql, params).fetchall())


# --- the local API's reads (a connection of their own per call) ---------------------------------------------

_RECEIPT_EVENTS: Final = (
    "SELECT e.seq, e.id, e.kind, e.device_id, e.recorded_at, e.cls, e.body, s.delivered_seq"
    " FROM events e LEFT JOIN outbox_state s ON s.cls = e.cls"
    " WHERE e.kind IN ('pos.sale', 'pos.return') AND e.cls < 3 AND {test} ORDER BY e.seq LIMIT ?"
)
"""Sales and returns (index events_kind), matched on their body, with their class's delivered watermark."""
_OWN_RECEIPT: Final = _RECEIPT_EVENTS.format(
    test="e.device_id = ? AND json_extract(CAST(e.body AS TEXT), '$.data.receipt_no') = ?"
)
_RETURNS_OF: Final = _RECEIPT_EVENTS.format(
    test="e.kind = 'pos.return' AND json_extract(CAST(e.body AS TEXT), '$.data.original_receipt_no') = ?"
)

ReceiptRow = tuple[int, str, str, str | None, str, int, bytes, int | None]
"""seq, id, kind, device_id, recorded_at, class, body, the class's delivered watermark (persisted)."""
StockRow = tuple[str, Any, Any, int, int]
"""sku, on_hand, safety_stock, updated_seq, low (the stock ledger's table, stored in the journal)."""
QuarantineRow = tuple[int, str, str, str | None, str | None, str, str | None, int, bytes | str | None]
"""qid, received_at, driver, device_id, topic, reason, detail, size, payload (its first bytes)."""


@contextlib.contextmanager
def snapshot(db_uri: str) -> Iterator[sqlite3.Connection]:
    """A fresh read-only connection to the journal at ``db_uri`` (``file:...?mode=ro``; 0.3 ms to open): no
    state shared between threads."""
    with contextlib.closing(sqlite3.connect(db_uri, uri=True, timeout=5.0)) as conn:
        yield conn


def oldest_pending(db_uri: str) -> dict[int, str]:
    """Per outbox class: when its oldest event not yet delivered to HQ was recorded (ISO 8601; classes with none
    waiting are absent)."""
    found: dict[int, str] = {}
    with snapshot(db_uri) as conn:
        # The counters on disk may lag the commits that only added events (through_seq): a class that had none
        # waiting when they were written is looked for only among the events stored since (telemetry has no index).
        states = conn.execute(
            "SELECT cls, delivered_seq, pending_events, through_seq FROM outbox_state"
        ).fetchall()
        for cls, delivered, pending, through in states:
            after = delivered if pending > 0 else max(delivered, through)
            row = conn.execute(
                f"SELECT recorded_at FROM events WHERE {of_class(int(cls))} AND seq>? ORDER BY seq LIMIT 1",  # noqa: S608
                (after,),
            ).fetchone()
            if row is not None:
                found[int(cls)] = str(row[0])
    return found


def events_page(
    db_uri: str,
    kind: str | None,
    device_id: str | None,
    after_seq: int | None,
    limit: int,
    max_bytes: int,
    kind_indexed: bool = False,
) -> list[bytes]:
    """Event bodies, newest first; with ``after_seq``, oldest first from just after it (paging forward). Stops
    early, after at least one body, once ``max_bytes`` would be passed. ``kind_indexed``: ``kind`` is not
    telemetry, so the kind index (which leaves telemetry out) finds its events."""
    where: list[str] = []
    params: list[Any] = []
    if kind is not None:
        where.append("kind = ? AND cls < 3" if kind_indexed else "kind = ?")
        params.append(kind)
    if device_id is not None:
        where.append("device_id = ?")
        params.append(device_id)
    if after_seq is not None:
        where.append("seq > ?")
        params.append(after_seq)
    sql = "SELECT body FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ?" if after_seq is None else " ORDER BY seq ASC LIMIT ?"
    params.append(limit)
    bodies: list[bytes] = []
    total = 0
    with snapshot(db_uri) as conn:
        for (body,) in conn.execute(sql, params):
            data = body.encode("utf-8") if isinstance(body, str) else body
            if bodies and total + len(data) > max_bytes:
                break
            bodies.append(data)
            total += len(data)
    return bodies


def stock_page(
    db_uri: str, sku: str | None, low_only: bool, after_sku: str | None, limit: int
) -> list[StockRow]:
    """One page of the stock ledger in SKU order, after ``after_sku`` when given."""
    sql = "SELECT sku, on_hand, safety_stock, updated_seq, low FROM stock"
    where: list[str] = []
    params: list[Any] = []
    if sku is not None:
        where.append("sku = ?")
        params.append(sku)
    if low_only:
        where.append("low != 0")
    if after_sku is not None:
        where.append("sku > ?")
        params.append(after_sku)
    if where:
        sql += " WHERE " + " AND ".join(where)
    with snapshot(db_uri) as conn:
        return conn.execute(sql + " ORDER BY sku LIMIT ?", [*params, limit]).fetchall()


def export_bodies(db_uri: str, since: str | None, until: str | None) -> Iterator[bytes]:
    """Every stored event body (envelope) in seq order, recorded at or after ``since`` and before ``until``
    (ISO 8601 UTC, as ``recorded_at`` is written), for ``store-gateway export``."""
    sql = "SELECT body FROM events WHERE recorded_at >= ? AND recorded_at < ? ORDER BY seq"
    with snapshot(db_uri) as conn:
        for (body,) in conn.execute(sql, (since or "", until or "9999")):
            yield body.encode("utf-8") if isinstance(body, str) else body


def quarantine_page(db_uri: str, limit: int) -> list[QuarantineRow]:
    """The most recent quarantined messages first."""
    with snapshot(db_uri) as conn:
        return conn.execute(
            "SELECT qid, received_at, driver, device_id, topic, reason, detail, size, payload"
            " FROM quarantine ORDER BY qid DESC LIMIT ?",
            (limit,),
        ).fetchall()


def receipt_rows(
    db_uri: str, device_id: str, receipt_no: str, max_events: int
) -> tuple[list[ReceiptRow], list[ReceiptRow]]:
    """From one snapshot: the sales and returns of ``device_id`` with this receipt number, and (if there is one)
    the returns of any device naming it as ``original_receipt_no``; at most ``max_events`` of each."""
    with snapshot(db_uri) as conn:
        conn.execute("BEGIN")  # one snapshot for both reads and the watermarks
        own = conn.execute(_OWN_RECEIPT, (device_id, receipt_no, max_events)).fetchall()
        returns = conn.execute(_RETURNS_OF, (receipt_no, max_events)).fetchall() if own else []
    return own, returns
