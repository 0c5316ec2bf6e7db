"""Storing batches in the HQ receiver's SQL store: each event once, the gateway's runs and counters, conflicts
kept beside the stored events, and what report events say (explained gaps, clock anchors). How receivers
sharing a database stay out of each other's way is in :mod:`cloud_bridge.hq.sql`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from cloud_bridge.hq import sql_limits
from cloud_bridge.hq.model import (
    REPORT_KINDS,
    Anchor,
    BatchRejectedError,
    BatchToStore,
    EventRow,
    Explanation,
    Rejection,
    ReportError,
    StoreResult,
    corrected_ns,
    event_rows,
    nearest_anchor,
    one_line,
    parse_report,
)
from cloud_bridge.hq.ranges import merge
from cloud_bridge.hq.sql_base import Cursor, SqlStoreBase
from cloud_bridge.hq.sql_schema import receipt_fields
from cloud_bridge.wire import MAX_SEQ, Batch
from gateway.kernel.outbox import seq_ranges

_LOGGER = logging.getLogger("cloud_bridge.hq.sql")  # the SQL store's one log name (see sql_base.py)

_INSERT_CONFLICT: Final = (
    "INSERT INTO conflicts (store_id, gateway_id, seq, id, kept_id, kind, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)

_LOCK_GATEWAY: Final = (
    "INSERT INTO gateways (store_id, gateway_id) VALUES (?, ?)"
    " ON CONFLICT (store_id, gateway_id) DO UPDATE SET store_id = excluded.store_id"
    " RETURNING max_seq, complete_through, last_received_at, mark_through, mark_at, lost_through"
)
"""Creates the gateway's row or locks it (a no-op update takes the row lock) and reads its watermarks."""
_INSERT_EVENT: Final = (
    "INSERT INTO events (id, store_id, gateway_id, seq, kind, device_id, recorded_at, received_at,"
    " boot_id, mono_ns, clock_synced, body, receipt_no, original_receipt_no)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_UPDATE_GATEWAY: Final = (
    "UPDATE gateways SET max_seq = ?, complete_through = ?, events = events + ?, duplicates = duplicates + ?,"
    " conflicts = conflicts + ?, bad_reports = bad_reports + ?,"
    " newest_recorded_at = coalesce(?, newest_recorded_at), last_received_at = ?,"
    " mark_through = ?, mark_at = ?, lost_through = ?"
    " WHERE store_id = ? AND gateway_id = ?"
)
_APPLY_ANCHOR: Final = """
UPDATE events SET corrected_ns = ? - (? - mono_ns), anchor_mono_ns = ?
WHERE store_id = ? AND gateway_id = ? AND boot_id = ? AND NOT clock_synced AND mono_ns IS NOT NULL
  AND (anchor_mono_ns IS NULL OR abs(anchor_mono_ns - mono_ns) > abs(? - mono_ns)
       OR (abs(anchor_mono_ns - mono_ns) = abs(? - mono_ns) AND anchor_mono_ns > ?))
"""
"""Applies an anchor to every unsynced event of its boot it is nearer to than their current one (the rule of
``nearest_anchor``), so anchors and events may arrive in any order."""
_TOUCHED_RUNS: Final = (
    "SELECT first_seq, last_seq FROM runs"
    " WHERE store_id = ? AND gateway_id = ? AND last_seq >= ? AND first_seq <= ?"
)
_DELETE_TOUCHED_RUNS: Final = (
    "DELETE FROM runs WHERE store_id = ? AND gateway_id = ? AND last_seq >= ? AND first_seq <= ?"
)


def rows_to_store(store_id: str, gateway_id: str, batch: Batch) -> list[EventRow]:
    """:func:`event_rows` made ahead of the transaction, holding only what is stored: the receipt columns are
    read now, and the parsed envelope is let go for every event but a report (the body bytes stay)."""
    rows = event_rows(store_id, gateway_id, batch)
    for row in rows:
        row.receipt = receipt_fields(row.kind, row.event)
        if row.kind not in REPORT_KINDS:
            row.event = {}
    return rows


class SqlWrites(SqlStoreBase):
    """Storing batches and rejections (part of :class:`~cloud_bridge.hq.sql.SqlReceiverStore`)."""

    def store_batch(self, topic_store_id: str, topic_gateway_id: str, batch: Batch) -> StoreResult:
        """Store one batch in one transaction; a bad batch raises :class:`BatchRejectedError`."""
        with self._transaction(self.dialect.begin_write) as cur:
            item = BatchToStore("", 0, topic_store_id, topic_gateway_id, batch)
            now = datetime.now(UTC)
            return self._store(cur, item, now, self._time_param(now))

    def record_rejected(self, topic: str, reason: str, size: int) -> None:
        self.apply([Rejection(topic, reason, size)])

    def apply(self, items: Iterable[BatchToStore | Rejection]) -> list[StoreResult | Rejection]:
        """Store several messages in one transaction: batches are stored or rejected, rejections recorded.

        ``items`` is consumed inside the transaction, so a generator can decode one batch at a time. Give
        them sorted by (store, gateway) when several receivers share the database (see the module docstring).
        """
        now = datetime.now(UTC)
        received_at = self._time_param(now)
        results: list[StoreResult | Rejection] = []
        with self._transaction(self.dialect.begin_write) as cur:
            for item in items:
                result = (
                    self._apply_one(cur, item, now, received_at) if isinstance(item, BatchToStore) else item
                )
                if isinstance(result, Rejection):
                    self._record(cur, result, received_at)
                results.append(result)
        return results

    def _apply_one(
        self, cur: Cursor, item: BatchToStore, now: datetime, received_at: Any
    ) -> StoreResult | Rejection:
        """One batch inside a savepoint: a batch that cannot be stored leaves no trace but its rejection."""
        cur.execute("SAVEPOINT batch")
        try:
            result = self._store(cur, item, now, received_at)
        except BatchRejectedError as err:
            reason = str(err)
        except self.db_errors as err:
            if not self._is_data_error(err):
                raise
            reason = f"cannot store: {one_line(err)}"[:500]
        except Exception as err:
            reason = f"cannot store: {err!r}"[:500]
        else:
            cur.execute("RELEASE SAVEPOINT batch")
            return result
        cur.execute("ROLLBACK TO SAVEPOINT batch")
        cur.execute("RELEASE SAVEPOINT batch")
        return Rejection(item.topic, reason, item.size)

    def _record(self, cur: Cursor, rejection: Rejection, received_at: Any) -> None:
        topic, reason = (text.replace("\x00", "\\x00") for text in (rejection.topic, rejection.reason))
        self._x(
            cur,
            "INSERT INTO rejected (received_at, topic, reason, size) VALUES (?, ?, ?, ?)",
            (received_at, topic, reason, rejection.size),
        )
        _LOGGER.info("rejected a message on %s (%d bytes): %s", topic, rejection.size, reason)

    def _store(self, cur: Cursor, item: BatchToStore, now: datetime, received_at: Any) -> StoreResult:
        """One batch; ``received_at`` is ``now`` as the database takes it."""
        key = (item.store_id, item.gateway_id)
        rows = item.rows if item.rows is not None else event_rows(item.store_id, item.gateway_id, item.batch)
        max_seq, *marks = self._x(cur, _LOCK_GATEWAY, key).fetchone()
        watermark = self._watermark(marks)
        complete_through = watermark.complete_through if marks[0] is not None else None
        unique: dict[int, EventRow] = {}
        duplicates = conflicts = 0
        clashes: list[tuple[EventRow, str | None]] = []
        for row in rows:  # schema 1 batches may repeat a seq
            kept = unique.setdefault(row.seq, row)
            if kept is not row:
                duplicates += kept.id == row.id
                if kept.id != row.id:
                    conflicts += 1
                    clashes.append((row, kept.id))
        reports = [r for r in unique.values() if r.kind in REPORT_KINDS]
        known = self._known_ids(cur, [r.id for r in reports])
        cur.executemany(
            self._sql(_INSERT_EVENT), [self._event_params(key, r, received_at) for r in unique.values()]
        )
        new = cur.rowcount
        if new == len(unique):  # the usual case: everything was new, so everything is ours
            stored = {seq: row.id for seq, row in unique.items()}
        else:
            stored = self._stored_ids(cur, key, sorted(unique))
        ours = [r for r in unique.values() if stored.get(r.seq) == r.id]
        for row in unique.values():
            if stored.get(row.seq) != row.id:
                conflicts += 1
                self._log_conflict(key, row, stored.get(row.seq))
                clashes.append((row, stored.get(row.seq)))
        if clashes:
            self._keep_conflicts(cur, key, clashes, received_at)
        duplicates += len(ours) - new
        ours_ids = {r.id for r in ours}
        bad = sum(self._apply_report(cur, key, r) for r in reports if r.id not in known and r.id in ours_ids)
        self._correct_clock(cur, key, [r for r in ours if r.clock_synced is False and r.mono_ns is not None])
        newest: str | None = None
        if stored:
            self._merge_runs(cur, key, sorted(stored))
            top = max(stored)
            if top > max_seq:
                max_seq = top
                newest = unique[top].recorded_at if stored[top] == unique[top].id else None
        through = item.batch.complete_through
        if through is not None and (complete_through is None or through > complete_through):
            complete_through = through
        after = watermark.after_batch(complete_through or 0, now, self._grace)
        mark_at = received_at if after.mark_at is now else marks[3]  # as stored, or now
        self._x(
            cur,
            _UPDATE_GATEWAY,
            (
                max_seq,
                complete_through,
                new,
                duplicates,
                conflicts,
                bad,
                newest,
                received_at,
                after.mark_through,
                mark_at,
                after.lost_through,
                *key,
            ),
        )
        return StoreResult(new, duplicates, conflicts)

    def _event_params(self, key: tuple[str, str], row: EventRow, received_at: Any) -> tuple[Any, ...]:
        return (
            row.id,
            *key,
            row.seq,
            row.kind,
            row.device_id,
            row.recorded_at,
            received_at,
            row.boot_id,
            row.mono_ns,
            row.clock_synced,
            row.body,
            *(row.receipt if row.receipt is not None else receipt_fields(row.kind, row.event)),
        )

    def _known_ids(self, cur: Cursor, ids: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(ids), sql_limits.IN_CHUNK):
            test, params = self._in_list("id", ids[i : i + sql_limits.IN_CHUNK])
            known.update(r[0] for r in self._rows(cur, f"SELECT id FROM events WHERE {test}", params))  # noqa: S608 - placeholders only
        return known

    def _stored_ids(self, cur: Cursor, key: tuple[str, str], seqs: Sequence[int]) -> dict[int, str]:
        """seq -> id of what is stored now at these seqs of the gateway."""
        stored: dict[int, str] = {}
        for i in range(0, len(seqs), sql_limits.IN_CHUNK):
            test, params = self._in_list("seq", seqs[i : i + sql_limits.IN_CHUNK])
            sql = f"SELECT seq, id FROM events WHERE store_id = ? AND gateway_id = ? AND {test}"  # noqa: S608
            stored.update((int(s), str(e)) for s, e in self._rows(cur, sql, [*key, *params]))
        return stored

    def _keep_conflicts(
        self,
        cur: Cursor,
        key: tuple[str, str],
        clashes: Sequence[tuple[EventRow, str | None]],
        received_at: Any,
    ) -> None:
        """Store conflicting events beside the kept ones (table ``conflicts``), up to MAX_CONFLICTS_KEPT events
        and MAX_CONFLICT_BYTES_KEPT bytes of bodies per gateway; the same conflicting event received again is
        stored once."""
        held, held_bytes = self._x(
            cur,
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM conflicts WHERE store_id = ? AND gateway_id = ?",
            key,
        ).fetchone()
        rows: list[tuple[Any, ...]] = []
        room, budget = (
            sql_limits.MAX_CONFLICTS_KEPT - int(held),
            sql_limits.MAX_CONFLICT_BYTES_KEPT - int(held_bytes),
        )
        for r, kept in clashes:
            if len(rows) >= room or len(r.body) > budget:
                break
            rows.append((*key, r.seq, r.id, kept, r.kind, received_at, r.body))
            budget -= len(r.body)
        if len(rows) < len(clashes):
            _LOGGER.warning(
                "conflict: store %s gateway %s has %d conflicting events (%d bytes) kept already; counting, not"
                " keeping, %d more",
                *key,
                int(held),
                int(held_bytes),
                len(clashes) - len(rows),
            )
        cur.executemany(self._sql(_INSERT_CONFLICT), rows)

    @staticmethod
    def _log_conflict(key: tuple[str, str], row: EventRow, kept: str | None) -> None:
        if kept is None:
            _LOGGER.warning(
                "conflict: store %s gateway %s seq %d: event id %s is already stored elsewhere; kept it in"
                " conflicts",
                *key,
                row.seq,
                row.id,
            )
        else:
            _LOGGER.warning(
                "conflict: store %s gateway %s seq %d already holds event %s; kept event %s in conflicts",
                *key,
                row.seq,
                kept,
                row.id,
            )

    def _apply_report(self, cur: Cursor, key: tuple[str, str], row: EventRow) -> int:
        """Store what a new report event says; returns 1 if its data is unusable (counted), else 0."""
        try:
            report = parse_report(row)
        except ReportError as err:
            _LOGGER.warning("store %s gateway %s seq %d (%s): %s", *key, row.seq, row.kind, err)
            return 1
        if isinstance(report, Explanation):
            cur.executemany(
                self._sql(
                    "INSERT INTO explained (event_id, first_seq, last_seq, store_id, gateway_id, source)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                ),
                [(row.id, a, b, *key, report.source) for a, b in report.ranges],
            )
        elif isinstance(report, Anchor):
            self._x(
                cur,
                "INSERT INTO anchors (event_id, store_id, gateway_id, boot_id, mono_ns, utc_ns)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (row.id, *key, report.boot_id, report.mono_ns, report.utc_ns),
            )
            mono = report.mono_ns
            self._x(cur, _APPLY_ANCHOR, (report.utc_ns, mono, mono, *key, report.boot_id, mono, mono, mono))
        return 0

    def _correct_clock(self, cur: Cursor, key: tuple[str, str], rows: Sequence[EventRow]) -> None:
        """Corrected times for unsynced events whose boot already has anchors (anchor first, events later)."""
        by_boot: dict[str, list[EventRow]] = defaultdict(list)
        for row in rows:
            if row.boot_id is not None:
                by_boot[row.boot_id].append(row)
        for boot_id, boot_rows in by_boot.items():
            anchors = [
                (int(m), int(u))
                for m, u in self._rows(
                    cur,
                    "SELECT mono_ns, utc_ns FROM anchors WHERE store_id = ? AND gateway_id = ? AND boot_id = ?"
                    " ORDER BY mono_ns",
                    (*key, boot_id),
                )
            ]
            if not anchors:
                continue
            updates = []
            for row in boot_rows:
                assert row.mono_ns is not None
                anchor = nearest_anchor(anchors, row.mono_ns)
                updates.append((corrected_ns(anchor, row.mono_ns), anchor[0], row.id))
            cur.executemany(
                self._sql("UPDATE events SET corrected_ns = ?, anchor_mono_ns = ? WHERE id = ?"), updates
            )

    def _merge_runs(self, cur: Cursor, key: tuple[str, str], seqs: Sequence[int]) -> None:
        """Add stored seqs to the gateway's runs: read the runs they touch, write back the merged ones."""
        added = [(a, b) for a, b in seq_ranges(seqs)]
        low, high = max(added[0][0] - 1, 0), min(added[-1][1] + 1, MAX_SEQ)
        old = [(int(a), int(b)) for a, b in self._rows(cur, _TOUCHED_RUNS, (*key, low, high))]
        merged = merge([*old, *added])
        if merged == sorted(old):
            return
        self._x(cur, _DELETE_TOUCHED_RUNS, (*key, low, high))
        cur.executemany(
            self._sql("INSERT INTO runs (store_id, gateway_id, first_seq, last_seq) VALUES (?, ?, ?, ?)"),
            [(*key, a, b) for a, b in merged],
        )
