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
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.events import AlertRaised

_LOGGER = logging.getLogger(__name__)

SEQ_FILE: Final = "journal.seq"
"""The reservation sidecar, next to the journal."""
SEQ_BLOCK: Final = 1_000_000
"""Seqs reserved per write of the sidecar."""
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
        if kind == "index" and table in tables and " WHERE " not in (sql or "").upper():
            _walk_index_tail(conn, index, table)
    if "meta" in tables:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        for key in _SEQ_META_KEYS:
            if key in meta and not _is_seq(meta[key]):
                return f"meta {key} is not a seq: {str(meta[key])[:40]!r}"
    return None


def _walk_index_tail(conn: sqlite3.Connection, index: str, table: str) -> None:
    """Read the last entries of an index: its right-most pages, where ascending keys are inserted."""
    info = conn.execute(f"PRAGMA index_info({_quote(index)})").fetchall()
    if not info or info[0][2] is None:
        return  # an expression index: no column to order by
    col = _quote(info[0][2])
    _consume(
        conn.execute(
            f"SELECT {col} FROM {_quote(table)} INDEXED BY {_quote(index)} ORDER BY {col} DESC LIMIT {TAIL_ROWS}"  # noqa: S608
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


def salvage_last_seq(path: Path) -> int | None:
    """The highest seq the (damaged) journal at ``path`` shows, if anything of it can be read; best effort."""
    found: list[int] = []
    for sql in (
        "SELECT MAX(seq) FROM events",
        "SELECT value FROM meta WHERE key = 'last_seq'",
        # The newest events may have been evicted or pruned: their class's watermark moved past them.
        "SELECT MAX(delivered_seq) FROM outbox_state",
    ):
        value = _read_one(path, sql)
        if value is not None:
            found.append(value)
    return max(found) if found else None


def salvage_delivered(path: Path) -> int | None:
    """A delivered watermark of the damaged journal, if readable; best effort: the lowest per-class watermark
    (``outbox_state``), else the older global one (``meta.delivered_seq``). Every seq at or below it reached HQ."""
    # Classes with nothing waiting do not hold it back (a class that never had an event stays at 0).
    lowest = _read_one(path, "SELECT MIN(delivered_seq) FROM outbox_state WHERE pending_events > 0")
    if lowest is not None:
        return lowest
    highest = _read_one(path, "SELECT MAX(delivered_seq) FROM outbox_state")
    if highest is not None:
        return highest
    return _read_one(path, "SELECT value FROM meta WHERE key = 'delivered_seq'")


def _read_one(path: Path, sql: str) -> int | None:
    try:
        with _open_readonly(path, 0.5) as conn:
            row = conn.execute(sql).fetchone()
    except (sqlite3.Error, OSError) as err:
        _LOGGER.debug("salvage from %s failed (%s): %s", path.name, sql, err)
        return None
    if row is None or row[0] is None or not _is_seq(row[0]):
        return None
    return int(str(row[0]))


def read_meta(path: Path, key: str) -> str | None:
    """One ``meta`` value of the (sound) journal at ``path``, or None; best effort, read-only."""
    try:
        with _open_readonly(path, 0.5) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except (sqlite3.Error, OSError) as err:
        _LOGGER.debug("reading meta %s from %s failed: %s", key, path.name, err)
        return None
    return None if row is None or row[0] is None else str(row[0])


def fsync_dir(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable (POSIX: the directory entry is its own write)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# --- seq reservation ------------------------------------------------------------------------------


class SeqReservation:
    """Seqs never go backwards, even when the journal is lost: ``<data_dir>/journal.seq`` records a seq the
    journal has not reached yet (``{"reserved_through": N}``), and a fresh journal starts above it.

    Written atomically (temporary file, fsync, rename, fsync of the directory) once per block of
    ``block`` seqs, so it costs one small write per ~900,000 events. Not thread-safe: use it from the
    journal's writer thread only.
    """

    def __init__(self, data_dir: Path, block: int = SEQ_BLOCK) -> None:
        if block < 10:
            raise ValueError(f"block must be at least 10, not {block}")
        self.path = data_dir / SEQ_FILE
        self._block = block
        self._headroom = block // 10
        self._reserved = 0
        self._loaded = False
        self._failing = False

    @property
    def reserved_through(self) -> int:
        """The highest seq reserved on disk (0: nothing yet)."""
        return self._reserved

    def load(self) -> int:
        """Read the sidecar; 0 if it is missing, or unreadable (logged: the guarantee is then weaker)."""
        self._loaded = True
        self._reserved = 0
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as err:
            _LOGGER.error("cannot read the seq reservation %s: %s", self.path, err)
            return 0
        try:
            value = json.loads(raw)["reserved_through"]
        except (ValueError, KeyError, TypeError):
            value = None
        if type(value) is not int or value < 0:
            _LOGGER.error("the seq reservation %s is unreadable (%r): ignored", self.path, raw[:80])
            return 0
        self._reserved = value
        return value

    def ensure(self, last_seq: int) -> None:
        """Keep the reservation a tenth of a block ahead of ``last_seq`` (the journal's last committed seq).

        Call it once the journal is open and after every commit. One commit must add fewer than ``block/10``
        seqs, so no committed seq ever passes the reservation on disk. A failed write (disk full) is logged
        and retried on the next call; it never raises, so it cannot stall the writer.
        """
        if last_seq + self._headroom <= self._reserved:
            return
        if not self._loaded:
            self.load()
            if last_seq + self._headroom <= self._reserved:
                return
        target = last_seq + self._block
        try:
            self._write(target)
        except OSError as err:
            if not self._failing:
                _LOGGER.error("cannot write the seq reservation %s (will retry): %s", self.path, err)
            else:
                _LOGGER.debug("seq reservation write failed again: %s", err)
            self._failing = True
            return
        if self._failing:
            _LOGGER.warning("the seq reservation %s is written again", self.path)
            self._failing = False
        self._reserved = target

    def start_after_corruption(self, salvaged_last_seq: int | None = None) -> int:
        """The first seq of a fresh journal replacing a lost one: above the reservation, and above whatever
        seq could be salvaged from the old journal (in case the sidecar was lost too); 1 if there is neither.
        """
        if not self._loaded:
            self.load()
        return max(self._reserved, salvaged_last_seq or 0) + 1

    def _write(self, reserved_through: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"reserved_through": reserved_through}).encode() + b"\n"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno != errno.ENOSPC or not self.path.exists():
                raise
            # A full disk has no block for a new file, but the sidecar has one: overwrite it in place (a few
            # dozen bytes in one sector, so a power cut leaves the old number or the new one).
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data.ljust(max(len(data), os.fstat(fd).st_size)), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


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


# --- one gateway per data directory ---------------------------------------------------------------

LOCK_FILE: Final = "gateway.lock"
"""Held (``flock``) by the running gateway; its existence also marks a data directory that was used before."""


class DataDirBusyError(StoreGatewayError):
    """Another process holds the data directory's lock."""


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/gateway.lock`` for the life of the process.

    Two gateways on one data directory would both hand out seqs from the same journal and fail with
    ``UNIQUE constraint failed: events.seq`` (or worse, interleave). ``flock`` is released by the kernel when the
    holder dies, SIGKILL included, so a stale lock file never blocks a restart. The file is never deleted.

    Its lines: the holder's pid; ``state: fresh`` until a journal has been opened in the directory, then
    ``state: used`` (a journal missing together with its seq reservation is then a loss, not a first start:
    docs/OUTBOX.md, "Lost journal"); and ``damaged: <reason>`` from a run that stopped on a damaged journal
    until a start has replaced it (a second record beside ``journal.damaged``, which a failing disk may not
    have taken). A lock file without a ``state`` line is from an older release: the directory was used.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self.existed = False
        """The lock file was there before this process."""
        self.used = False
        """A journal was opened in this directory before (see the class docstring)."""
        self.damaged: tuple[str, str] | None = None
        """``(id, reason)``: a previous run stopped on a damaged journal, and no start has replaced it since."""
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirBusyError` naming the holder's pid."""
        import fcntl  # POSIX only; imported here so the module still imports elsewhere (tests of probe)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The directory itself is locked too: deleting the lock file while a gateway runs must not let a second
        # one in (it would lock a new file of the same name).
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise DataDirBusyError(self._busy_message(self._holder())) from None
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd
        self.existed = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            self.release()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.release()
            raise DataDirBusyError(self._busy_message(self._holder())) from None
        except BaseException:
            os.close(fd)
            self.release()
            raise
        self._fd = fd
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").splitlines()
        states = [line[len("state: ") :].strip() for line in previous if line.startswith("state: ")]
        # No state line: an older release's lock file (a pid), so used; an empty one is a first start cut short.
        self.used = states[0] == "used" if states else any(line.strip() for line in previous)
        damaged = [line[len("damaged: ") :].strip() for line in previous if line.startswith("damaged: ")]
        self.damaged = None
        if damaged:
            first, _, rest = damaged[0].partition(" ")
            self.damaged = (first[3:], rest) if first.startswith("id=") else ("", damaged[0])
        self._write()
        if not self.existed:
            fsync_dir(self.path.parent)  # the first-start marker must survive a power cut

    def mark_used(self) -> None:
        """A journal is open in the directory: from now on, losing it with its reservation is a loss."""
        if not self.used:
            self.used = True
            self._write()

    def note_damaged(self, reason: str, damage_id: str = "") -> None:
        """Best effort (the disk may be failing): the next start replaces the journal even without its mark."""
        self.damaged = ("".join(damage_id.split()), " ".join(reason.split())[:300] or "damaged")
        try:
            self._write()
        except OSError as err:
            _LOGGER.error("cannot record the damaged journal in %s: %s", self.path, err)

    def clear_damaged(self) -> None:
        """Best effort: a record left behind is recognised as handled by the journal that replaced the file."""
        if self.damaged is not None:
            self.damaged = None
            try:
                self._write()
            except OSError as err:
                _LOGGER.error("cannot clear the damaged-journal record in %s: %s", self.path, err)

    def _write(self) -> None:
        if self._fd is None:
            return
        lines = [str(os.getpid()), f"state: {'used' if self.used else 'fresh'}"]
        if self.damaged is not None:
            lines.append(f"damaged: id={self.damaged[0]} {self.damaged[1]}")
        data = ("\n".join(lines) + "\n").encode()
        # Overwritten in place (never truncated first: a crash in between must not lose the state lines).
        os.pwrite(self._fd, data.ljust(max(len(data), os.fstat(self._fd).st_size)), 0)
        os.fsync(self._fd)

    def _holder(self) -> str:
        with contextlib.suppress(OSError):
            return (
                self.path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip() or "unknown"
            )
        return "unknown"

    def _busy_message(self, holder: str) -> str:
        return f"another store-gateway is using {self.path.parent} (pid {holder}); lock file {self.path}"

    def release(self) -> None:
        """Unlock (the file stays: it marks the directory as used)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


# --- corruption found at run time -----------------------------------------------------------------

SALVAGE_PLAN: Final = "journal.salvage"
"""Written before a damaged journal is moved aside, removed once the replacement is complete."""
DAMAGE_MARK: Final = "journal.damaged"
"""Written when the running gateway finds the journal damaged; the next start moves the journal aside even if
:func:`probe` (which reads only the tail) finds nothing wrong."""
SALVAGE_CHUNK: Final = 500
"""Rows copied per step from a damaged journal: memory stays bounded however long the outage was."""
SALVAGE_MAX_LOOKUPS: Final = 2_000_000
"""Seq-by-seq reads past damaged pages, at most (a damaged interior page hides a whole subtree)."""
MAX_RANGES: Final = 2000
"""Seq ranges listed in an alert, at most (the rest are summarised by the count)."""

SalvagedRow = tuple[int, str, str, str | None, str, str | None, bytes, int]


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


def salvage_idempotency(path: Path, chunk: int = 2000) -> Iterator[list[tuple[str, int, float]]]:
    """The dedup keys the damaged journal still shows (``idempotency``), in chunks; stops at the first damaged
    page (best effort: the rest are lost, and a redelivery of one of those events would be taken again)."""
    after = ""
    try:
        with _open_readonly(path, 0.5) as conn:
            while True:
                rows = conn.execute(
                    "SELECT key, seq, expires_at FROM idempotency WHERE key > ? ORDER BY key LIMIT ?",
                    (after, chunk),
                ).fetchall()
                if not rows:
                    return
                yield [(str(k), int(s), float(e)) for k, s, e in rows]
                after = str(rows[-1][0])
    except (sqlite3.Error, OSError, ValueError, TypeError) as err:
        _LOGGER.warning("salvage of the dedup keys from %s stopped: %s", path.name, err)


def salvage_watermarks(path: Path) -> dict[int, int]:
    """Per class, the delivered watermark of the damaged journal (``outbox_state``), if readable."""
    try:
        with _open_readonly(path, 0.5) as conn:
            rows = conn.execute("SELECT cls, delivered_seq FROM outbox_state").fetchall()
    except (sqlite3.Error, OSError) as err:
        _LOGGER.debug("salvage of the watermarks from %s failed: %s", path.name, err)
        return {}
    return {int(c): int(s) for c, s in rows if _is_seq(c) and _is_seq(s)}


@dataclass(slots=True)
class Salvage:
    """What :func:`salvage_events` read from a damaged journal."""

    copied: list[tuple[int, int]] = field(default_factory=list)
    """Seq ranges copied into the fresh journal."""
    unreadable: list[tuple[int, int]] = field(default_factory=list)
    """Seq ranges on damaged pages: those events, if they existed, could not be read."""
    last_seq: int = 0
    """The highest seq read."""
    count: int = 0


def _add(runs: list[tuple[int, int]], seq: int) -> None:
    if runs and runs[-1][1] == seq - 1:
        runs[-1] = (runs[-1][0], seq)
    else:
        runs.append((seq, seq))


_SALVAGE_COLUMNS: Final = "seq, id, kind, device_id, recorded_at, dedup_key, body, cls"


def salvage_events(
    path: Path,
    after: int,
    through: int,
    keep: Callable[[SalvagedRow], bool],
    sink: Callable[[list[SalvagedRow]], None],
) -> Salvage:
    """Copy the readable events with seq > ``after`` of a damaged journal, in chunks, to ``sink`` (those ``keep``
    accepts: the undelivered ones); note the seqs up to ``through`` that sit on damaged pages.

    The events table is a b-tree on seq, so a scan stops at a damaged page; the scan then reads seq by seq until
    a row reads again (a damaged leaf holds a run of consecutive seqs) and resumes. Best effort: a journal that
    cannot be opened at all gives an empty result and ``unreadable`` = ``[after+1, through]``.
    """
    result = Salvage()
    chunk: list[SalvagedRow] = []

    def take(row: SalvagedRow) -> None:
        result.last_seq = max(result.last_seq, row[0])
        if keep(row):
            chunk.append(row)
            result.count += 1
            _add(result.copied, row[0])
            if len(chunk) >= SALVAGE_CHUNK:
                sink(chunk[:])
                chunk.clear()

    try:
        with _open_readonly(path, 0.5) as conn:
            cur = after
            lookups = 0
            while True:
                try:
                    for row in conn.execute(
                        f"SELECT {_SALVAGE_COLUMNS} FROM events WHERE seq > ? ORDER BY seq",  # noqa: S608
                        (cur,),
                    ):
                        take(row)
                        cur = row[0]
                    break  # the scan reached the end
                except sqlite3.DatabaseError as err:
                    if not _is_damage(err):
                        raise
                # Step over the damaged pages one seq at a time.
                resumed = False
                while cur < through and lookups < SALVAGE_MAX_LOOKUPS:
                    cur += 1
                    lookups += 1
                    try:
                        row = conn.execute(
                            f"SELECT {_SALVAGE_COLUMNS} FROM events WHERE seq = ?",  # noqa: S608
                            (cur,),
                        ).fetchone()
                    except sqlite3.DatabaseError as err:
                        if not _is_damage(err):
                            raise
                        _add(result.unreadable, cur)
                        continue
                    if row is not None:
                        take(row)
                        resumed = True
                        break
                if not resumed:
                    if cur < through:
                        result.unreadable.append((cur + 1, through))
                    break
    except (sqlite3.Error, OSError) as err:
        _LOGGER.error("salvage from %s stopped: %s", path.name, err)
        start = max(after, result.last_seq) + 1
        if start <= through:
            result.unreadable.append((start, through))
    if chunk:
        sink(chunk)
    return result


def ranges_for_alert(runs: list[tuple[int, int]]) -> list[list[int]]:
    """Runs as JSON lists, at most MAX_RANGES (the alert's size stays bounded)."""
    return [[a, b] for a, b in runs[:MAX_RANGES]]
