"""Salvage from a damaged journal: read what is still readable of a journal moved aside (its last seq, its
delivered watermarks, its dedup keys, its undelivered events), best effort, on read-only connections
(docs/OUTBOX.md, "Corrupt journal on start")."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gateway.kernel.journal.recovery import _is_damage, _is_seq, _open_readonly

_LOGGER = logging.getLogger("gateway.kernel.recovery")  # one log name for all of recovery


SALVAGE_CHUNK: Final = 500
"""Rows copied per step from a damaged journal: memory stays bounded however long the outage was."""
SALVAGE_MAX_LOOKUPS: Final = 2_000_000
"""Seq-by-seq reads past damaged pages, at most (a damaged interior page hides a whole subtree)."""
MAX_RANGES: Final = 2000
"""Seq ranges listed in an alert, at most (the rest are summarised by the count)."""

SalvagedRow = tuple[int, str, str, str | None, str, str | None, bytes, int]


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


def salvage_cursors(path: Path) -> list[tuple[str, str]]:
    """The consumers' cursors (``meta`` keys ``cursor:*``) the damaged journal still shows, if readable: a
    consumer then resumes where it was, and sees the salvaged events after its cursor."""
    try:
        with _open_readonly(path, 0.5) as conn:
            rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'cursor:%'").fetchall()
    except (sqlite3.Error, OSError) as err:
        _LOGGER.warning("salvage of the consumers' cursors from %s failed: %s", path.name, err)
        return []
    return [(str(k), str(v)) for k, v in rows]


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
