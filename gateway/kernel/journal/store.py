"""The journal's database: its schema, connections (WAL, PRAGMAs), the migrations of older journals, the
``meta`` and ``outbox_state`` rows, and the errors it raises."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.journal.items import QUARANTINE_KEEP_BYTES, QUARANTINE_TOPIC_CHARS, Draft, Rejected
from gateway.kernel.outbox import ClassState, of_class

_LOGGER = logging.getLogger("gateway.kernel.journal")  # one log name for the whole journal


CACHE_KIB: Final = 1024
"""SQLite page cache per connection. Appends and tail reads touch few pages; the default 2 MiB is RSS we skip."""

PAGE_SIZE: Final = 1024
"""SQLite page size of a new journal. Every commit rewrites each page it touches in the WAL (an append of one
sale touches about ten: the events, their indexes, the stock row, the header), so small pages write less: 1 KiB
wrote half of what 4 KiB did per event at a normal store (bench/sd_writes.py). Events of a few hundred bytes
still fit in a page; a larger one spills into overflow pages. An existing journal keeps its page size."""

CHECKPOINT_BYTES: Final = 4 * 1024 * 1024
"""WAL bytes before SQLite copies them into the database file (4,096 pages of 1 KiB): about the size the WAL had
with SQLite's default (1,000 pages of 4 KiB). A page rewritten by many commits (an index's last leaf, the header)
is copied once per checkpoint: fewer checkpoints, fewer copies."""

SCHEMA: Final = """
-- No index on id (unique by construction, a UUIDv7, and never looked up) nor on dedup_key (the idempotency table
-- answers for keys): each index is one more page in every commit. Telemetry is not in events_kind (KIND_INDEXED in
-- gateway/kernel/outbox.py). Journals made before keep their indexes.
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    recorded_at TEXT NOT NULL,
    dedup_key TEXT,
    body BLOB NOT NULL,
    cls INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, seq) WHERE cls < 3;
CREATE TABLE IF NOT EXISTS outbox_state(
    cls INTEGER PRIMARY KEY,
    delivered_seq INTEGER NOT NULL,
    stored_events INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    pending_events INTEGER NOT NULL,
    evicted_events INTEGER NOT NULL,
    through_seq INTEGER NOT NULL DEFAULT 0,
    floor_seq INTEGER NOT NULL DEFAULT 0
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
CLASS_INDEX: Final = "CREATE INDEX IF NOT EXISTS events_cls ON events(cls, seq) WHERE cls < 3"
"""Telemetry (class 3) is not in the class index either (SD wear: a page or more per commit): it is found by seq,
from its class's ``floor_seq`` (:func:`~gateway.kernel.outbox.of_class`). Journals made before keep an index of
every class."""

SALVAGED_FROM: Final = "salvaged_from"
"""``meta`` key: the damaged journal (file name) whose salvage this fresh journal committed."""
HANDLED_DAMAGE: Final = "handled_damage"
"""``meta`` key: ids of the damage records (mark, lock file) this journal's replacement handled."""
PENDING_ALERT: Final = "pending_alert"
"""``meta`` key of the replacement alert until it is committed as an event (a crash in between loses neither)."""


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
            # Only a file with no pages yet takes a page size; older journals keep theirs.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            # Deleted rows are overwritten with zeros: staff ids and GPS fixes of evicted or expired events do not
            # linger in free pages.
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_BYTES // page_size}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


class SeqReservationError(sqlite3.OperationalError):
    """A commit would pass the seq reservation on disk, which cannot be written (a transient failure: retried)."""


class IntakeReserveError(sqlite3.OperationalError):
    """Intake would take the disk space kept for acknowledgements and pruning: handled like SQLITE_FULL."""


def disk_full(err: sqlite3.Error) -> bool:
    """SQLITE_FULL, or the I/O error SQLite reports when it cannot even create its -wal/-shm files."""
    if isinstance(err, IntakeReserveError):
        return True
    code = getattr(err, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR)


def migrate(conn: sqlite3.Connection, kind_class: Callable[[str], int], dedup_retention_days: float) -> None:
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
                "UPDATE events SET cls=? WHERE kind=?", [(kind_class(kind), kind) for kind in kinds]
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.execute(CLASS_INDEX)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox_state)")}
    if "through_seq" not in columns or "floor_seq" not in columns:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if "through_seq" not in columns:
                # Journals whose counters were written by every commit: exact as of their highest seq.
                conn.execute("ALTER TABLE outbox_state ADD COLUMN through_seq INTEGER NOT NULL DEFAULT 0")
                conn.execute(
                    "UPDATE outbox_state SET through_seq = (SELECT COALESCE(MAX(seq), 0) FROM events)"
                )
            if "floor_seq" not in columns:
                conn.execute("ALTER TABLE outbox_state ADD COLUMN floor_seq INTEGER NOT NULL DEFAULT 0")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if meta_value(conn, "idempotency") is None:
        # Journals from before the idempotency table: their events' keys go in once, so nothing they hold
        # is taken twice after the upgrade.
        expires = time.time() + dedup_retention_days * 86400
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


def write_state(conn: sqlite3.Connection, states: dict[int, ClassState], through_seq: int) -> None:
    """Write the classes' counters as they are with every event up to ``through_seq`` stored. Not every commit
    writes them (SD wear): the next open adds the events stored above ``through_seq`` (:func:`state_as_stored`).
    Whatever moves a watermark or removes events (acknowledgements, evictions, TTL) writes them in its commit."""
    conn.executemany(
        "INSERT OR REPLACE INTO outbox_state(cls, delivered_seq, stored_events, stored_bytes, pending_events,"
        " evicted_events, through_seq, floor_seq) VALUES (?,?,?,?,?,?,?,?)",
        [
            (
                cls,
                s.delivered_seq,
                s.stored_events,
                s.stored_bytes,
                s.pending_events,
                s.evicted_events,
                through_seq,
                s.floor_seq,
            )
            for cls, s in states.items()
        ],
    )


def state_as_stored(conn: sqlite3.Connection) -> dict[int, ClassState]:
    """The classes' counters from ``outbox_state``, with the events stored above each row's ``through_seq``
    added (stored, and waiting for HQ: nothing moved a watermark since, or the row would have been written)."""
    states: dict[int, ClassState] = {}
    rows = conn.execute(
        "SELECT cls, delivered_seq, stored_events, stored_bytes, pending_events, evicted_events, floor_seq,"
        " through_seq FROM outbox_state"
    ).fetchall()
    for cls, *values, through in rows:
        count, nbytes = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events WHERE {of_class(cls)} AND seq>?",  # noqa: S608
            (through,),
        ).fetchone()
        states[cls] = ClassState(*values).stored(count, nbytes)
    return states


def keep_private(path: Path) -> None:
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


def meta_value(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def meta_last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(row[0]) if row else 0


def events_key_unique(conn: sqlite3.Connection) -> bool:
    """Whether the events table has a UNIQUE index on dedup_key (journals made before it was dropped)."""
    for _, name, unique, *_ in conn.execute("PRAGMA index_list(events)"):
        if unique and [r[2] for r in conn.execute(f"PRAGMA index_info({name!r})")] == ["dedup_key"]:
            return True
    return False


def key_committed(conn: sqlite3.Connection, dedup_key: str) -> bool:
    """Whether an event was committed under ``dedup_key`` within the dedup retention (the ``idempotency`` table
    remembers it after TTL or the disk budget removed the event). For work run inside ``transact``."""
    return conn.execute("SELECT 1 FROM idempotency WHERE key=?", (dedup_key,)).fetchone() is not None


def drop_redeliveries(conn: sqlite3.Connection, drafts: list[Draft]) -> tuple[list[Draft], dict[str, int]]:
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


def insert_quarantine(conn: sqlite3.Connection, rejected: list[Rejected], now: float) -> None:
    """Keep rejected messages in the quarantine, each with its reason and the first bytes of its payload."""
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
