"""The HQ reference receiver's SQLite database (the default; PostgreSQL is in receiver_pg).

One SQLite file in WAL mode with ``synchronous=FULL``: the receiver sends PUBACK only after a commit, so a
commit must survive a power cut. Writes take the database lock up front (``BEGIN IMMEDIATE``); reads see one
snapshot. The tables and the logic are shared with PostgreSQL (receiver_sql).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cloud_bridge.receiver_model import (
    BatchRejectedError,
    BatchToStore,
    EventTime,
    GatewaySummary,
    RejectedRow,
    Rejection,
    StoreResult,
    StoreUnavailableError,
)
from cloud_bridge.receiver_sql import Cursor, Dialect, SqlReceiverStore

__all__ = [
    "BatchRejectedError",
    "BatchToStore",
    "EventTime",
    "GatewaySummary",
    "ReceiverStore",
    "RejectedRow",
    "Rejection",
    "StoreResult",
    "StoreUnavailableError",
]

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


class ReceiverStore(SqlReceiverStore):
    """The receiver's SQLite database (see the module docstring)."""

    dialect = SQLITE
    db_errors = (sqlite3.Error,)

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        super().__init__()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
        return db

    def _is_data_error(self, err: Exception) -> bool:
        # OperationalError is the database's state (locked, full, I/O): retry. These are about the values.
        return isinstance(err, sqlite3.DataError | sqlite3.IntegrityError | sqlite3.InterfaceError)

    def _time_param(self, value: datetime) -> Any:
        return value.isoformat(timespec="milliseconds")

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        return bool(self._rows(cur, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))
