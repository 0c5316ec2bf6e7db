"""The ground under the HQ receiver's SQL store: the connection and its lock, transactions, schema creation
and upgrades, and reading a gateway's row and classifying its missing seqs, which the store's parts
(:mod:`cloud_bridge.hq.sql`) share. SQLite and PostgreSQL (:mod:`cloud_bridge.hq.sqlite`,
:mod:`cloud_bridge.hq.postgres`) provide a connection and a :class:`Dialect`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, Protocol

import orjson

from cloud_bridge.hq import sql_limits
from cloud_bridge.hq.model import LOST_GRACE_S, LostWatermark, StoreUnavailableError, one_line, parse_time
from cloud_bridge.hq.ranges import GapClasses, Range, classify_split, split_gaps
from cloud_bridge.hq.sql_schema import (
    CONFLICTS_TABLE,
    IS_POS,
    RECEIPT_COLUMNS,
    RECEIPT_INDEXES,
    SCHEMA,
    SCHEMA_VERSION,
    SINGLE_RANGE_TABLE,
    SUBSCRIPTIONS_TABLE,
    UPGRADE_2,
    receipt_fields,
)

_LOGGER = logging.getLogger("cloud_bridge.hq.sql")
"""The SQL store's one log name, whichever of its modules (cloud_bridge.hq.sql*) writes."""

_WATERMARK_COLUMNS: Final = "complete_through, last_received_at, mark_through, mark_at, lost_through"
"""The columns of :class:`LostWatermark`, in its order (``_LOCK_GATEWAY``, in sql_writes, returns them after
max_seq)."""

GATEWAY_ROW: Final = f"store_id, gateway_id, events, max_seq, {_WATERMARK_COLUMNS}"
"""The columns of :class:`GatewayRow`, in its order."""


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
class GatewayRow:
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


class SqlStoreBase:
    """The connection, its lock and the helpers every part of :class:`~cloud_bridge.hq.sql.SqlReceiverStore`
    uses; subclasses connect and name their :class:`Dialect`."""

    dialect: ClassVar[Dialect]
    db_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, *, lost_grace_s: float = LOST_GRACE_S) -> None:
        self._lock = threading.Lock()
        self._sql_cache: dict[str, str] = {}
        self._grace = timedelta(seconds=lost_grace_s)
        self._gaps: dict[tuple[str, str], tuple[tuple[int, int], list[Range], list[Range]]] = {}
        """(store, gateway) -> ((events, upper) they were read at, explained gaps, other gaps)."""
        self._nothing_lost: dict[tuple[str, str], tuple[GatewayRow, datetime | None]] = {}
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
                for statement in UPGRADE_2:
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
            for table in (CONFLICTS_TABLE, SINGLE_RANGE_TABLE, SUBSCRIPTIONS_TABLE):
                cur.execute(table.format(**self.dialect.types))

    def _add_receipt_columns(self, cur: Cursor) -> None:
        """Add and fill the receipt columns of a database made before them, then (always) their indexes."""
        if not self._column_exists(cur, "events", "receipt_no"):
            for column in RECEIPT_COLUMNS:
                cur.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
            filled = self._fill_receipt_columns(cur)
            _LOGGER.info("added the receipt columns to the receiver database (%d sales and returns)", filled)
        for statement in RECEIPT_INDEXES:
            cur.execute(statement)

    def _fill_receipt_columns(self, cur: Cursor) -> int:
        """One pass over the events in id order, a chunk at a time (a big database need not fit in memory)."""
        after, filled = "", 0
        while True:
            rows = self._rows(
                cur,
                f"SELECT id, kind, body FROM events WHERE id > ? AND {IS_POS}"  # noqa: S608 - constants
                " ORDER BY id LIMIT ?",
                (after, sql_limits.RECEIPT_FILL_CHUNK),
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
        for statement in SCHEMA.format(**self.dialect.types).split(";"):
            cur.execute(statement)

    def _upgrade_v1(self, cur: Cursor) -> None:
        """Bring a database of the first receiver (schema 1, SQLite only) up to date."""
        raise StoreUnavailableError("this database has an events table but no schema version: not ours?")

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        raise NotImplementedError

    # --- a gateway's row and its gaps -------------------------------------------------------------------

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

    def _gateway_row(self, row: Sequence[Any]) -> GatewayRow:
        """A :class:`GatewayRow` from the ``GATEWAY_ROW`` columns."""
        store_id, gateway_id, events, max_seq, through = row[:5]
        return GatewayRow(
            store_id,
            gateway_id,
            int(events),
            int(max_seq),
            None if through is None else int(through),
            self._watermark(row[4:9]),
        )

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

    def _gateway(self, cur: Cursor, gateway_id: str, store_id: str | None) -> GatewayRow | None:
        store = self._store_of(cur, gateway_id, store_id)
        row = self._x(
            cur,
            f"SELECT {GATEWAY_ROW} FROM gateways WHERE store_id = ? AND gateway_id = ?",  # noqa: S608
            (store, gateway_id),
        ).fetchone()
        return None if row is None else self._gateway_row(row)

    def _classes(self, cur: Cursor, gw: GatewayRow, now: datetime) -> GapClasses:
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
            if len(covered) + len(rest) <= sql_limits.GAP_CACHE_MAX_RANGES:
                self._gaps[gw.key] = (version, covered, rest)
            else:
                self._gaps.pop(gw.key, None)
        return classify_split(covered, rest, gw.upper, gw.watermark.at(now, self._grace))

    @staticmethod
    def _time_value(value: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        parsed = parse_time(value)
        if parsed is None:
            raise ValueError(f"stored time {value!r} is not ISO 8601 with an offset")
        return parsed
