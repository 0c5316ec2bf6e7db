"""Storing a group of batches in PostgreSQL in four round trips, whatever the number of batches and events.

The shared path (:mod:`cloud_bridge.hq.sql_writes`) stores one batch at a time inside a savepoint, waiting on
each statement: about eight round trips per batch, so the receiver's CPU and the database's add up instead of
overlapping. Here the whole group goes in psycopg's pipeline mode, set-based:

1. ``BEGIN`` and ``COPY`` the group's events into a temporary table (binary, rows made by psycopg's C code).
2. Lock every gateway of the group (one upsert, in (store, gateway) order, returning their watermarks); insert
   every event (one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, returning what went in where); read the
   runs the new seqs touch. One round trip.
3. What was new, duplicate or a conflict, the merged runs and each gateway's counters and watermarks are worked
   out here exactly as the shared path does batch by batch; then the runs are replaced, the gateways updated
   and the transaction committed in one more round trip.

Only when something was not inserted (a redelivered batch, a conflict) is one more query needed, to read what
holds those seqs. Batches carrying reports (evictions, journal losses, clock anchors) or events recorded before
the clock was synchronised take the shared path, as does a group in which the database refuses a value: there
each batch has its savepoint, so a bad one is rejected alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from cloud_bridge.hq.model import (
    REPORT_KINDS,
    BatchRejectedError,
    BatchToStore,
    EventRow,
    LostWatermark,
    Rejection,
    StoreResult,
)
from cloud_bridge.hq.ranges import merge
from cloud_bridge.hq.sql_schema import receipt_fields
from cloud_bridge.hq.sql_writes import SqlWrites, rows_to_store
from cloud_bridge.wire import MAX_SEQ
from gateway.kernel.outbox import seq_ranges

_LOCK_GATEWAYS: Final = (
    "INSERT INTO gateways (store_id, gateway_id) SELECT s, g FROM unnest(%b::text[], %b::text[]) AS k(s, g)"
    ' ORDER BY s COLLATE "C", g COLLATE "C"'
    " ON CONFLICT (store_id, gateway_id) DO UPDATE SET store_id = excluded.store_id"
    " RETURNING store_id, gateway_id, max_seq, complete_through, last_received_at, mark_through, mark_at,"
    " lost_through"
)
"""Creates or locks every gateway row of the group in code-point order (``COLLATE "C"``), the order Python sorts
``str`` in and so the one the receiver sorts a group in for the shared path: whatever the database's collation,
two receivers lock gateways in one order."""
_INCOMING: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS hq_incoming (n int8, id text, s text, g text, seq int8, kind text,"
    " dev text, rec text, boot text, mono int8, synced bool, body bytea, rno text, orno text)"
    " ON COMMIT DELETE ROWS"
)
"""The group's events on their way in: this connection's own, emptied at every commit."""
_INCOMING_TYPES: Final = (
    "int8",
    "text",
    "text",
    "text",
    "int8",
    "text",
    "text",
    "text",
    "text",
    "int8",
    "bool",
    "bytea",
    "text",
    "text",
)
_COPY_EVENTS: Final = "COPY hq_incoming FROM STDIN (FORMAT BINARY)"
_INSERT_EVENTS: Final = (
    "INSERT INTO events (id, store_id, gateway_id, seq, kind, device_id, recorded_at, received_at, boot_id,"
    " mono_ns, clock_synced, body, receipt_no, original_receipt_no)"
    " SELECT id, s, g, seq, kind, dev, rec::timestamptz, %b, boot, mono, synced, body, rno, orno"
    " FROM hq_incoming ORDER BY n ON CONFLICT DO NOTHING RETURNING store_id, gateway_id, seq, id"
)
"""Every event of the group in one statement, in the group's order (the first of two rows claiming one id or
seq is the one stored, as when batches are stored one after the other). What it returns says what was inserted
where: a row of the group is new only if its own id went in at its own (store, gateway, seq)."""
_WINDOWS: Final = "unnest(%b::text[], %b::text[], %b::int8[], %b::int8[]) AS w(s, g, lo, hi)"
_TOUCHED_RUNS: Final = (
    f"SELECT r.store_id, r.gateway_id, r.first_seq, r.last_seq FROM runs r JOIN {_WINDOWS}"  # noqa: S608
    " ON r.store_id = w.s AND r.gateway_id = w.g AND r.last_seq >= w.lo AND r.first_seq <= w.hi"
)
_DELETE_RUNS: Final = (
    f"DELETE FROM runs r USING {_WINDOWS}"  # noqa: S608 - constants
    " WHERE r.store_id = w.s AND r.gateway_id = w.g AND r.last_seq >= w.lo AND r.first_seq <= w.hi"
)
_INSERT_RUNS: Final = (
    "INSERT INTO runs (store_id, gateway_id, first_seq, last_seq)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::int8[], %b::int8[])"
)
_HELD: Final = (
    "SELECT e.store_id, e.gateway_id, e.seq, e.id FROM events e"
    " JOIN unnest(%b::text[], %b::text[], %b::int8[]) AS k(s, g, seq)"
    " ON e.store_id = k.s AND e.gateway_id = k.g AND e.seq = k.seq"
)
_UPDATE_GATEWAYS: Final = (
    "UPDATE gateways AS gw SET max_seq = v.max_seq, complete_through = v.through, events = gw.events + v.new,"
    " duplicates = gw.duplicates + v.dup, conflicts = gw.conflicts + v.conf,"
    " newest_recorded_at = coalesce(v.newest::timestamptz, gw.newest_recorded_at), last_received_at = %b,"
    " mark_through = v.mark_through, mark_at = v.mark_at, lost_through = v.lost_through"
    " FROM unnest(%b::text[], %b::text[], %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::text[],"
    " %b::int8[], %b::timestamptz[], %b::int8[])"
    " AS v(s, g, max_seq, through, new, dup, conf, newest, mark_through, mark_at, lost_through)"
    " WHERE gw.store_id = v.s AND gw.gateway_id = v.g"
)

Key = tuple[str, str]


class _SharedPath(Exception):  # noqa: N818 - a signal, not an error
    """The group goes the shared way, batch by batch in savepoints."""


@dataclass(slots=True)
class _Gateway:
    """One gateway's row while its batches of the group are worked out."""

    max_seq: int
    complete_through: int | None
    watermark: LostWatermark
    newest: str | None = None
    new: int = 0
    duplicates: int = 0
    conflicts: int = 0
    seqs: list[int] = field(default_factory=list)
    """Seqs that hold an event now (this group's, whoever's event it is)."""


def fits(item: BatchToStore | Rejection) -> bool:
    """Whether a message can be stored set-based: no report to apply, no clock to correct."""
    if isinstance(item, Rejection):
        return True
    assert item.rows is not None
    return not any(
        r.kind in REPORT_KINDS or (r.clock_synced is False and r.mono_ns is not None) for r in item.rows
    )


class PgGroupWrites(SqlWrites):
    """``apply`` for PostgreSQL: the group set-based in a few round trips (see the module docstring)."""

    _incoming_on: Any = None
    """The connection the temporary table was made on (a new connection needs its own)."""

    def apply(self, items: Iterable[BatchToStore | Rejection]) -> list[StoreResult | Rejection]:
        ready = [self._with_rows(item) for item in items]
        if not all(fits(item) for item in ready):
            return super().apply(ready)
        try:
            with self._session() as cur:
                try:
                    return self._apply_group(ready)
                except BaseException:
                    self._rollback(cur)
                    raise
        except _SharedPath:
            return super().apply(ready)

    @staticmethod
    def _with_rows(item: BatchToStore | Rejection) -> BatchToStore | Rejection:
        if isinstance(item, Rejection) or item.rows is not None:
            return item
        try:
            rows = rows_to_store(item.store_id, item.gateway_id, item.batch)
        except BatchRejectedError as err:
            return Rejection(item.topic, str(err), item.size)
        except Exception as err:
            return Rejection(item.topic, f"cannot store: {err!r}"[:500], item.size)
        return BatchToStore(item.topic, item.size, item.store_id, item.gateway_id, item.batch, rows)

    def _apply_group(self, items: Sequence[BatchToStore | Rejection]) -> list[StoreResult | Rejection]:
        now = datetime.now(UTC)
        batches = [item for item in items if isinstance(item, BatchToStore)]
        conn = self._conn
        try:
            if self._incoming_on is not conn:
                conn.execute(_INCOMING)
                self._incoming_on = conn
            conn.execute("BEGIN")
            rows_by_batch = [self._unique(b) for b in batches]
            self._copy_events(batches, rows_by_batch)
            with conn.pipeline():
                results = self._store_group(batches, rows_by_batch, now) if batches else []
                for item in items:
                    if isinstance(item, Rejection):
                        self._record(conn.cursor(), item, now)
                conn.execute("COMMIT")
        except self.db_errors as err:
            if self._is_data_error(err):
                raise _SharedPath from err
            raise
        stored = iter(results)
        return [item if isinstance(item, Rejection) else next(stored) for item in items]

    def _store_group(
        self,
        batches: Sequence[BatchToStore],
        rows_by_batch: Sequence[tuple[dict[int, EventRow], int, int, list[tuple[EventRow, str | None]]]],
        now: datetime,
    ) -> list[StoreResult]:
        """The group's statements, results read only once the first three are all sent (one round trip)."""
        conn = self._conn
        keys = sorted({(b.store_id, b.gateway_id) for b in batches})
        lock = conn.cursor()
        lock.execute(_LOCK_GATEWAYS, ([k[0] for k in keys], [k[1] for k in keys]))
        insert = conn.cursor()
        insert.execute(_INSERT_EVENTS, (now,))
        windows = self._windows(batches)
        runs = conn.cursor()
        runs.execute(_TOUCHED_RUNS, windows)
        gateways = {
            (s, g): _Gateway(int(m), None if marks[0] is None else int(marks[0]), self._watermark(marks))
            for s, g, m, *marks in lock.fetchall()
        }
        inserted = {(s, g, int(seq)): str(event_id) for s, g, seq, event_id in insert.fetchall()}
        old_runs: dict[Key, list[tuple[int, int]]] = {}
        for s, g, a, b in runs.fetchall():
            old_runs.setdefault((s, g), []).append((int(a), int(b)))
        new_rows = self._new_rows(batches, rows_by_batch, inserted)
        held = self._held(batches, rows_by_batch, new_rows)
        results: list[StoreResult] = []
        clashes_by_key: dict[Key, list[tuple[EventRow, str | None]]] = {}
        for b, (item, (unique, duplicates, conflicts, clashes)) in enumerate(
            zip(batches, rows_by_batch, strict=True)
        ):
            key = (item.store_id, item.gateway_id)
            gw = gateways[key]
            stored: dict[int, str] = {}
            new = 0
            for row in unique.values():
                if (b, row.seq) in new_rows:
                    stored[row.seq] = row.id
                    new += 1
                elif (kept := held.get((*key, row.seq))) is not None:
                    stored[row.seq] = kept
            ours = 0
            for row in unique.values():
                if stored.get(row.seq) == row.id:
                    ours += 1
                else:
                    conflicts += 1
                    self._log_conflict(key, row, stored.get(row.seq))
                    clashes.append((row, stored.get(row.seq)))
            if clashes:
                clashes_by_key.setdefault(key, []).extend(clashes)
            duplicates += ours - new
            if stored:
                gw.seqs.extend(stored)
                top = max(stored)
                if top > gw.max_seq:
                    gw.max_seq = top
                    if stored[top] == unique[top].id:
                        gw.newest = unique[top].recorded_at
            through = item.batch.complete_through
            if through is not None and (gw.complete_through is None or through > gw.complete_through):
                gw.complete_through = through
            gw.watermark = gw.watermark.after_batch(gw.complete_through or 0, now, self._grace)
            gw.new += new
            gw.duplicates += duplicates
            gw.conflicts += conflicts
            results.append(StoreResult(new, duplicates, conflicts))
        cur = conn.cursor()
        for key, clashes in clashes_by_key.items():
            self._keep_conflicts(cur, key, clashes, now)
        self._write_runs(gateways, old_runs, windows)
        self._update_gateways(gateways, now)
        return results

    @staticmethod
    def _unique(
        item: BatchToStore,
    ) -> tuple[dict[int, EventRow], int, int, list[tuple[EventRow, str | None]]]:
        """A batch's rows by seq (schema 1 batches may repeat a seq), with the in-batch duplicates and
        conflicts that makes, as the shared path counts them."""
        assert item.rows is not None
        unique: dict[int, EventRow] = {}
        duplicates = conflicts = 0
        clashes: list[tuple[EventRow, str | None]] = []
        for row in item.rows:
            kept = unique.setdefault(row.seq, row)
            if kept is not row:
                if kept.id == row.id:
                    duplicates += 1
                else:
                    conflicts += 1
                    clashes.append((row, kept.id))
        return unique, duplicates, conflicts, clashes

    def _copy_events(
        self,
        batches: Sequence[BatchToStore],
        rows_by_batch: Sequence[tuple[dict[int, EventRow], int, int, Any]],
    ) -> None:
        n = 0
        with self._conn.cursor().copy(_COPY_EVENTS) as copy:
            copy.set_types(_INCOMING_TYPES)
            for item, (unique, *_) in zip(batches, rows_by_batch, strict=True):
                store_id, gateway_id = item.store_id, item.gateway_id
                for row in unique.values():
                    receipt = row.receipt if row.receipt is not None else receipt_fields(row.kind, row.event)
                    n += 1
                    copy.write_row(
                        (
                            n,
                            row.id,
                            store_id,
                            gateway_id,
                            row.seq,
                            row.kind,
                            row.device_id,
                            row.recorded_at,
                            row.boot_id,
                            row.mono_ns,
                            row.clock_synced,
                            row.body,
                            *receipt,
                        )
                    )

    @staticmethod
    def _windows(batches: Sequence[BatchToStore]) -> list[list[Any]]:
        """Per gateway, the seqs whose runs the group may touch: its lowest seq - 1 to its highest + 1."""
        spans: dict[Key, tuple[int, int]] = {}
        for item in batches:
            assert item.rows is not None
            key = (item.store_id, item.gateway_id)
            low = min(r.seq for r in item.rows)
            high = max(r.seq for r in item.rows)
            old = spans.get(key)
            spans[key] = (low, high) if old is None else (min(old[0], low), max(old[1], high))
        keys = sorted(spans)
        return [
            [k[0] for k in keys],
            [k[1] for k in keys],
            [max(spans[k][0] - 1, 0) for k in keys],
            [min(spans[k][1] + 1, MAX_SEQ) for k in keys],
        ]

    @staticmethod
    def _new_rows(
        batches: Sequence[BatchToStore],
        rows_by_batch: Sequence[tuple[dict[int, EventRow], int, int, Any]],
        inserted: dict[tuple[str, str, int], str],
    ) -> set[tuple[int, int]]:
        """(batch index, seq) of the rows this group inserted: the first row of the group whose own id went in at
        its own (store, gateway, seq). Every other row (a redelivery, a seq or an id held by another event) is
        checked against what holds its seq, as the shared path does."""
        new: set[tuple[int, int]] = set()
        claimed: set[tuple[str, str, int]] = set()
        for b, (item, (unique, *_)) in enumerate(zip(batches, rows_by_batch, strict=True)):
            for row in unique.values():
                where = (item.store_id, item.gateway_id, row.seq)
                if inserted.get(where) == row.id and where not in claimed:
                    claimed.add(where)
                    new.add((b, row.seq))
        return new

    def _held(
        self,
        batches: Sequence[BatchToStore],
        rows_by_batch: Sequence[tuple[dict[int, EventRow], int, int, Any]],
        new_rows: set[tuple[int, int]],
    ) -> dict[tuple[str, str, int], str]:
        """What holds the seqs of the events this group did not insert (a redelivery, a conflict): one query,
        and none at all in the usual case."""
        wanted: set[tuple[str, str, int]] = set()
        for b, (item, (unique, *_)) in enumerate(zip(batches, rows_by_batch, strict=True)):
            for row in unique.values():
                if (b, row.seq) not in new_rows:
                    wanted.add((item.store_id, item.gateway_id, row.seq))
        if not wanted:
            return {}
        keys = sorted(wanted)
        cur = self._conn.cursor()
        cur.execute(_HELD, ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]))
        return {(s, g, int(seq)): str(event_id) for s, g, seq, event_id in cur.fetchall()}

    def _write_runs(
        self,
        gateways: dict[Key, _Gateway],
        old_runs: dict[Key, list[tuple[int, int]]],
        windows: list[list[Any]],
    ) -> None:
        """Merge each gateway's stored seqs into its runs: the runs read in its window are replaced by the
        merged ones, for the gateways where that changes anything."""
        changed: list[int] = []
        new_runs: list[tuple[str, str, int, int]] = []
        for i, key in enumerate(zip(windows[0], windows[1], strict=True)):
            gw = gateways[key]
            if not gw.seqs:
                continue
            old = sorted(old_runs.get(key, []))
            merged = merge([*old, *seq_ranges(sorted(set(gw.seqs)))])
            if merged != old:
                changed.append(i)
                new_runs.extend((*key, a, b) for a, b in merged)
        if not changed:
            return
        cur = self._conn.cursor()
        cur.execute(_DELETE_RUNS, [[column[i] for i in changed] for column in windows])
        cur.execute(_INSERT_RUNS, [list(column) for column in zip(*new_runs, strict=True)])

    def _update_gateways(self, gateways: dict[Key, _Gateway], now: datetime) -> None:
        keys = sorted(gateways)
        values = [gateways[k] for k in keys]
        self._conn.cursor().execute(
            _UPDATE_GATEWAYS,
            (
                now,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [g.max_seq for g in values],
                [g.complete_through for g in values],
                [g.new for g in values],
                [g.duplicates for g in values],
                [g.conflicts for g in values],
                [g.newest for g in values],
                [g.watermark.mark_through for g in values],
                [g.watermark.mark_at for g in values],
                [g.watermark.lost_through for g in values],
            ),
        )
