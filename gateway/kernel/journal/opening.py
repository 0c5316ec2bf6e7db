"""Opening the journal, with its recovery: a damaged journal is moved aside and what is readable of it salvaged
into a fresh one, a missing one replaced above the seq reservation (docs/OUTBOX.md, "Corrupt journal on
start", "Lost journal"); older journals are migrated; the outbox counters are loaded."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.kernel.journal.items import Draft
from gateway.kernel.journal.reader import Reader
from gateway.kernel.journal.recovery import (
    aside_target,
    clear_damage_mark,
    clear_salvage_plan,
    corrupt_alert,
    is_blank,
    missing_alert,
    move_aside,
    move_orphans_aside,
    probe,
    read_damage_record,
    read_salvage_plan,
    write_salvage_plan,
)
from gateway.kernel.journal.salvage import (
    Salvage,
    SalvagedRow,
    ranges_for_alert,
    read_meta,
    salvage_cursors,
    salvage_delivered,
    salvage_events,
    salvage_idempotency,
    salvage_last_seq,
    salvage_watermarks,
)
from gateway.kernel.journal.store import (
    HANDLED_DAMAGE,
    PENDING_ALERT,
    SALVAGED_FROM,
    SCHEMA,
    JournalError,
    connect,
    disk_full,
    events_key_unique,
    keep_private,
    meta_last_seq,
    meta_value,
    migrate,
    state_as_stored,
    write_state,
)
from gateway.kernel.journal.writer import Writer
from gateway.kernel.outbox import ClassState, of_class

_LOGGER = logging.getLogger("gateway.kernel.journal")  # one log name for the whole journal


class Opening(Writer):
    """The open (and close) of the journal, and the recovery it may need."""

    def _setup(self) -> None:
        super()._setup()
        self.reader = Reader(self.path, self.declare_corrupt)
        """The journal's read side (its own connection and thread)."""
        self.seq_floor = 0
        """A fresh journal's first seq is above this (seqs never go backwards: the seq reservation,
        gateway/kernel/journal/datadir.py)."""
        self.replaced: dict[str, Any] | None = None
        """The ``alert.raised`` payload when a corrupt journal was moved aside, or a missing one replaced, at open."""
        self._damaged: tuple[Path, str, int] | None = None
        """A journal moved aside at open, whose events are salvaged into the fresh one once it exists."""
        self.used_before = False
        """Set by the runtime when the data directory was used before (its lock file was there): a journal missing
        together with its seq reservation is then a loss, not a first start, and the open refuses it."""
        self.damage_hint: tuple[str, str] | None = None
        """Set by the runtime when the data directory's lock file says a run stopped on a damaged journal: handled
        like the damage mark (which a failing disk may not have taken)."""
        self.on_damage_handled: Callable[[], None] | None = None
        """Called once a damaged journal is replaced (the runtime clears the lock file's record)."""
        self.new_journal = False
        """``run --new-journal``: the operator accepts a fresh journal from seq 1 after losing both files."""

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_sync)
        await self.reader.open()

    def _open_sync(self) -> None:
        try:
            self._open_once()
        except JournalError as err:
            # A full disk must not keep the gateway from starting (and restarting for ever under systemd):
            # give back the space kept for this moment, and try once more.
            if not (isinstance(err.__cause__, sqlite3.Error) and disk_full(err.__cause__)):
                raise
            if not self._ballast.release("the journal could not open on a full disk"):
                raise
            self._open_once()

    def _open_once(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reservation.load()
        self._ballast.ensure(self._outbox.min_free_bytes)
        records = [r for r in (read_damage_record(self.path), self.damage_hint) if r is not None]
        plan = read_salvage_plan(self.path)
        if plan is not None and self.path.with_name(plan["moved"]).exists():
            self._resume_replacement(plan)
        else:
            try:
                reason = probe(self.path)
            except (sqlite3.Error, OSError) as err:  # locked, permissions: not damage, never moved aside
                raise JournalError(f"cannot open journal {self.path}: {err}") from err
            if reason is None and plan is not None and self.path.exists():
                reason = plan["reason"]  # found damaged, and stopped before it was moved aside
            if reason is None and records and self.path.exists():
                # A record this journal's own replacement already handled (it could not be cleared) is stale.
                handled = (read_meta(self.path, HANDLED_DAMAGE) or "").split()
                live = [r for r in records if not r[0] or r[0] not in handled]
                if live:
                    reason = f"found damaged while running: {live[0][1]}"
            if reason is not None:
                self._replace_corrupt(reason)
            elif not self.path.exists():
                self._replace_missing()
            elif is_blank(self.path) and self._reservation.reserved_through > 0:
                # Zero bytes and no WAL, yet seqs were reserved: the schema (committed before the first
                # reservation) is gone, so the file lost its contents. Kept aside, then treated as missing.
                move_aside(self.path)
                self._replace_missing()
        try:
            conn = connect(self.path, self._config.synchronous)
        except sqlite3.DatabaseError as err:
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        try:
            conn.executescript(SCHEMA)
            if self.seq_floor or self.replaced is not None:
                # Durable before anything else is copied in: a crash during the salvage below must not leave a
                # sound, empty journal that a restart would number from 1. A missing journal's alert is kept
                # with it until committed as an event.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)",
                    (str(max(self.seq_floor, meta_last_seq(conn))),),
                )
                if self.replaced is not None:
                    conn.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (PENDING_ALERT, orjson.dumps(self.replaced).decode()),
                    )
                conn.execute("COMMIT")
            migrate(conn, self.kind_class, self._config.dedup_retention_days)
            self.key_unique = events_key_unique(conn)
            self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            self._setup_processors(conn)
            if self._damaged is not None:
                moved = self._damaged[0]
                if meta_value(conn, SALVAGED_FROM) != moved.name:  # not committed by a start cut short
                    self._salvage_into(conn, *self._damaged, handled=[r[0] for r in records if r[0]])
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if self.replaced is None and PENDING_ALERT in meta:
                # The alert of a replacement whose start stopped before committing it.
                self.replaced = orjson.loads(meta[PENDING_ALERT])
            max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            self._load_state(conn, int(meta.get("delivered_seq", 0)))
            # No per-commit write of the last seq (SD wear): the highest stored seq, or, when the newest
            # events were evicted or pruned, their class's delivered watermark, which moved past them.
            watermarks = max(s.delivered_seq for s in self.state.values())
            self.last_seq = max(int(meta.get("last_seq", 0)), int(max_seq), watermarks, self.seq_floor)
            if self.seq_floor and self.seq_floor >= max(int(max_seq), watermarks):
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(self.last_seq),))
        except sqlite3.DatabaseError as err:
            conn.close()
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        except BaseException:
            conn.close()
            raise
        if self._damaged is not None or records:
            # Only now: the damaged file is aside and what could be salvaged is committed (with the ids of these
            # records, so one that cannot be cleared is known as handled). The plan goes last: a start cut
            # short before this line resumes the replacement and finds the salvage committed.
            clear_damage_mark(self.path)
            if self.on_damage_handled is not None:
                self.on_damage_handled()
            clear_salvage_plan(self.path)
            self._damaged = None
        self._conn = conn
        keep_private(self.path)
        self._cap_to_disk()
        self._reservation.ensure(self.last_seq)
        self._metrics.last_seq.set(self.last_seq)
        self._metrics.delivered_seq.set(self.delivered_seq)
        self._outbox_gauges()

    def _resume_replacement(self, plan: dict[str, Any]) -> None:
        """A start moved a damaged journal aside and stopped before the replacement was complete: finish it. The
        journal file here, if any, is the fresh one (the records of damage are about the file moved aside)."""
        moved = self.path.with_name(plan["moved"])
        if self.path.exists():
            try:
                fresh_damaged = probe(self.path)
            except (sqlite3.Error, OSError) as err:
                raise JournalError(f"cannot open journal {self.path}: {err}") from err
            if (
                fresh_damaged is not None
            ):  # it holds nothing but copies: they are salvaged again from the original
                move_aside(self.path)
        self.seq_floor = max(self.seq_floor, plan["floor"])
        self._damaged = (moved, plan["reason"], plan["through"])
        _LOGGER.critical(
            "finishing the replacement of the damaged journal (moved aside to %s), cut short by the last start",
            moved.name,
        )

    def _replace_corrupt(self, reason: str) -> None:
        """Move an unreadable journal aside; the fresh one starts above every seq the old one may have used, with
        the old one's readable undelivered events copied in (:meth:`_salvage_into`), and the alert
        (``self.replaced``) is committed first thing by the runtime."""
        last = salvage_last_seq(self.path)
        start = self._reservation.start_after_corruption(last)
        self.seq_floor = max(self.seq_floor, start - 1)
        target = aside_target(self.path)
        through = last or self.seq_floor
        plan = {"moved": target.name, "reason": reason, "through": through, "floor": self.seq_floor}
        try:
            write_salvage_plan(self.path, plan)
        except OSError as err:  # a failing or full disk: the replacement still goes ahead, resumable or not
            _LOGGER.error("cannot write the salvage plan next to %s: %s", self.path, err)
        moved = move_aside(self.path, target=target)
        self._damaged = (moved, reason, through)
        _LOGGER.critical(
            "journal %s is corrupt (%s): moved aside to %s; a fresh journal starts at seq %d",
            self.path,
            reason,
            moved.name,
            start,
        )

    def _salvage_into(
        self, conn: sqlite3.Connection, moved: Path, reason: str, through: int, handled: Sequence[str] = ()
    ) -> None:
        """Copy the undelivered events still readable in the damaged journal into the fresh one, keeping their
        seqs (all below the fresh start), ids and dedup keys, so the uplink sends them and redeliveries of them
        are still dropped. The per-class delivered watermarks come along; the alert lists the seqs that could
        not be read. One transaction: a crash half-way leaves a fresh journal without the copies (the damaged
        file stays aside for a technician), still above the reservation, so seqs stay safe."""
        watermarks = salvage_watermarks(moved)
        fallback = salvage_delivered(moved) or 0
        delivered = {c: watermarks.get(c, fallback) for c in self.state}
        floor = min(delivered.values())
        work = {c: ClassState(delivered[c], 0, 0, 0, 0) for c in self.state}

        def keep(row: SalvagedRow) -> bool:
            return row[7] in delivered and row[0] > delivered[row[7]]

        expires = time.time() + self._config.dedup_retention_days * 86400

        def sink(rows: list[SalvagedRow]) -> None:
            conn.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
            keyed = [(row[5], row[0], expires) for row in rows if row[5] is not None]
            conn.executemany("INSERT OR IGNORE INTO idempotency VALUES (?,?,?)", keyed)
            for row in rows:
                work[row[7]] = work[row[7]].stored(1, len(row[6]))

        conn.execute("BEGIN IMMEDIATE")
        try:
            result = salvage_events(moved, floor, through, keep, sink)
            # The dedup keys of events HQ already had too: a till's redelivery of a delivered sale stays a
            # duplicate after the replacement (best effort: what the damaged file still shows).
            for keys in salvage_idempotency(moved):
                conn.executemany("INSERT OR IGNORE INTO idempotency VALUES (?,?,?)", keys)
            conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", salvage_cursors(moved))
            if result.count:
                write_state(conn, work, result.last_seq)
            start = max(self.seq_floor, result.last_seq) + 1
            alert = self._salvage_alert(moved, reason, floor, start, result)
            conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    (SALVAGED_FROM, moved.name),
                    (HANDLED_DAMAGE, " ".join(handled)),
                    (PENDING_ALERT, orjson.dumps(alert).decode()),
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.seq_floor = start - 1
        self.replaced = alert
        _LOGGER.critical(
            "salvaged %d undelivered events from %s; unreadable seqs: %s",
            result.count,
            moved.name,
            alert["details"]["unreadable_seqs"][:20] or "none",
        )

    def _salvage_alert(
        self, moved: Path, reason: str, floor: int, start: int, result: Salvage
    ) -> dict[str, Any]:
        unreadable = [r for r in result.unreadable if r[1] > floor]
        # Lost, possibly: the unreadable seqs, and whatever the file no longer shows above the highest seq read
        # (a WAL cut short); the salvaged ones are not lost (they are sent again from the fresh journal).
        first_lost = min([r[0] for r in unreadable] + [max(floor, result.last_seq) + 1])
        alert = corrupt_alert(self.path, moved, reason, first_lost - 1, start)
        alert["details"]["salvaged"] = result.count
        alert["details"]["salvaged_seqs"] = ranges_for_alert(result.copied)
        alert["details"]["unreadable_seqs"] = ranges_for_alert(unreadable)
        return alert

    def _replace_missing(self) -> None:
        """No journal file. A first start, or a journal lost (deleted, a wiped card, a restore that missed it):
        seqs must not start again at 1, or HQ refuses the new events as seq conflicts. The reservation sidecar
        says how far the lost journal may have gone; with neither file, a data directory used before cannot
        know, and the open refuses unless the operator asked for a new journal."""
        move_orphans_aside(self.path)
        reserved = self._reservation.reserved_through
        if reserved > 0:
            start = reserved + 1
            self.seq_floor = max(self.seq_floor, reserved)
            self.replaced = missing_alert(self.path, reserved, start)
            _LOGGER.critical(
                "journal %s is missing; a fresh journal starts at seq %d, above the seq reservation",
                self.path,
                start,
            )
        elif self.used_before:
            if not self.new_journal:
                raise JournalError(
                    f"journal {self.path} and its seq reservation {self._reservation.path.name} are both missing "
                    f"from a data directory used before: the seqs already sent to HQ are unknown. Restore "
                    f"them, or run 'store-gateway run --new-journal' to start a new journal at seq 1 "
                    f"(HQ may refuse seqs it has seen)"
                )
            start = self.seq_floor + 1
            self.replaced = missing_alert(self.path, 0, start, forced=True)
            _LOGGER.critical(
                "journal %s and its seq reservation are missing: new journal (--new-journal)", self.path
            )

    def _load_state(self, conn: sqlite3.Connection, legacy_delivered: int) -> None:
        """Per-class counters: from ``outbox_state`` and the events stored since it was written (an index range);
        built by one scan only the first time."""
        states = state_as_stored(conn)
        if states:
            self.state.update(states)
        else:
            conn.execute("BEGIN IMMEDIATE")
            for cls in self.state:
                stored, nbytes = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events WHERE cls=?", (cls,)
                ).fetchone()
                pending = conn.execute(
                    "SELECT COUNT(*) FROM events WHERE cls=? AND seq>?", (cls, legacy_delivered)
                ).fetchone()[0]
                self.state[cls] = ClassState(legacy_delivered, stored, nbytes, pending, 0)
            write_state(
                conn, self.state, conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            )
            conn.execute("COMMIT")
        for cls in self.state:
            self.delivered[cls] = self.state[cls].delivered_seq
            state = self.state[cls]
            # Nothing waiting: the newest is at or below the watermark, where a search backwards starts.
            below = state.delivered_seq if state.pending_events <= 0 else 2**63 - 1
            newest = (
                conn.execute(
                    f"SELECT seq FROM events WHERE {of_class(cls)} AND seq<=? ORDER BY seq DESC LIMIT 1",  # noqa: S608
                    (below,),
                ).fetchone()
                if state.stored_events > 0
                else None
            )
            self.class_last_seq[cls] = int(newest[0]) if newest is not None else 0
        self._budget_checked_bytes = self.stored_bytes

    def replaced_draft(self) -> Draft:
        """The ``alert.raised`` event for :attr:`replaced`; committing it clears the alert kept in ``meta``."""
        assert self.replaced is not None
        self._replaced_draft = Draft("alert.raised", None, orjson.dumps(self.replaced))
        return self._replaced_draft

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        # The reader first: SQLite checkpoints the WAL into the main file when the LAST connection closes, and
        # only a writable connection can; a clean stop then leaves a self-contained journal.db behind.
        await self.reader.close()
        if self._conn is not None:
            await loop.run_in_executor(self._writer, self._conn.close)
        self._writer.shutdown(wait=True)
