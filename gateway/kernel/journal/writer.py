"""The writer: intake queue, group commit on the journal's writer thread, and the processor host.

Drivers hand the journal :class:`~gateway.kernel.journal.items.Draft` events and
:class:`~gateway.kernel.journal.items.Rejected` messages. The writer takes what has queued (up to
``commit_max_events``), and in ONE transaction: drops redeliveries already committed (by ``dedup_key``), gives
each new event the next ``seq``, stores the envelope bytes, stores rejects in the quarantine, runs the
pipeline (:mod:`gateway.kernel.pipeline`: the stock ledger, the rule engine), whose processors may add derived
events, and records the last seq. Only after COMMIT returns does it call each item's ``ack`` (the MQTT PUBACK):
acknowledge-after-commit.

Every call into the pipeline is here: ``setup`` at open; ``run`` inside each commit, for the new events and then
for those from ``transact`` and housekeeping; ``tick`` every :data:`~gateway.kernel.pipeline.TICK_S` when a
processor wants it; ``rollback`` after a failed commit, ``reload`` after :meth:`Writer.transact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import orjson

from gateway.kernel.consumer import CURSOR_PREFIX
from gateway.kernel.events import PAYLOADS
from gateway.kernel.journal.backlog import DISK_CHECK_S, Backlog
from gateway.kernel.journal.envelope import envelopes
from gateway.kernel.journal.items import (
    Committed,
    Draft,
    Extra,
    Rejected,
    Row,
    as_rejected,
    merge,
)
from gateway.kernel.journal.recovery import is_damage
from gateway.kernel.journal.store import (
    PENDING_ALERT,
    JournalCorruptError,
    SeqReservationError,
    disk_full,
    drop_redeliveries,
    insert_quarantine,
    write_state,
)
from gateway.kernel.outbox import TELEMETRY, of_class
from gateway.kernel.pipeline import TICK_S, Derived, Event

_LOGGER = logging.getLogger("gateway.kernel.journal")  # one log name for the whole journal

T = TypeVar("T")


CURSOR_FLUSH_S: Final = 5.0
"""Consumers' cursors are written at most this often (two pages a time: SD wear): with the first commit after
this long, or in one of their own."""
QUEUE_LIMIT: Final = 100_000
"""Items waiting for a commit. QoS 1 intake is bounded far below this by MQTT flow control (receive maximum)."""
STATE_SAVE_S: Final = 60.0
"""The outbox counters are written at most this often by commits that only add events (SD wear: a page each
time); the next open adds what was stored since (:func:`~gateway.kernel.journal.store.state_as_stored`)."""
ACK_HOLD_S: Final = 5.0
"""HQ acknowledgements are written at most this often (SD wear: the counters' page each time), with the first
commit after this long or in one of their own, unless the uplink needs its window slots back
(:meth:`Writer.hurry_acks`), the disk is low, or the journal stops. Losing them only resends what HQ
deduplicates (at most the uplink's in-flight window, which counts batches until their watermark is written)."""


class Writer(Backlog):
    """Intake, the group commit and the processors."""

    def _setup(self) -> None:
        super()._setup()
        self._hurry = asyncio.Event()
        """Ends a hold for company (:meth:`_may_wait`): something arrived that must not wait."""
        self._urgent = 0
        """Queued drafts outside the telemetry class: a commit for them starts at once."""
        self._acks_wanted = False
        """The uplink needs its window slots back: record the acknowledgements without waiting."""
        self._flushing = 0
        """Callers in :meth:`flush`: nothing is held back while one waits."""
        self._telemetry_window = self._config.telemetry_commit_window_ms / 1000
        self._state_unsaved = False
        """The outbox counters in memory are ahead of ``outbox_state`` (only by events added since)."""
        self._state_due = 0.0
        """When a commit next writes the counters even if it only adds events (monotonic)."""
        self._listeners: list[Callable[[Committed], None]] = []
        self._busy = False
        self._resume_waiters: list[tuple[int, Callable[[], None]]] = []
        self._commit_done = asyncio.Event()
        self._submitted = 0
        self._finished = 0
        self._cursors: dict[str, int] = {}
        """Consumers' cursors to record with the next commit (:meth:`save_cursor`)."""
        self._cursors_due = 0.0
        """When cursors waiting alone get a commit of their own (monotonic)."""
        self._cursors_in_commit: dict[str, int] = {}
        """The cursors the commit in progress records (set before it starts, on the event loop)."""
        self._next_tick = 0.0
        """When the pipeline's time-driven processors next get a tick (monotonic)."""
        self._replaced_draft: Draft | None = None
        """The draft of the replacement alert: committing it clears the alert kept in ``meta``."""
        prefix = orjson.dumps({"store_id": self._store_id, "gateway_id": self._gateway_id})
        self._ids_json = prefix[1:-1]

    def _setup_processors(self, conn: sqlite3.Connection) -> None:
        """At open, before anything is committed: each processor creates its tables and loads its state."""
        self._pipeline.setup(conn)

    # --- intake -----------------------------------------------------------------------------------

    def submit(self, item: Draft | Rejected) -> bool:
        """Queue an item for the next commit. False (and nothing queued) if the journal is over its limit."""
        if len(self._queue) >= QUEUE_LIMIT or self._stopping or self.corrupt is not None:
            return False
        if isinstance(item, Draft):
            if len(item.data_json) > self._config.max_payload_bytes:
                limit = self._config.max_payload_bytes
                detail = f"event body {len(item.data_json)} bytes > journal.max_payload_bytes {limit}"
                item = as_rejected(item, ValueError(detail), reason="too_large")
            elif self.disk_low and self.kind_class(item.kind) == TELEMETRY:
                # Low disk: telemetry gives way to transactions. Acknowledged, counted, reported to HQ.
                self._refused += 1
                self._refused_bytes += len(item.data_json)
                self._metrics.outbox_refused.inc()
                if item.ack is not None:
                    item.ack()
                return True
        self._queue.append(item)
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._submitted += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        if self._urgent_item(item):
            self._urgent += 1
            self._hurry.set()
        elif len(self._queue) >= self._config.commit_max_events:
            self._hurry.set()
        return True

    def _urgent_item(self, item: Draft | Rejected) -> bool:
        """A draft that must not wait for the telemetry commit window (a sale, an alert, a check-in)."""
        return isinstance(item, Draft) and self.kind_class(item.kind) != TELEMETRY

    def discard(self, origin: object) -> int:
        """Drop queued items that came in on ``origin``, a connection that died: their acknowledgements can no
        longer reach the broker, which redelivers them to the next session. Returns how many were dropped."""
        kept = deque(item for item in self._queue if item.origin is not origin or origin is None)
        dropped = len(self._queue) - len(kept)
        if dropped:
            self._queue = kept
            self._urgent = sum(1 for item in kept if self._urgent_item(item))
            if not kept:
                self._waiting_since = None
            self._finished += dropped
            self._commit_done.set()
        return dropped

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def high_water(self) -> int:
        """Drivers stop reading from their devices while this many items wait for a commit."""
        return self._config.commit_max_events

    def when_below(self, level: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, after a commit leaves fewer than ``level`` items waiting."""
        self._resume_waiters.append((level, callback))

    def _wake_waiters(self) -> None:
        if not self._resume_waiters:
            return
        pending = len(self._queue)
        ready = [cb for level, cb in self._resume_waiters if pending < level]
        self._resume_waiters = [(lv, cb) for lv, cb in self._resume_waiters if pending >= lv]
        for callback in ready:
            callback()

    def add_listener(self, listener: Callable[[Committed], None]) -> None:
        self._listeners.append(listener)

    async def flush(self) -> None:
        """Wait until everything submitted before this call is committed (and acknowledged), or discarded, and
        the acknowledgements noted so far are persisted. Later submissions do not extend the wait. The writer
        must be running."""
        target = self._submitted
        acks = self._ack_gen
        self._flushing += 1
        self._hurry.set()
        self._wakeup.set()
        try:
            while self._finished < target or self._ack_gen_persisted < acks:
                self._commit_done.clear()
                await self._commit_done.wait()
        finally:
            self._flushing -= 1

    def hurry_acks(self) -> None:
        """The uplink's window is held by acknowledged batches: record their watermarks with the next commit,
        now, instead of waiting :data:`ACK_HOLD_S` for one to ride."""
        if self._acks:
            self._acks_wanted = True
            self._hurry.set()
            self._wakeup.set()

    def _acks_due(self) -> bool:
        """Whether the acknowledgements noted so far go into the next commit (:data:`ACK_HOLD_S`)."""
        if not self._acks:
            return False
        if self._acks_wanted or self._stopping or self._flushing or self._failing or self.disk_low:
            return True
        since = self._acks_since if self._acks_since is not None else time.monotonic()
        return time.monotonic() >= since + ACK_HOLD_S

    def pending_cursor(self, name: str) -> int | None:
        """A consumer's cursor not yet committed, or None."""
        return self._cursors.get(name, self._cursors_in_commit.get(name))

    async def save_cursor(self, name: str, seq: int) -> None:
        """Record a consumer's cursor (``meta`` key ``cursor:<name>``) with the next commit, or within
        :data:`CURSOR_FLUSH_S` when nothing else commits (never a commit of its own per batch: SD wear), and at
        a clean stop. A crash before it is written makes the consumer see its last events again."""
        if not self._cursors:
            self._cursors_due = time.monotonic() + CURSOR_FLUSH_S
        self._cursors[name] = seq

    async def transact(self, work: Callable[[sqlite3.Connection], tuple[T, list[Draft]]]) -> T:
        """Run ``work(conn)`` in its own transaction on the writer thread, between group commits; the drafts it
        returns are committed in the same transaction, and go through the pipeline like any event. On any error
        everything rolls back (processors forget what they applied) and the error is raised. After success,
        processors reload (``work`` may have changed their tables, e.g. stock thresholds)."""
        loop = asyncio.get_running_loop()
        box: list[T] = []

        def run(conn: sqlite3.Connection) -> list[Draft]:
            result, drafts = work(conn)
            box.append(result)
            return drafts

        committed = await loop.run_in_executor(self._writer, self._transact_sync, run)
        if committed is not None:
            self._publish(committed)
        return box[0]

    def _transact_sync(self, run: Callable[[sqlite3.Connection], list[Draft]]) -> Committed | None:
        committed = self._commit_batch([], {}, lambda conn, _work, _moved: run(conn))
        conn = self._conn
        assert conn is not None
        self._pipeline.reload(conn)
        return committed

    # --- the writer ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer loop: group-commit what has queued until cancelled; then commit what is left. Between
        commits it enforces the disk budget and, every ``housekeeping_interval_s``, TTLs and the quarantine cap."""
        loop = asyncio.get_running_loop()
        delay = self._config.commit_max_delay_ms / 1000
        idle = min(DISK_CHECK_S, self._outbox.housekeeping_interval_s)
        try:
            while True:
                self.beat = time.monotonic()
                if self.corrupt is not None:
                    raise JournalCorruptError(f"journal {self.path} is damaged: {self.corrupt}")
                # First thing at start (disk check, TTL), then after every commit or idle second.
                try:
                    await self._maintain(loop)
                except sqlite3.Error as err:
                    if is_damage(err):
                        self.declare_corrupt(str(err))
                        continue
                    _LOGGER.error("outbox housekeeping failed, retrying later: %s", err)
                except Exception:  # a bug here must not stop the journal: log it, keep committing
                    _LOGGER.exception("outbox housekeeping failed, retrying later")
                if self._queue:
                    self._wakeup.set()
                ticking = self._pipeline.wants_ticks
                try:
                    if ticking and time.monotonic() >= self._next_tick:
                        self._next_tick = time.monotonic() + TICK_S
                        await self._commit_once(loop, tick=True, intake=False)
                    # Due cursors or watermarks with nothing queued to ride: a commit of their own.
                    if not self._queue and (
                        (self._cursors and time.monotonic() >= self._cursors_due) or self._acks_due()
                    ):
                        await self._commit_once(loop, intake=False)
                except Exception:  # a bug here must not stop the journal: log it, keep committing
                    _LOGGER.exception("a tick or a cursor commit failed, retrying later")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(idle, TICK_S) if ticking else idle):
                        await self._wakeup.wait()
                if self._wakeup.is_set():
                    wait = self._may_wait()
                    if wait > 0:
                        # Held for company (SD wear). The loop goes round meanwhile: the heartbeat, disk checks
                        # and the rules' ticks go on; an urgent item, a full batch, a flush, the uplink's
                        # hurry_acks or a stop ends the wait early.
                        self._hurry.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(min(wait, TICK_S if ticking else idle)):
                                await self._hurry.wait()
                        continue
                    if self._urgent and delay and len(self._queue) < self._config.commit_max_events:
                        await asyncio.sleep(delay)
                    self._wakeup.clear()
                    await self._commit_once(loop)
        finally:
            self._stopping = True
            await asyncio.shield(self._drain(loop))

    def _may_wait(self) -> float:
        """How long what waits may wait for company (SD wear: one fsync for many): telemetry for the commit
        window since its oldest item came, HQ acknowledgements alone for :data:`ACK_HOLD_S`; anything else, a
        full batch, a flush or a stop commits now (0)."""
        if self._stopping or self._flushing or self._failing or self.corrupt is not None or self._acks_due():
            return 0.0
        now = time.monotonic()
        if self._queue:
            if self._urgent or len(self._queue) >= self._config.commit_max_events:
                return 0.0
            since = self._waiting_since if self._waiting_since is not None else now
            return since + self._telemetry_window - now
        if self._acks and not self._acks_due():
            since = self._acks_since if self._acks_since is not None else now
            return since + ACK_HOLD_S - now
        return 0.0

    def _hold_allowance(self) -> float:
        return self._telemetry_window

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.corrupt is not None:
            _LOGGER.error("journal damaged: %d uncommitted items left (never acknowledged)", len(self._queue))
            return
        for _ in range(3 + len(self._queue) // self._config.commit_max_events):
            if not self._queue and not self._acks and not self._cursors:
                return
            await self._commit_once(loop)
        if self._queue:
            _LOGGER.error("journal stopped with %d uncommitted items (never acknowledged)", len(self._queue))

    async def _commit_once(
        self,
        loop: asyncio.AbstractEventLoop,
        extra: Extra | None = None,
        intake: bool = True,
        tick: bool = False,
    ) -> None:
        """One group commit. ``intake=False`` leaves queued items for the next one (a pruning step on a low
        disk must not fail for the space the sales would take). ``tick``: the pipeline's time-driven processors
        get their turn in it."""
        if self.corrupt is not None:
            return  # a damaged file commits nothing more: what waits is never acknowledged, and is redelivered
        n = min(len(self._queue), self._config.commit_max_events) if intake else 0
        items = [self._queue.popleft() for _ in range(n)]
        if items and self._urgent:
            self._urgent -= sum(1 for item in items if self._urgent_item(item))
        # HQ's acknowledgements ride a commit once due (ACK_HOLD_S), and always an eviction step's.
        acks: dict[int, int] = {}
        if self._acks_due() or (extra is not None and self._acks):
            acks, self._acks = self._acks, {}
            self._acks_since, self._acks_wanted = None, False
        ack_gen = self._ack_gen if acks else self._ack_gen_persisted  # what this commit persists
        # Cursors ride a commit only once due (SD wear: two pages each time), or at a stop or flush.
        cursors: dict[str, int] = {}
        if self._cursors and (self._stopping or self._flushing or time.monotonic() >= self._cursors_due):
            cursors, self._cursors = self._cursors, {}
        self._cursors_in_commit = cursors
        if not items and not acks and extra is None and not tick and not cursors:
            return
        started = time.perf_counter()
        self._busy = True
        cancelled: asyncio.CancelledError | None = None
        leftover: list[Draft | Rejected] = []
        result: Committed | None = None
        acks_written = False
        failed = False
        try:
            future = loop.run_in_executor(self._writer, self._commit_sync, items, acks, extra, tick)
            while True:
                try:
                    result, leftover = await asyncio.shield(future)
                    # Acks were written by the first transaction, which committed.
                    self._ack_gen_persisted = max(self._ack_gen_persisted, ack_gen)
                    acks_written = bool(acks)
                    break
                except asyncio.CancelledError as err:
                    # Once the thread may COMMIT, its acks must follow: finish the bookkeeping, then stop.
                    cancelled = err
        except sqlite3.Error as err:
            failed = True
            for name, seq in cursors.items():  # not recorded: with the next commit, unless newer ones wait
                self._cursors.setdefault(name, seq)
            result, leftover = None, items
            if (
                acks
                and items
                and (disk_full(err) or isinstance(err, SeqReservationError))
                and not is_damage(err)
            ):
                # HQ's acknowledgements must get to disk even when intake cannot: they are what lets the uplink
                # move on and the delivered events be pruned to make room. Tried alone, they need one page.
                acks_written, stop = await self._commit_acks_alone(loop, acks)
                cancelled = cancelled or stop
                if acks_written:
                    self._ack_gen_persisted = max(self._ack_gen_persisted, ack_gen)
            self._commit_failed(err, {} if acks_written else acks)
        finally:
            self._busy = False
            self._cursors_in_commit = {}
            self.beat = time.monotonic()
        if items and len(leftover) < len(items):
            self._waiting_since = time.monotonic() if self._queue or leftover else None
        if leftover:
            # Nothing of the leftover was committed or acknowledged: put it back in order, retry after a pause.
            self._queue.extendleft(reversed(leftover))
            self._urgent += sum(1 for item in leftover if self._urgent_item(item))
            items = items[: len(items) - len(leftover)]
            self._failing = True
            self._note_failure()
        elif not failed and (items or not self._queue):  # a pruning step alone does not show intake commits
            if self._failing_since is not None and self._ok_since is None:
                self._ok_since = time.monotonic()
            if self._failing:
                _LOGGER.warning("journal commits work again")
                self._failing = False
        self._metrics.commits.observe(time.perf_counter() - started)
        for item in items:
            if item.ack is not None:
                item.ack()
        self._finished += len(items)
        self._wake_waiters()
        self._commit_done.set()
        if result is not None:
            self._publish(result)
        elif not leftover:
            self._outbox_gauges()
        if acks_written:
            for listener in self._persist_listeners:
                listener()
        if cancelled is not None:
            raise cancelled
        if leftover:
            await asyncio.sleep(1)

    async def _commit_acks_alone(
        self, loop: asyncio.AbstractEventLoop, acks: dict[int, int]
    ) -> tuple[bool, asyncio.CancelledError | None]:
        """Commit only ``acks`` (after a combined commit failed on a full disk): (written, a cancellation that
        arrived meanwhile, to re-raise once the bookkeeping is done)."""
        future = loop.run_in_executor(self._writer, self._commit_batch, [], acks)
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError as err:
                cancelled = err
                continue
            except sqlite3.Error as err:
                _LOGGER.debug("recording HQ acknowledgements alone failed too: %s", err)
                return False, cancelled
            _LOGGER.info("disk full: recorded HQ acknowledgements in a commit of their own")
            return True, cancelled

    def _commit_failed(self, err: sqlite3.Error, acks: dict[int, int]) -> None:
        for cls, seq in acks.items():  # not persisted: written again by the next commit
            self._acks[cls] = max(seq, self._acks.get(cls, 0))
        if acks and self._acks_since is None:
            self._acks_since = time.monotonic()
        self._note_failure()
        if is_damage(err):
            self._failure = "journal_corrupt"
            self.declare_corrupt(str(err))
            return
        self._failure = "disk_full" if disk_full(err) else "journal_stalled"
        if disk_full(err):
            self._ballast.release("a commit found the disk full")
        if not self._failing:
            _LOGGER.error("journal commit failed, retrying every second: %s", err)
        self._failing = True

    def _publish(self, result: Committed) -> None:
        """Metrics, listeners and ``done`` callbacks, after COMMIT."""
        for cls, through in result.evicted_through.items():
            self.delivered[cls] = max(self.delivered[cls], through)
        self._metrics.last_seq.set(self.last_seq)
        self._metrics.delivered_seq.set(self.delivered_seq)
        for kind, count in result.kinds.items():
            self._metrics.committed.labels(kind).inc(count)
        for (device, kind), count in result.devices.items():
            self._metrics.device_events.labels(device, kind).inc(count)
        if any(kind.startswith(("alert.", "notification.")) for kind in result.kinds):
            self._metrics.count_outcomes(result.bodies)
        for driver, count in result.duplicates_by_driver.items():
            self._metrics.duplicates.labels(driver).inc(count)
        for r in result.rejected:
            self._metrics.quarantined.labels(r.driver, r.reason).inc()
        self._outbox_gauges()
        for listener in self._listeners:
            listener(result)

    def _commit_sync(
        self,
        items: list[Draft | Rejected],
        acks: dict[int, int],
        extra: Extra | None = None,
        tick: bool = False,
    ) -> tuple[Committed | None, list[Draft | Rejected]]:
        """Commit the batch; returns what was committed and the items NOT committed (a SQLite failure)."""
        try:
            return self._commit_batch(items, acks, extra, tick), []
        except sqlite3.Error:
            raise
        except Exception:
            if (extra is not None or tick) and not items:
                raise
            _LOGGER.exception("processing a batch of %d failed; committing its items one by one", len(items))
        # A bug in storing an item (a draft that cannot be serialised) must not hold back good data: commit each
        # item alone, and quarantine (with the error) the ones that fail on their own. A processor's failure
        # never gets here: the pipeline isolates it.
        merged: Committed | None = None
        for index, item in enumerate(items):
            marks = acks if index == 0 else {}
            try:
                try:
                    part = self._commit_batch([item], marks)
                except sqlite3.Error:
                    raise
                except Exception as err:
                    part = self._commit_batch([as_rejected(item, err)], marks)
            except sqlite3.Error as err:
                if index == 0:
                    raise
                _LOGGER.error("journal commit failed after %d of %d items: %s", index, len(items), err)
                return merged, items[index:]
            merged = merge(merged, part)
        return merged, []

    def _commit_batch(
        self,
        items: list[Draft | Rejected],
        acks: dict[int, int],
        extra: Extra | None = None,
        tick: bool = False,
    ) -> Committed | None:
        conn = self._conn
        assert conn is not None
        drafts = [i for i in items if isinstance(i, Draft)]
        rejected = [i for i in items if isinstance(i, Rejected)]
        if items:
            self._check_intake_room(conn, items)
        work = dict(self.state)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for cls, seq in acks.items():
                on_disk = conn.execute(
                    f"SELECT COUNT(*) FROM events WHERE {of_class(cls)} AND seq>? AND seq<=?",  # noqa: S608
                    (work[cls].delivered_seq, seq),
                ).fetchone()[0]
                work[cls] = work[cls].acknowledged(seq, on_disk)
            fresh, duplicates = drop_redeliveries(conn, drafts)
            first = self.last_seq + 1
            seq = self.last_seq
            now = time.time()
            stamp = self._envelope_args()
            synced = bool(stamp["synced"])  # what the envelopes say, and the pipeline sees
            rows: list[Row] = []
            seq = envelopes(fresh, seq, now, rows, **stamp)
            last = [seq]

            def append_drafts(drafts: list[Draft]) -> list[Event]:
                """Seqs for drafts (in this transaction); what the pipeline sees of them."""
                start = len(rows)
                last[0] = envelopes(drafts, last[0], now, rows, **stamp)
                return [
                    _event(row, draft, now, synced) for row, draft in zip(rows[start:], drafts, strict=True)
                ]

            def append(derived: Sequence[Derived]) -> list[Event]:
                return append_drafts([Draft(d.kind, d.device_id, d.data_json, d.model) for d in derived])

            pipeline = self._pipeline
            if fresh and pipeline.processors:
                pipeline.run(
                    conn, [_event(row, d, now, synced) for row, d in zip(rows, fresh, strict=True)], append
                )
            moved: dict[int, int] = {}
            if extra is not None:
                added = append_drafts(extra(conn, work, moved))
                if added and pipeline.processors:
                    pipeline.run(conn, added, append)
            if tick:
                pipeline.tick(conn, now, append)
            seq = last[0]
            conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
            expires = now + self._config.dedup_retention_days * 86400
            keyed = [(row[5], row[0], expires) for row in rows if row[5] is not None]
            if keyed:
                # Kept apart from the events: a replay is still known after TTL or the disk budget removed them.
                conn.executemany("INSERT OR REPLACE INTO idempotency VALUES (?,?,?)", keyed)
            classes: set[int] = set()
            for row in rows:
                cls = row[7]
                work[cls] = work[cls].stored(1, len(row[6]))
                classes.add(cls)
            if rejected:
                insert_quarantine(conn, rejected, now)
            if self._replaced_draft is not None and any(d is self._replaced_draft for d in fresh):
                conn.execute("DELETE FROM meta WHERE key = ?", (PENDING_ALERT,))
                self._after_commit.append(functools.partial(setattr, self, "_replaced_draft", None))
            changed = any(s is not self.state[c] for c, s in work.items())
            # Added events alone leave the counters to the next open to recount (STATE_SAVE_S); whatever moved
            # a watermark or removed events writes them now.
            save = (changed or self._state_unsaved) and (
                bool(acks)
                or extra is not None
                or self._stopping
                or self._flushing > 0
                or time.monotonic() >= self._state_due
            )
            if save:
                write_state(conn, work, seq)
            if self._cursors_in_commit:
                conn.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [(CURSOR_PREFIX + name, str(seq)) for name, seq in self._cursors_in_commit.items()],
                )
            if seq > self.last_seq:
                self._within_reservation(seq)
            conn.execute("COMMIT")
        except BaseException:
            self._after_commit.clear()
            # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR): a ROLLBACK then fails,
            # and must neither hide the real error nor skip reloading the processors' in-memory state.
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                _LOGGER.debug("ROLLBACK after a failed commit failed too", exc_info=True)
            finally:
                self._pipeline.rollback(conn)
            raise
        self._pipeline.committed()
        self.state = work
        if save:
            self._state_unsaved = False
            self._state_due = time.monotonic() + STATE_SAVE_S
        elif changed:
            self._state_unsaved = True
        for row in rows:  # before last_seq: delivered_seq reads last_seq when no class seems to wait
            self.class_last_seq[row[7]] = row[0]
        self.last_seq = seq
        hooks, self._after_commit = self._after_commit, []
        for hook in hooks:
            hook()
        self._reservation.ensure(seq)
        seq_of = {id(d): r[0] for d, r in zip(fresh, rows, strict=False)}
        for draft in drafts:
            if draft.done is not None:
                draft.done(seq_of.get(id(draft)))
        if not rows and not rejected and not duplicates:
            return None
        kinds: dict[str, int] = {}
        devices: dict[tuple[str, str], int] = {}
        for row in rows:
            kinds[row[2]] = kinds.get(row[2], 0) + 1
            if row[3] is not None:
                devices[row[3], row[2]] = devices.get((row[3], row[2]), 0) + 1
        return Committed(
            first, seq, kinds, [r[6] for r in rows], rejected, duplicates, classes, moved, devices
        )

    def _envelope_args(self) -> dict[str, Any]:
        return {"ids_json": self._ids_json, "synced": self._clock.synced(), "kind_class": self.kind_class}

    def _within_reservation(self, seq: int) -> None:
        """Never commit a seq the reservation on disk does not cover: a journal lost after this commit would
        restart below it and hand the seq out twice. The reservation is normally a tenth of a block ahead; it
        runs out only when writing it has kept failing, and then intake waits (a stall /health reports)."""
        if seq <= self._reservation.reserved_through:
            return
        self._reservation.ensure(seq)
        if seq > self._reservation.reserved_through:
            raise SeqReservationError(
                f"seq {seq} is past the seq reservation ({self._reservation.reserved_through}) and "
                f"{self._reservation.path.name} cannot be written: holding intake back"
            )


def _event(row: Row, draft: Draft, now: float, synced: bool) -> Event:
    """A committed row as the pipeline sees it, with its commit's wall-clock time. The draft's model spares a
    parse when it is the kind's payload model (or a subclass of it: the MQTT sale keeps ``occurred_at``);
    anything else is parsed on demand."""
    model = draft.model
    payload = PAYLOADS.get(row[2])
    if payload is None or not isinstance(model, payload):
        model = None
    return Event(row[0], row[2], row[3], draft.data_json, model, now, synced)  # type: ignore[arg-type]
