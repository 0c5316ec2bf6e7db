"""The outbox side of the journal (docs/OUTBOX.md): per-class counters and HQ's acknowledgements (the delivered
watermarks), the disk budget and class budgets (eviction), TTLs, the low-disk rules, the disk space kept back
from intake, and the housekeeping of the quarantine and the dedup keys.

Eviction steps run as work inside a group commit (:data:`~gateway.kernel.journal.items.Extra`), so the counters,
the rows and the ``outbox.evicted`` reports change in one transaction."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

import orjson

from gateway.kernel.journal.datadir import BALLAST_BYTES, BALLAST_FILE, Ballast
from gateway.kernel.journal.health import Health
from gateway.kernel.journal.items import QUARANTINE_KEEP_BYTES, Draft, Extra, Rejected
from gateway.kernel.journal.recovery import is_damage
from gateway.kernel.journal.store import IntakeReserveError
from gateway.kernel.outbox import (
    CLASSES,
    STATE,
    TELEMETRY,
    TRANSACTION,
    ClassState,
    eviction_order,
    eviction_reports,
    of_class,
)

_LOGGER = logging.getLogger("gateway.kernel.journal")  # one log name for the whole journal


EVICT_CHUNK: Final = 2000
"""Rows deleted per eviction step (one transaction each, so intake never waits long)."""
BUDGET_HEADROOM: Final = 0.95
"""Eviction frees space down to this share of a cap, so it does not run again at the next commit."""
PAGE_OVERHEAD: Final = 1.5
"""Pages a journal of 4 KiB pages needs per byte of events (table and indexes), for telling data over the cap
from fragmented pages."""


ROW_EXTRA: Final = 90
"""Bytes a row stores besides its event's body (seq, id, kind, device, time, key, class, record header): 70 to 130
in a store's journal (a sale's dedup key is the longest)."""
INDEX_SHARE: Final = 0.08
"""Pages of the indexes and the other tables, as a share of the events table's."""


def row_pages(payload: float, page_size: int) -> float:
    """Pages one row of ``payload`` bytes takes in a table's leaves, by SQLite's cell layout: rows that fit share
    a leaf whole (a row longer than half a leaf's room has one to itself); a longer row keeps a part in the leaf
    and the rest in overflow pages."""
    usable = page_size
    room = usable - 8  # a leaf's header
    max_local = usable - 35
    if payload <= max_local:
        return 1 / (room // (payload + 8))
    min_local = (usable - 12) * 32 // 255 - 23
    local = min_local + (payload - min_local) % (usable - 4)
    if local > max_local:
        local = min_local
    overflow = -(-(payload - local) // (usable - 4))
    return float(overflow + 1 / (room // (local + 12)))


def pages_needed(states: Mapping[int, ClassState], page_size: int) -> float:
    """Bytes of pages the events of ``states`` take without any fragmentation. With 4 KiB pages, a fixed
    :data:`PAGE_OVERHEAD` per event byte. Smaller pages hold whole rows or not (with 1 KiB pages, an event of
    about 500 to 990 bytes has a leaf to itself), so the estimate lays out each class's average row."""
    if page_size >= 4096:
        return sum(s.stored_bytes for s in states.values()) * PAGE_OVERHEAD
    pages = 0.0
    for state in states.values():
        if state.stored_events > 0:
            row = state.stored_bytes / state.stored_events + ROW_EXTRA
            pages += state.stored_events * row_pages(row, page_size)
    return float(pages * page_size * (1 + INDEX_SHARE))


DISK_CHECK_S: Final = 1.0
"""How often free disk space is read (statvfs)."""
DISK_SHARE: Final = 0.8
"""``outbox.max_bytes`` is lowered to this share of the space the journal can have at start (its pages plus the
free space above ``min_free_bytes``): a cap larger than the disk is no cap, and SQLITE_FULL comes first."""
URGENT_EVICT_BYTES: Final = 512 * 1024
"""Undelivered telemetry evicted per step to make room for sales on a full disk."""


class Backlog(Health):
    """What waits for HQ, and the budgets that bound it."""

    def _setup(self) -> None:
        super()._setup()

        self.state: dict[int, ClassState] = {c: ClassState() for c in range(len(CLASSES))}
        """Per-class outbox counters as of the last COMMIT (owned by the writer thread)."""
        self.delivered: dict[int, int] = dict.fromkeys(range(len(CLASSES)), 0)
        """Per-class delivered watermark as the uplink knows it (may be ahead of what is persisted)."""
        self.class_last_seq: dict[int, int] = dict.fromkeys(range(len(CLASSES)), 0)
        self._acks: dict[int, int] = {}
        self._ack_gen = 0
        self._ack_gen_persisted = 0
        self._acks_since: float | None = None
        """When the oldest acknowledgement not yet persisted was noted (monotonic)."""
        self._refused = 0
        self._refused_bytes = 0
        self.disk_low = False
        self.max_bytes = self._outbox.max_bytes
        """The cap in force: ``outbox.max_bytes``, lowered at open to what the disk can hold (DISK_SHARE)."""
        self._disk_checked = 0.0
        self._budget_checked_bytes = 0
        self._next_housekeeping = 0.0
        self._progress = 0
        """Eviction steps committed (read by the loop between steps to tell progress from a failed commit)."""
        self._overall_evicting = False
        self._fragmented_warned = False
        self._ballast = Ballast(self.path.parent / BALLAST_FILE)
        self._persist_listeners: list[Callable[[], None]] = []
        self.key_unique = False
        self.page_size = 4096
        """The journal's page size (:func:`pages_needed`): set at open."""
        """The events table has a UNIQUE index on dedup_key (a journal made before it was dropped): set at open."""

    # --- outbox views -------------------------------------------------------------------------------

    @property
    def delivered_seq(self) -> int:
        """Every event with a seq at or below this is delivered (or evicted): a conservative global watermark."""
        waiting = [self.delivered[c] for c in self.delivered if self.class_last_seq[c] > self.delivered[c]]
        return min(waiting) if waiting else self.last_seq

    @property
    def caught_up(self) -> bool:
        return all(self.class_last_seq[c] <= self.delivered[c] for c in self.delivered)

    @property
    def backlog(self) -> int:
        """Events waiting for HQ, as of the last commit."""
        return sum(s.pending_events for s in self.state.values())

    @property
    def stored_bytes(self) -> int:
        return sum(s.stored_bytes for s in self.state.values())

    def add_persist_listener(self, listener: Callable[[], None]) -> None:
        """Called after a commit that recorded acknowledgements (the uplink frees window slots then)."""
        self._persist_listeners.append(listener)

    @property
    def acks_persisted(self) -> bool:
        return self._ack_gen_persisted >= self._ack_gen

    @property
    def ack_generation(self) -> tuple[int, int]:
        """(acknowledgements noted, acknowledgements persisted): each note_delivered adds one to the first."""
        return self._ack_gen, self._ack_gen_persisted

    def note_delivered(self, cls: int, seq: int) -> None:
        """HQ acknowledged every event of class ``cls`` up to ``seq``; persisted by the next commit."""
        if seq > self.delivered[cls]:
            self.delivered[cls] = seq
            self._acks[cls] = seq
            self._ack_gen += 1
            if self._acks_since is None:
                self._acks_since = time.monotonic()
            self._metrics.delivered_seq.set(self.delivered_seq)
            self._wakeup.set()

    def delivered_watermarks(self) -> dict[int, int]:
        """A copy of the per-class delivered watermarks as the uplink knows them."""
        return dict(self.delivered)

    def last_seqs(self) -> dict[int, int]:
        """A copy of the highest committed seq of each class."""
        return dict(self.class_last_seq)

    def class_last(self, cls: int) -> int:
        """The highest committed seq of class ``cls`` (0: none yet)."""
        return self.class_last_seq[cls]

    def waiting_classes(self, positions: dict[int, int]) -> list[int]:
        """The classes with committed events above their position in ``positions`` (a class -> seq map)."""
        last = self.class_last_seq
        return [c for c in positions if last[c] > positions[c]]

    def _outbox_gauges(self) -> None:
        """After every COMMIT, also those that wrote no event (acknowledgements, pruning delivered events)."""
        for cls, state in self.state.items():
            name = CLASSES[cls]
            self._metrics.outbox_pending.labels(name).set(state.pending_events)
            self._metrics.outbox_bytes.labels(name).set(state.stored_bytes)

    def _cap_to_disk(self) -> None:
        """Lower the cap in force to a safe share of what this disk can give the journal (seen at start)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        used = self._used_bytes()
        room = used + max(0, free - self._outbox.min_free_bytes)
        # Never below what is stored already: a cap under it would make the budget evict undelivered sales at
        # every start on a full disk. It only stops further growth; pruning delivered events makes room.
        safe = max(1024 * 1024, int(room * DISK_SHARE), used)
        if safe < self._outbox.max_bytes:
            _LOGGER.warning(
                "outbox.max_bytes %d MiB is more than this disk can hold: capping the journal at %d MiB "
                "(%d%% of its pages plus the free space above outbox.min_free_bytes)",
                self._outbox.max_bytes // 2**20,
                safe // 2**20,
                int(DISK_SHARE * 100),
            )
            self.max_bytes = safe

    # --- disk budget, TTL, low disk -----------------------------------------------------------------

    def _check_intake_room(self, conn: sqlite3.Connection, items: Sequence[Draft | Rejected]) -> None:
        """Raise :class:`IntakeReserveError` when committing ``items`` would eat into the last
        :meth:`_intake_reserve` bytes of the disk and the file has too few free pages of its own to hold them.

        That space is kept for HQ's acknowledgements, pruning steps and the WAL checkpoint: if sales took it,
        nothing could be pruned and the disk would stay full after HQ is back."""
        try:
            st = os.statvfs(self.path.parent)  # now, not at the last check: one commit can take megabytes
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free >= self._intake_reserve():
            return
        need = 64 * 1024 + 3 * sum(
            len(i.data_json) if isinstance(i, Draft) else min(i.size, QUARANTINE_KEEP_BYTES) for i in items
        )
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        reusable = conn.execute("PRAGMA freelist_count").fetchone()[0] * page_size
        if reusable < need:
            raise IntakeReserveError(
                f"disk full: {free} bytes free, kept for acknowledgements and pruning; "
                f"{reusable} bytes of free pages in the journal"
            )

    def _checkpoint(self) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _intake_reserve(self) -> int:
        return max(1024 * 1024, min(self._outbox.min_free_bytes // 2, BALLAST_BYTES))

    async def _maintain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Between commits: read free disk space (each second), enforce budgets when they may be exceeded, run
        TTL and quarantine housekeeping on its interval. Each step is its own short transaction."""
        now = time.monotonic()
        if now - self._disk_checked >= DISK_CHECK_S:
            self._disk_checked = now
            self._check_disk()
        housekeeping = now >= self._next_housekeeping
        if housekeeping:
            self._next_housekeeping = now + self._outbox.housekeeping_interval_s
        over = self._over_class_budget() is not None
        grown = self.stored_bytes - self._budget_checked_bytes > min(1024 * 1024, self.max_bytes // 100)
        if self._refused and (housekeeping or not self.disk_low):
            count, nbytes = self._refused, self._refused_bytes
            reported: list[bool] = []
            await self._commit_once(loop, functools.partial(self._report_refused, count, nbytes, reported))
            if reported:  # else the commit failed: the refusals stay counted for the next try
                self._refused -= count
                self._refused_bytes -= nbytes
        if self.disk_low:
            # SQLite checkpoints only once the WAL holds 4 MiB (CHECKPOINT_BYTES); on a low disk, checkpoint
            # now, so the next commit writes the WAL from its start again, in blocks the file already has.
            try:
                await loop.run_in_executor(self._writer, self._checkpoint)
            except sqlite3.Error as err:
                if is_damage(err):
                    raise
                # The main file may have to grow to take the WAL's pages: pruning below can still free some.
                _LOGGER.debug("checkpoint on a low disk failed: %s", err)
        if not (housekeeping or over or grown or self.disk_low):
            return
        for _ in range(100_000):  # bounded: each step evicts a chunk or stops
            # Read again before every step: once the waiting sales commit, nothing more is evicted for them.
            urgent = self._refused_class()
            step = await loop.run_in_executor(self._writer, self._plan_eviction, housekeeping, urgent)
            if step is None:
                break
            progress = self._progress
            await self._commit_once(loop, step, intake=not self.disk_low)
            if self._progress == progress:
                break  # nothing removed (or the commit failed): try again later
            if self._queue:
                await self._commit_once(loop)  # intake keeps flowing between eviction steps
        # Growth is measured from what is left after evicting: measured from before, whatever was freed would
        # have to be written again before the next check, and the journal would overshoot its cap by that much.
        self._budget_checked_bytes = self.stored_bytes
        if housekeeping:
            await loop.run_in_executor(self._writer, self._trim_quarantine)
            await loop.run_in_executor(self._writer, self._expire_idempotency)

    def _check_disk(self) -> None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        self._metrics.disk_free.set(free)
        low = free < self._outbox.min_free_bytes
        if low != self.disk_low:
            if low:
                _LOGGER.warning("disk low: %d MiB free; refusing new telemetry", free // 2**20)
            else:
                _LOGGER.info("disk space recovered: %d MiB free; accepting telemetry again", free // 2**20)
            self.disk_low = low

    def _report_refused(
        self,
        count: int,
        nbytes: int,
        reported: list[bool],
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
    ) -> list[Draft]:
        reports = eviction_reports(TELEMETRY, "disk_low", [], refused=count, refused_bytes=nbytes)

        def committed() -> None:
            self._metrics.outbox_evicted.labels("telemetry", "disk_low").inc(count)
            reported.append(True)

        self._after_commit.append(committed)
        return [Draft("outbox.evicted", None, orjson.dumps(r)) for r in reports]

    def _over_class_budget(self) -> int | None:
        for name, budget in self._outbox.classes.items():
            cls = CLASSES.index(name)
            if budget.max_bytes is not None and self.state[cls].stored_bytes > budget.max_bytes:
                return cls
        return None

    def _used_bytes(self) -> int:
        conn = self._conn
        assert conn is not None
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _refused_class(self) -> int | None:
        """``transaction`` or ``critical`` (the highest waiting) while the full disk keeps such events out of the
        journal; else None (state and telemetry never make room for each other)."""
        if not (self._failing and self._failure == "disk_full" and self._queue):
            return None
        classes = [self.kind_class(item.kind) for item in self._queue if isinstance(item, Draft)]
        urgent = min(classes, default=None)
        return urgent if urgent is not None and urgent <= TRANSACTION else None

    def _plan_eviction(self, housekeeping: bool, urgent: int | None = None) -> Extra | None:
        """On the writer thread: the next eviction step (a function run inside a commit), or None if within
        every budget and TTL. ``urgent``: a class the full disk keeps out (sales waiting); undelivered events of
        lower classes then make room for it, when nothing delivered is left to prune."""
        if housekeeping:
            for name, budget in self._outbox.classes.items():
                if budget.ttl_days is None:
                    continue
                cutoff = datetime.fromtimestamp(time.time() - budget.ttl_days * 86400, UTC)
                text = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                step = self._ttl_step(CLASSES.index(name), text)
                if step is not None:
                    return step
        if self.disk_low:
            # Low disk: events HQ already has go first, to make room (pages freed inside the file are reused by
            # the next commits, so the file stops growing). Nothing undelivered is touched here.
            for victim in eviction_order(self.state, False):
                if self._has_rows(victim.cls, True):
                    return functools.partial(
                        self._evict, victim.cls, True, "disk_low", None, self._outbox.min_free_bytes
                    )
            # The disk filled (with HQ away, or by something else on it) and sales wait while telemetry HQ has not
            # taken yet is kept: the lower classes go first, oldest first, counted and reported like any eviction.
            for lower in (TELEMETRY, STATE):
                if urgent is not None and lower > urgent and self._has_rows(lower, False):
                    # Small steps: each one's WAL pages must fit on the nearly full disk.
                    return functools.partial(self._evict, lower, False, "disk_low", None, URGENT_EVICT_BYTES)
        cls = self._over_class_budget()
        if cls is not None:
            budget_bytes = self._outbox.classes[CLASSES[cls]].max_bytes
            assert budget_bytes is not None
            delivered = self.state[cls].stored_events > self.state[cls].pending_events
            return functools.partial(
                self._evict, cls, delivered, "class_budget", int(budget_bytes * BUDGET_HEADROOM), None
            )
        limit = self.max_bytes
        used = self._used_bytes()
        if used > limit or (self._overall_evicting and used > limit * BUDGET_HEADROOM):
            self._overall_evicting = True
            # Event bytes stand in for pages (a row frees at least its body, plus index entries); each step frees
            # about the excess and the next one measures again, so eviction stops near 5% under the cap
            # instead of removing whole chunks.
            free = max(1, used - int(limit * BUDGET_HEADROOM))
            # Classes share the table's pages: evicting one leaves pages part-full, which SQLite does not give
            # back. Undelivered events go only while the event bytes themselves could fill the cap; otherwise
            # the pages are fragmented, and dropping sales would not shrink them (min_free_bytes still guards
            # the disk).
            undelivered = pages_needed(self.state, self.page_size) > limit * BUDGET_HEADROOM
            if any(self._has_rows(v.cls, v.delivered) for v in eviction_order(self.state, undelivered)):
                return functools.partial(self._evict_for_disk, free, undelivered)
            if not undelivered and not self._fragmented_warned:
                self._fragmented_warned = True
                _LOGGER.warning(
                    "journal uses %d MiB of pages for %d MiB of events (over outbox.max_bytes, fragmented): "
                    "keeping undelivered events; stop the gateway and VACUUM the journal to compact it",
                    used // 2**20,
                    self.stored_bytes // 2**20,
                )
        self._overall_evicting = False
        return None

    def _has_rows(self, cls: int, delivered: bool) -> bool:
        conn = self._conn
        assert conn is not None
        state = self.state[cls]
        # The counters are exact in memory: no query (telemetry has no index to ask) when they say there is none.
        if delivered:
            if state.stored_events <= state.pending_events:
                return False
            sql = f"SELECT 1 FROM events WHERE {of_class(cls)} AND seq>=? AND seq<=? LIMIT 1"  # noqa: S608
            return conn.execute(sql, (state.floor_seq, state.delivered_seq)).fetchone() is not None
        if state.pending_events <= 0:
            return False
        sql = f"SELECT 1 FROM events WHERE {of_class(cls)} AND seq>=? LIMIT 1"  # noqa: S608
        return conn.execute(sql, (max(state.floor_seq, state.delivered_seq + 1),)).fetchone() is not None

    def _ttl_step(self, cls: int, cutoff: str) -> Extra | None:
        conn = self._conn
        assert conn is not None
        if self.state[cls].stored_events <= 0:
            return None
        oldest = conn.execute(
            f"SELECT recorded_at FROM events WHERE {of_class(cls)} AND seq>=? ORDER BY seq LIMIT 1",  # noqa: S608
            (self.state[cls].floor_seq,),
        ).fetchone()
        if oldest is None or oldest[0] >= cutoff:
            return None
        return functools.partial(self._evict_expired, cls, cutoff)

    def _evict_expired(
        self,
        cls: int,
        cutoff: str,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
    ) -> list[Draft]:
        sql = (
            "SELECT seq, length(body), recorded_at, instr(body, '\"clock_synced\":false') > 0"  # noqa: S608
            f" FROM events WHERE {of_class(cls)} AND seq>=? ORDER BY seq LIMIT ?"
        )
        rows = conn.execute(sql, (work[cls].floor_seq, EVICT_CHUNK)).fetchall()
        delivered = work[cls].delivered_seq
        # Only the expired prefix: a wall-clock step back makes recorded_at non-monotonic in seq, and eviction
        # removes a seq range and moves the delivered watermark past it, so it must never skip a live row. An
        # undelivered event stamped by an unsynchronised clock is never "expired": a Pi without a real-time
        # clock may have stamped today's sale with last year's date.
        expired = [
            (seq, size)
            for seq, size, _, _ in itertools.takewhile(
                lambda r: r[2] < cutoff and not (r[3] and r[0] > delivered), rows
            )
        ]
        if not expired:
            return []
        return self._remove(conn, work, moved, cls, expired, "ttl", oldest=True)

    def _evict_for_disk(
        self,
        free_bytes: int,
        undelivered: bool,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
    ) -> list[Draft]:
        """One disk-budget step: free ``free_bytes`` going down the eviction order, at most EVICT_CHUNK rows.

        The whole order in one step: intake commits between steps, and a step that took only its first victim
        would find fresh telemetry every time and never reach ``state`` while the journal grows past its cap."""
        drafts: list[Draft] = []
        left = EVICT_CHUNK
        limit = self.max_bytes * BUDGET_HEADROOM
        for victim in eviction_order(work, undelivered):
            if free_bytes <= 0 or left <= 0:
                break
            if not victim.delivered and pages_needed(work, self.page_size) <= limit:
                break  # what is left fits: the rest of the excess is part-full pages (see _plan_eviction)
            before = work[victim.cls].stored_bytes
            stored = work[victim.cls].stored_events
            drafts += self._evict(
                victim.cls, victim.delivered, "disk_budget", None, free_bytes, conn, work, moved, left
            )
            free_bytes -= before - work[victim.cls].stored_bytes
            left -= stored - work[victim.cls].stored_events
        return drafts

    def _evict(
        self,
        cls: int,
        delivered: bool,
        reason: str,
        down_to: int | None,
        free_bytes: int | None,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
        max_rows: int = EVICT_CHUNK,
    ) -> list[Draft]:
        """Remove the oldest events of ``cls`` (delivered ones, or undelivered ones) in one chunk: just enough to
        bring the class's bytes down to ``down_to`` (class budget), or to free ``free_bytes`` (disk budget)."""
        state = work[cls]
        # One lower bound each (SQLite starts a range at the first one it is given).
        if delivered:
            sql = f"SELECT seq, length(body) FROM events WHERE {of_class(cls)} AND seq>=? AND seq<=?"  # noqa: S608
            sql += " ORDER BY seq LIMIT ?"
            params: tuple[int, ...] = (state.floor_seq, state.delivered_seq, max_rows)
        else:
            sql = (
                f"SELECT seq, length(body) FROM events WHERE {of_class(cls)} AND seq>=? ORDER BY seq LIMIT ?"  # noqa: S608
            )
            params = (max(state.floor_seq, state.delivered_seq + 1), max_rows)
        rows = conn.execute(sql, params).fetchall()
        excess = state.stored_bytes - down_to if down_to is not None else free_bytes
        if excess is not None:
            total = 0
            for n, (_, size) in enumerate(rows):
                total += size
                if total >= excess:
                    rows = rows[: n + 1]
                    break
        if not rows:
            return []
        # The class's oldest events: its delivered ones, or its undelivered ones when none delivered is left.
        oldest = delivered or state.stored_events == state.pending_events
        return self._remove(conn, work, moved, cls, rows, reason, oldest=oldest)

    def _remove(
        self,
        conn: sqlite3.Connection,
        work: dict[int, ClassState],
        moved: dict[int, int],
        cls: int,
        rows: list[tuple[int, int]],
        reason: str,
        *,
        oldest: bool,
    ) -> list[Draft]:
        """Delete these rows of class ``cls`` (seq-ordered, every row of the class between the first and the
        last). Undelivered ones are counted and reported in ``outbox.evicted`` drafts, committed in the same
        transaction. ``oldest``: no row of the class is below them, so the class's ``floor_seq`` moves past them."""
        state = work[cls]
        first, last = rows[0][0], rows[-1][0]
        conn.execute(f"DELETE FROM events WHERE {of_class(cls)} AND seq>=? AND seq<=?", (first, last))  # noqa: S608
        lost = [(seq, size) for seq, size in rows if seq > state.delivered_seq]
        nbytes = sum(size for _, size in rows)
        new = state.removed(
            len(rows), nbytes, len(lost), last if lost else None, last + 1 if oldest else None
        )
        work[cls] = new
        name = CLASSES[cls]

        def committed() -> None:
            self._progress += 1
            if len(rows) > len(lost):  # a chunk may hold both (TTL): delivered ones are pruned, not lost
                self._metrics.outbox_pruned.labels(name).inc(len(rows) - len(lost))
            if lost:
                self._metrics.outbox_evicted.labels(name, reason).inc(len(lost))
                _LOGGER.warning(
                    "outbox: evicted %d undelivered %s events (seq %d..%d, %s)",
                    len(lost),
                    name,
                    lost[0][0],
                    last,
                    reason,
                )

        self._after_commit.append(committed)
        if not lost:
            return []
        moved[cls] = last
        reports = eviction_reports(cls, reason, lost)
        return [Draft("outbox.evicted", None, orjson.dumps(r)) for r in reports]

    def _expire_idempotency(self) -> None:
        """Forget dedup keys older than ``journal.dedup_retention_days``, in bounded steps. In a journal made
        with a UNIQUE index on the events' dedup_key (before it was dropped), a key whose event is still stored is
        kept for another period instead (the index would otherwise turn a replay into a failed commit)."""
        conn = self._conn
        assert conn is not None
        now = time.time()
        later = now + self._config.dedup_retention_days * 86400
        for _ in range(100):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A key that expired more than a whole retention ago was stamped by a clock far behind (a box
                # that booted near 1970 and synced since), or the box was off that long: kept another period
                # rather than trusted to be old, like a key whose event is still stored.
                stored = (
                    " OR EXISTS (SELECT 1 FROM events WHERE dedup_key = idempotency.key)"
                    if self.key_unique
                    else ""
                )
                rows = conn.execute(
                    f"SELECT key, expires_at < ?{stored}"  # noqa: S608 (no input in the SQL)
                    " FROM idempotency WHERE expires_at < ? ORDER BY expires_at LIMIT ?",
                    (now - self._config.dedup_retention_days * 86400, now, EVICT_CHUNK),
                ).fetchall()
                conn.executemany(
                    "DELETE FROM idempotency WHERE key = ?", [(k,) for k, kept in rows if not kept]
                )
                conn.executemany(
                    "UPDATE idempotency SET expires_at = ? WHERE key = ?",
                    [(later, k) for k, kept in rows if kept],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if len(rows) < EVICT_CHUNK:
                return

    def _trim_quarantine(self) -> None:
        conn = self._conn
        assert conn is not None
        keep = self._outbox.quarantine_max_rows
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "DELETE FROM quarantine WHERE qid <= (SELECT COALESCE(MAX(qid), 0) FROM quarantine) - ?",
                (keep,),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
