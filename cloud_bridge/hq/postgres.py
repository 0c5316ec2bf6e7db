"""The HQ reference receiver's PostgreSQL database, for several receivers sharing the load (``--postgres``).

Same tables and logic as SQLite (sql.py); what differs is here: types, snapshot reads, ``= ANY`` for
lists, an advisory lock while the schema is created, reconnecting after a lost connection, which errors
mean "this batch's data" (rejected) rather than "the database" (retried), and storing a group of batches in
a few round trips (pg_writes.py). Needs the ``postgres`` extra
(psycopg 3).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cloud_bridge.hq.model import LOST_GRACE_S, StoreUnavailableError, one_line
from cloud_bridge.hq.pg_writes import PgGroupWrites
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.hq.sql_base import Cursor, Dialect

_LOGGER = logging.getLogger(__name__)

POSTGRES: Final = Dialect(
    begin_write="BEGIN",
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    types={
        "int": "BIGINT",
        "bool": "BOOLEAN",
        "time": "TIMESTAMPTZ",
        "blob": "BYTEA",
        "identity": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "corrected_at": "TIMESTAMPTZ GENERATED ALWAYS AS (to_timestamp(corrected_ns / 1e9)) STORED",
    },
    placeholder="%s",
)
SCHEMA_LOCK_KEY: Final = 0x5354_4757_4851  # any constant shared by all receivers
CONNECT_TIMEOUT_S: Final = 10
CONNECTION_DEFAULTS: Final = {
    "connect_timeout": str(CONNECT_TIMEOUT_S),
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}
"""libpq settings unless the DSN gives its own: a database host that vanishes (power cut, a dropped NAT entry)
sends no reset, and without keepalives an idle connection looks alive for hours while a commit waits; with
these, a dead peer is found in about a minute (idle 30 s + 3 probes 10 s apart), and data unacknowledged for
60 s (tcp_user_timeout, ms) ends the connection, which the receiver then retries and reconnects."""


class PostgresReceiverStore(PgGroupWrites, SqlReceiverStore):
    """The receiver's PostgreSQL database; a group of batches is stored set-based in a few round trips
    (:mod:`cloud_bridge.hq.pg_writes`). ``dsn`` is a libpq connection string or URI; keep the password
    out of it (PGPASSFILE or PGPASSWORD), it is never logged either way."""

    dialect = POSTGRES
    db_errors = (psycopg.Error,)

    def __init__(self, dsn: str, *, lost_grace_s: float = LOST_GRACE_S) -> None:
        self._dsn = dsn
        try:
            super().__init__(lost_grace_s=lost_grace_s)
        except psycopg.Error as err:
            raise StoreUnavailableError(f"cannot open the PostgreSQL database: {one_line(err)}") from err

    def _connect(self) -> psycopg.Connection[Any]:
        given = conninfo_to_dict(self._dsn)
        if "PGCONNECT_TIMEOUT" in os.environ:
            given["connect_timeout"] = os.environ["PGCONNECT_TIMEOUT"]
        defaults = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in given}
        return psycopg.connect(make_conninfo(self._dsn, **defaults), autocommit=True)

    def _ensure_connected(self) -> None:
        if self._conn.closed or self._conn.broken:
            _LOGGER.info("reconnecting to PostgreSQL")
            self._conn.close()
            self._conn = self._connect()

    def _is_data_error(self, err: Exception) -> bool:
        # ProgramLimitExceeded ("index row requires ... maximum size is 8191") is an OperationalError, but
        # about one value: event_rows refuses such values first, this keeps one that slips by from being
        # retried forever.
        data = psycopg.DataError | psycopg.IntegrityError | psycopg.errors.ProgramLimitExceeded
        return isinstance(err, data) and not self._conn.broken

    def _time_param(self, value: datetime) -> Any:
        return value

    def _in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?)", [list(values)]

    def _schema_lock(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        return bool(self._rows(cur, "SELECT to_regclass(?) IS NOT NULL", (name,))[0][0])

    def _column_exists(self, cur: Cursor, table: str, column: str) -> bool:
        # The table the schema search path finds (as to_regclass does), not a namesake in another schema.
        return bool(
            self._rows(
                cur,
                "SELECT 1 FROM pg_attribute"
                " WHERE attrelid = to_regclass(?) AND attname = ? AND NOT attisdropped",
                (table, column),
            )
        )
