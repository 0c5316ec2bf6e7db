"""Start-up recovery from a corrupt journal (docs/OUTBOX.md, "Corrupt journal on start").

An SD card that loses power mid-write, a full disk or a bad sector can leave ``journal.db`` unreadable. The
gateway must not refuse to start for ever: :func:`probe` says cheaply whether the journal can be used,
:func:`move_aside` keeps the broken files for a technician, and :class:`SeqReservation` makes sure the fresh
journal's seqs start above anything the old one may have sent, so HQ never sees a seq twice.
:func:`corrupt_alert` builds the ``alert.raised`` payload that explains the gap at HQ.

The intended start-up sequence (on the journal's writer thread)::

    reservation = SeqReservation(path.parent)
    reservation.load()
    reason = probe(path)
    if reason is not None:
        moved = move_aside(path)
        delivered = salvage_delivered(moved)
        start = reservation.start_after_corruption(salvage_last_seq(moved))
        # open a fresh journal whose first seq is ``start`` (meta last_seq = start - 1), then commit
        # Draft("alert.raised", None, orjson.dumps(corrupt_alert(path, moved, reason, delivered, start)))
    # after the open, and after every commit: reservation.ensure(journal.last_seq)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from gateway.kernel.events import AlertRaised
from gateway.kernel.journal.datadir import SEQ_FILE, fsync_dir

_LOGGER = logging.getLogger("gateway.kernel.recovery")  # one log name for all of recovery

SIDECARS: Final = ("-wal", "-shm", "-journal")
"""SQLite's companion files of a database; they belong to it and move with it."""
TAIL_ROWS: Final = 1000
"""Rows read from the end of each table and index: the pages the writer touches next."""

_HEADER: Final = b"SQLite format 3\x00"
_HEADER_BYTES: Final = 100
_WAL_HEADER_BYTES: Final = 32
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26
_SQLITE_IOERR_READ: Final = 266
_SEQ_META_KEYS: Final = ("last_seq", "delivered_seq")


# --- probe ----------------------------------------------------------------------------------------


def probe(path: Path, busy_timeout_s: float = 5.0) -> str | None:
    """Whether the journal at ``path`` can be used: None if it can (or does not exist, or is empty), else a
    short reason why it cannot ("file is not a database", "database disk image is malformed", ...).

    Cheap on purpose (milliseconds on a million-event journal): it checks the header against the file size
    and reads the schema, ``meta``, ``outbox_state`` and the last rows of every table and index, which are the
    pages the writer touches next. It does not run ``integrity_check``: that reads the whole file, too slow
    for a start-up, and a corrupt page deep in the delivered history harms nobody until it is read.

    A reason is returned only for evidence of damage (SQLite's CORRUPT and NOTADB errors, a read error, a
    header that contradicts the file). Anything else (the database is locked by another process, permission
    denied, a foreign database without our columns) raises ``sqlite3.Error`` or ``OSError``: such a file
    must not be moved aside.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    wal_frames = _has_wal_frames(path)
    if size == 0 and not wal_frames:
        return None  # SQLite treats an empty file as an empty database
    reason = _check_header(path, size, wal_frames)
    if reason is not None:
        return reason
    try:
        with _open_readonly(path, busy_timeout_s) as conn:
            return _check_contents(conn)
    except sqlite3.DatabaseError as err:
        if _is_damage(err):
            return str(err)
        raise


def is_blank(path: Path) -> bool:
    """A journal file of zero bytes with no WAL frames: SQLite would open it as an empty database."""
    try:
        return path.stat().st_size == 0 and not _has_wal_frames(path)
    except FileNotFoundError:
        return False


def _has_wal_frames(path: Path) -> bool:
    """A write-ahead log with at least one frame: pages newer than the main file may live there."""
    try:
        return _sidecar(path, "-wal").stat().st_size > _WAL_HEADER_BYTES
    except FileNotFoundError:
        return False


def _check_header(path: Path, size: int, wal_frames: bool) -> str | None:
    """The 100-byte header against the file size: catches garbage and truncation without SQLite."""
    try:
        with path.open("rb") as f:
            header = f.read(_HEADER_BYTES)
    except OSError as err:
        if err.errno != errno.EIO:
            raise
        return f"cannot read the header: {err.strerror}"
    if size == 0:
        return None  # empty main file, pages in the WAL: SQLite's checks decide
    if len(header) < _HEADER_BYTES:
        return f"file is not a database (truncated header: {size} bytes)"
    if not header.startswith(_HEADER):
        return "file is not a database (no SQLite header)"
    page_size = int.from_bytes(header[16:18])
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        return f"file is not a database (bad page size {page_size})"
    if size % page_size:
        return f"database file truncated mid-page ({size} bytes, pages of {page_size})"
    pages = int.from_bytes(header[28:32])
    size_valid = pages > 0 and header[24:28] == header[92:96]
    # A checkpoint interrupted by a power cut may have written page 1 (the new size) before the pages past
    # the old end of the file; the WAL still holds them, so the size only proves truncation without a WAL.
    if size_valid and not wal_frames and size < pages * page_size:
        return f"database file truncated ({size} bytes, header says {pages} pages of {page_size})"
    return None


@contextmanager
def _open_readonly(path: Path, busy_timeout_s: float) -> Iterator[sqlite3.Connection]:
    """A read-only connection that leaves no files behind when it can.

    Without a ``-wal`` file no other connection is open (WAL mode keeps it while any is), and the main file
    alone is the database: ``immutable=1`` then reads it without locks or ``-shm``/``-wal`` side files. With a
    ``-wal`` SQLite must read it (and lock), so a plain ``mode=ro`` connection is used.
    """
    uri = path.absolute().as_uri() + "?mode=ro"
    if not _sidecar(path, "-wal").exists():
        uri += "&immutable=1"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout_s)
    with closing(conn):
        yield conn


def _check_contents(conn: sqlite3.Connection) -> str | None:
    schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema").fetchall()
    tables = {
        name: sql or "" for kind, name, _, sql in schema if kind == "table" and not name.startswith("sqlite_")
    }
    if "events" in tables:
        conn.execute("SELECT MAX(seq) FROM events").fetchone()
    for table, sql in tables.items():
        order = "" if "WITHOUT ROWID" in sql.upper() else " ORDER BY rowid DESC"
        _consume(conn.execute(f"SELECT * FROM {_quote(table)}{order} LIMIT {TAIL_ROWS}"))  # noqa: S608
    for kind, index, table, sql in schema:
        if kind == "index" and table in tables:
            upper = (sql or "").upper()
            where = (sql or "")[upper.index(" WHERE ") + 7 :] if " WHERE " in upper else None
            _walk_index_tail(conn, index, table, where)
    if "meta" in tables:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        for key in _SEQ_META_KEYS:
            if key in meta and not _is_seq(meta[key]):
                return f"meta {key} is not a seq: {str(meta[key])[:40]!r}"
    return None


def _walk_index_tail(conn: sqlite3.Connection, index: str, table: str, where: str | None = None) -> None:
    """Read the last entries of an index: its right-most pages, where ascending keys are inserted. A partial
    index is read with its own condition (``where``, from the schema), which SQLite needs to use it."""
    info = conn.execute(f"PRAGMA index_info({_quote(index)})").fetchall()
    if not info or info[0][2] is None:
        return  # an expression index: no column to order by
    col = _quote(info[0][2])
    condition = "" if where is None else f" WHERE {where}"
    _consume(
        conn.execute(
            f"SELECT {col} FROM {_quote(table)} INDEXED BY {_quote(index)}{condition}"  # noqa: S608
            f" ORDER BY {col} DESC LIMIT {TAIL_ROWS}"
        )
    )


def _consume(cursor: sqlite3.Cursor) -> None:
    for _ in cursor:
        pass


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_seq(value: object) -> bool:
    try:
        return int(str(value)) >= 0
    except ValueError:
        return False


def _is_damage(err: sqlite3.DatabaseError) -> bool:
    """SQLite's own verdict that the file is damaged, as opposed to locked, forbidden or foreign."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or code == _SQLITE_IOERR_READ


# --- move aside and salvage -----------------------------------------------------------------------


def aside_target(path: Path, now: datetime | None = None) -> Path:
    """Where :func:`move_aside` would put the journal now: ``<name>.corrupt-<UTC time>``, with ``.2``, ``.3``...
    added so that no existing file is ever overwritten."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    base = f"{path.name}.corrupt-{when:%Y%m%dT%H%M%SZ}"
    target = path.with_name(base)
    counter = 1
    while any(_sidecar(target, s).exists() for s in ("", *SIDECARS)):
        counter += 1
        target = path.with_name(f"{base}.{counter}")
    return target


def move_aside(path: Path, now: datetime | None = None, target: Path | None = None) -> Path:
    """Rename the journal and its ``-wal``/``-shm``/``-journal`` to ``target`` (default :func:`aside_target`;
    the companions keep their suffix after the new name, so SQLite still pairs them), fsync the directory and
    return the new path of the main file.

    The companions move first: a ``-wal`` left behind next to a fresh database would be replayed into it.
    Raises ``OSError`` if a rename fails (the journal itself missing included).
    """
    names = [""] + [s for s in SIDECARS if _sidecar(path, s).exists()]
    target = target or aside_target(path, now)
    for suffix in reversed(names):
        os.rename(_sidecar(path, suffix), _sidecar(target, suffix))
    fsync_dir(path.parent)
    _LOGGER.warning("moved the unreadable journal %s aside to %s", path, target.name)
    return target


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# --- the alert ------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """File names may hold control characters; the alert's subject may not."""
    return "".join(c if c.isprintable() else "?" for c in text)


def corrupt_alert(
    path: Path, moved_to: Path, reason: str, delivered_seq: int | None, start_seq: int
) -> dict[str, Any]:
    """The ``alert.raised`` payload (validated against :class:`~gateway.kernel.events.AlertRaised`) that reports a
    journal moved aside. ``details.possibly_lost`` is ``[first, last]``: every seq after the last one HQ
    acknowledged up to the one before the fresh journal's first; null when no seq can have been used."""
    first = (delivered_seq or 0) + 1
    last = start_seq - 1
    message = (
        f"journal {path.name} could not be read ({reason}); moved aside to {moved_to.name}, "
        f"a fresh journal starts at seq {start_seq}"
    )
    details = {
        "moved_to": str(moved_to),
        "reason": reason,
        "possibly_lost": [first, last] if last >= first else None,
    }
    return _journal_alert("journal.corrupt", path, message, details)


def _journal_alert(rule: str, path: Path, message: str, details: dict[str, Any]) -> dict[str, Any]:
    """A critical ``alert.raised`` payload about the journal at ``path``, validated against the event model."""
    payload: dict[str, Any] = {
        "rule": rule,
        "severity": "critical",
        "subject": _printable(path.name)[:64] or "journal",
        "message": message[:500],
        "details": details,
    }
    AlertRaised.model_validate(payload)
    return payload


def missing_alert(
    path: Path, reserved_through: int, start_seq: int, *, forced: bool = False
) -> dict[str, Any]:
    """The ``alert.raised`` payload for a journal that was gone at start (deleted, a wiped card, a restore that
    missed it). HQ's acknowledgements went with it, so every seq up to the reservation may be lost:
    ``details.possibly_lost`` is ``[1, reserved_through]`` (null when nothing was reserved: ``--new-journal``
    on a data directory that lost its reservation too, where the old seqs cannot be known)."""
    if forced:
        message = (
            f"journal {path.name} and its seq reservation {SEQ_FILE} were both missing; started a new journal "
            f"at seq {start_seq} as asked (--new-journal): HQ may refuse seqs it has seen before"
        )
    else:
        message = (
            f"journal {path.name} was missing; a fresh journal starts at seq {start_seq}, above the seq "
            f"reservation {SEQ_FILE} ({reserved_through})"
        )
    details = {
        "reserved_through": reserved_through,
        "possibly_lost": [1, reserved_through] if reserved_through >= 1 else None,
    }
    return _journal_alert("journal.missing", path, message, details)


def move_orphans_aside(path: Path, now: datetime | None = None) -> list[Path]:
    """A ``-wal``/``-shm``/``-journal`` left without its main file belongs to a journal that is gone: SQLite
    would replay such a WAL into the fresh database. Rename each to ``<name>.orphan-<UTC time><suffix>``."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    moved: list[Path] = []
    for suffix in SIDECARS:
        source = _sidecar(path, suffix)
        if not source.exists():
            continue
        target = path.with_name(f"{path.name}.orphan-{when:%Y%m%dT%H%M%SZ}{suffix}")
        counter = 1
        while target.exists():
            counter += 1
            target = path.with_name(f"{path.name}.orphan-{when:%Y%m%dT%H%M%SZ}.{counter}{suffix}")
        os.rename(source, target)
        moved.append(target)
    if moved:
        fsync_dir(path.parent)
        _LOGGER.warning("moved %s, left without their journal, aside", ", ".join(p.name for p in moved))
    return moved


# --- corruption found at run time -----------------------------------------------------------------

SALVAGE_PLAN: Final = "journal.salvage"
"""Written before a damaged journal is moved aside, removed once the replacement is complete."""
DAMAGE_MARK: Final = "journal.damaged"
"""Written when the running gateway finds the journal damaged; the next start moves the journal aside even if
:func:`probe` (which reads only the tail) finds nothing wrong."""


def is_damage(err: sqlite3.Error) -> bool:
    """SQLite says the file is damaged (CORRUPT, NOTADB, a read error): not locked, full or forbidden."""
    return isinstance(err, sqlite3.DatabaseError) and _is_damage(err)


def mark_damaged(path: Path, reason: str, damage_id: str = "") -> None:
    """Leave the reason next to the journal for the next start; best effort (the disk may be failing too).
    ``damage_id`` names this finding: the fresh journal that replaces the file records it as handled."""
    mark = path.with_name(DAMAGE_MARK)
    record = {"reason": reason[:500], "at": datetime.now(UTC).isoformat(), "id": damage_id}
    try:
        mark.write_text(json.dumps(record) + "\n")
        fd = os.open(mark, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
    except OSError as err:
        _LOGGER.error("cannot write %s: %s", mark, err)


def read_damage_record(path: Path) -> tuple[str, str] | None:
    """``(id, reason)`` of ``journal.damaged`` (id "" for a mark without one), or None if there is no mark."""
    reason = read_damage_mark(path)
    if reason is None:
        return None
    try:
        found = json.loads(path.with_name(DAMAGE_MARK).read_bytes()).get("id")
    except (OSError, ValueError, AttributeError):
        found = None
    return (found if isinstance(found, str) else ""), reason


def write_salvage_plan(path: Path, plan: dict[str, Any]) -> None:
    """Record, durably and before the damaged journal is renamed, what replacing it involves: a start cut short
    anywhere after this resumes the replacement (:data:`SALVAGE_PLAN`) instead of taking the fresh file for the
    damaged one, or a missing journal for a lost one."""
    target = path.with_name(SALVAGE_PLAN)
    tmp = target.with_name(SALVAGE_PLAN + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(plan).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(path.parent)


def read_salvage_plan(path: Path) -> dict[str, Any] | None:
    try:
        plan = json.loads(path.with_name(SALVAGE_PLAN).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        _LOGGER.error("the salvage plan %s is unreadable (%s): ignored", SALVAGE_PLAN, err)
        return None
    keys = {"moved": str, "reason": str, "through": int, "floor": int}
    if not isinstance(plan, dict) or any(not isinstance(plan.get(k), t) for k, t in keys.items()):
        _LOGGER.error("the salvage plan %s is malformed: ignored", SALVAGE_PLAN)
        return None
    if Path(plan["moved"]).name != plan["moved"]:
        return None
    return plan


def clear_salvage_plan(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.with_name(SALVAGE_PLAN).unlink()
        fsync_dir(path.parent)


def read_damage_mark(path: Path) -> str | None:
    """The reason the running gateway left in ``journal.damaged``, or None if there is no mark."""
    mark = path.with_name(DAMAGE_MARK)
    try:
        raw = mark.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"damage mark unreadable: {err}"
    try:
        reason = json.loads(raw)["reason"]
    except (ValueError, KeyError, TypeError):
        reason = None
    return str(reason) if reason else "damage found while running"


def clear_damage_mark(path: Path) -> None:
    path.with_name(DAMAGE_MARK).unlink(missing_ok=True)


def quick_check(path: Path) -> str | None:
    """``PRAGMA quick_check`` on a separate read-only connection: None if the journal is sound, else the first
    problem SQLite reports. O(size) but no index cross-check: seconds on a large journal, so run it off the event
    loop and rarely. Raises ``sqlite3.Error``/``OSError`` for anything that is not damage (locked, missing)."""
    uri = path.absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
        with closing(conn):
            conn.execute(f"PRAGMA cache_size=-{256}")
            rows = conn.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.DatabaseError as err:
        if _is_damage(err):
            return str(err)
        raise
    if rows == [("ok",)]:
        return None
    return str(rows[0][0] if rows else "quick_check returned nothing")[:300]
