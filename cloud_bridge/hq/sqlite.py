"""The HQ reference receiver's SQLite database (the default; PostgreSQL is in postgres.py).

One SQLite file in WAL mode with ``synchronous=FULL``: the receiver sends PUBACK only after a commit, so a
commit must survive a power cut. Writes take the database lock up front (``BEGIN IMMEDIATE``); reads see one
snapshot. The tables and the logic are shared with PostgreSQL (sql.py).
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson

from cloud_bridge.hq.model import LOST_GRACE_S, StoreUnavailableError, clock_fields, one_line
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.hq.sql_base import Cursor, Dialect

_LOGGER = logging.getLogger(__name__)

SQLITE: Final = Dialect(
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",
    types={
        "int": "INTEGER",
        "bool": "INTEGER",
        "time": "TEXT",
        "blob": "BLOB",
        "identity": "INTEGER PRIMARY KEY",
        "corrected_at": (
            "TEXT GENERATED ALWAYS AS"
            " (strftime('%Y-%m-%dT%H:%M:%fZ', corrected_ns / 1000000000.0, 'unixepoch')) VIRTUAL"
        ),
    },
)


_V1_EVENT_COLUMNS: Final = (
    "boot_id TEXT",
    "mono_ns INTEGER",
    "clock_synced INTEGER",
    "corrected_ns INTEGER",
    "anchor_mono_ns INTEGER",
    f"corrected_at {SQLITE.types['corrected_at']}",
)
_V1_COPIES: Final = (
    "INSERT INTO gateways (store_id, gateway_id, max_seq, events, duplicates, conflicts, last_received_at)"
    " SELECT store_id, gateway_id, max_seq, events, duplicates, conflicts, last_received_at FROM gateways_v1",
    "INSERT INTO rejected (received_at, topic, reason, size)"
    " SELECT received_at, topic, reason, size FROM rejected_v1 ORDER BY rowid",
)
_V1_RUNS: Final = """
INSERT INTO runs (store_id, gateway_id, first_seq, last_seq)
SELECT store_id, gateway_id, min(seq), max(seq) FROM (
    SELECT store_id, gateway_id, seq, seq - row_number() OVER (PARTITION BY store_id, gateway_id ORDER BY seq) AS island
    FROM events
) GROUP BY store_id, gateway_id, island
"""
"""Contiguous seqs share ``seq - row_number()``: one run per island."""


class SqliteReceiverStore(SqlReceiverStore):
    """The receiver's SQLite database (see the module docstring)."""

    dialect = SQLITE
    db_errors = (sqlite3.Error,)

    def __init__(
        self, path: Path | str, *, busy_timeout_s: float = 5.0, lost_grace_s: float = LOST_GRACE_S
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        try:
            super().__init__(lost_grace_s=lost_grace_s)
        except sqlite3.Error as err:  # no such directory, not a database, ...
            raise StoreUnavailableError(f"cannot open {self.path}: {one_line(err)}") from err

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def _is_data_error(self, err: Exception) -> bool:
        # OperationalError is the database's state (locked, full, I/O): retry. These are about the values.
        return isinstance(err, sqlite3.DataError | sqlite3.IntegrityError | sqlite3.InterfaceError)

    def _time_param(self, value: datetime) -> Any:
        return value.isoformat(timespec="milliseconds")

    def _upgrade_v1(self, cur: Cursor) -> None:
        """Schema 1 (the first receiver) to 2, in place and in one transaction: new columns (the
        clock ones read from the stored envelopes), runs and newest times computed, rejections kept."""
        for column in _V1_EVENT_COLUMNS:
            cur.execute(f"ALTER TABLE events ADD COLUMN {column}")
        for table in ("gateways", "rejected"):  # their columns change more than ADD COLUMN can do
            cur.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
        self._create_tables(cur)
        for copy in _V1_COPIES:
            cur.execute(copy)
        cur.execute("DROP TABLE gateways_v1")
        cur.execute("DROP TABLE rejected_v1")
        bodies, upgraded = self._conn.cursor(), 0
        bodies.execute("SELECT id, body FROM events")
        while chunk := bodies.fetchmany(10_000):  # a big database need not fit in memory
            cur.executemany(
                "UPDATE events SET boot_id = ?, mono_ns = ?, clock_synced = ? WHERE id = ?",
                [(*clock_fields(orjson.loads(body)), event_id) for event_id, body in chunk],
            )
            upgraded += len(chunk)
        cur.execute(_V1_RUNS)
        cur.execute(
            "UPDATE gateways SET newest_recorded_at = (SELECT recorded_at FROM events e WHERE"
            " e.store_id = gateways.store_id AND e.gateway_id = gateways.gateway_id AND e.seq = gateways.max_seq)"
        )
        _LOGGER.info("upgraded %s from receiver schema 1 (%d events)", self.path, upgraded)

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        return bool(self._rows(cur, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    def _column_exists(self, cur: Cursor, table: str, column: str) -> bool:
        return bool(self._rows(cur, "SELECT 1 FROM pragma_table_info(?) WHERE name = ?", (table, column)))
