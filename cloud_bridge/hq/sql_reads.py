"""Reading the HQ receiver's SQL store: the per-gateway summary, a gateway's gap classes and events, the
messages rejected and the conflicting events kept.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import orjson

from cloud_bridge.hq.model import ConflictRow, EventTime, GatewaySummary, RejectedRow, from_utc_ns
from cloud_bridge.hq.ranges import GapClasses, Range, size
from cloud_bridge.hq.sql_base import GATEWAY_ROW, SqlStoreBase

_GATEWAYS: Final = (
    f"SELECT {GATEWAY_ROW}, duplicates, conflicts, bad_reports, newest_recorded_at"  # noqa: S608 - constants
    " FROM gateways ORDER BY store_id, gateway_id"
)


class SqlReads(SqlStoreBase):
    """Reading what is stored (part of :class:`~cloud_bridge.hq.sql.SqlReceiverStore`)."""

    def count(self) -> int:
        with self._session() as cur:
            (n,) = self._x(cur, "SELECT count(*) FROM events").fetchone()
        return int(n)

    def classes(
        self, gateway_id: str, store_id: str | None = None, now: datetime | None = None
    ) -> GapClasses:
        """A gateway's missing seqs at ``now`` (default: now): explained, lost and pending ranges."""
        with self._transaction(self.dialect.begin_read) as cur:
            gw = self._gateway(cur, gateway_id, store_id)
            return GapClasses() if gw is None else self._classes(cur, gw, now or datetime.now(UTC))

    def gaps(self, gateway_id: str, store_id: str | None = None) -> list[Range]:
        """Missing seq ranges (first, last), inclusive, in 1..max(highest stored seq, complete_through)."""
        return self.classes(gateway_id, store_id).gaps

    def events(
        self, gateway_id: str, after_seq: int = 0, limit: int = 1000, store_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored envelopes of a gateway in seq order, parsed."""
        with self._session() as cur:
            store = self._store_of(cur, gateway_id, store_id)
            bodies = self._rows(
                cur,
                "SELECT body FROM events WHERE store_id = ? AND gateway_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (store, gateway_id, after_seq, limit),
            )
        return [orjson.loads(bytes(body)) for (body,) in bodies]

    def export_page(
        self,
        store_id: str,
        since: datetime | None,
        until: datetime | None,
        after: tuple[str, int] = ("", 0),
        limit: int = 5000,
    ) -> list[tuple[str, int, bytes]]:
        """(gateway, seq, body) of a store's events recorded in [since, until), in (gateway, seq) order, after
        ``after``: a page of ``hq-receiver export`` (keyset paging, so a long month never sits in memory)."""
        sql = (
            "SELECT gateway_id, seq, body FROM events"
            " WHERE store_id = ? AND (gateway_id > ? OR (gateway_id = ? AND seq > ?))"
        )
        params: list[Any] = [store_id, after[0], after[0], after[1]]
        if since is not None:
            sql += " AND recorded_at >= ?"
            params.append(self._time_param(since.astimezone(UTC)))
        if until is not None:
            sql += " AND recorded_at < ?"
            params.append(self._time_param(until.astimezone(UTC)))
        with self._session() as cur:
            rows = self._rows(cur, sql + " ORDER BY gateway_id, seq LIMIT ?", (*params, limit))
        return [(str(g), int(q), bytes(body)) for g, q, body in rows]

    def event_times(
        self, gateway_id: str, after_seq: int = 0, limit: int = 1000, store_id: str | None = None
    ) -> list[EventTime]:
        """recorded_at, clock_synced and corrected_at of a gateway's events in seq order."""
        with self._session() as cur:
            store = self._store_of(cur, gateway_id, store_id)
            rows = self._rows(
                cur,
                "SELECT seq, recorded_at, clock_synced, corrected_ns FROM events"
                " WHERE store_id = ? AND gateway_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (store, gateway_id, after_seq, limit),
            )
        return [
            EventTime(
                int(seq),
                self._time_value(recorded),
                None if synced is None else bool(synced),
                None if ns is None else from_utc_ns(int(ns)),
            )
            for seq, recorded, synced, ns in rows
        ]

    def conflicts(self, limit: int = 100) -> list[ConflictRow]:
        """Conflicting events kept (newest seqs first per gateway), at most ``limit``."""
        with self._session() as cur:
            rows = self._rows(
                cur,
                "SELECT store_id, gateway_id, seq, id, kept_id, kind, received_at FROM conflicts"
                " ORDER BY store_id, gateway_id, seq LIMIT ?",
                (limit,),
            )
        return [
            ConflictRow(
                str(a), str(b), int(c), str(d), None if e is None else str(e), str(f), self._time_value(g)
            )
            for a, b, c, d, e, f, g in rows
        ]

    def count_rejected(self) -> int:
        with self._session() as cur:
            (n,) = self._x(cur, "SELECT count(*) FROM rejected").fetchone()
        return int(n)

    def rejections(self, limit: int = 100) -> list[RejectedRow]:
        """The most recent rejected messages, newest first."""
        with self._session() as cur:
            rows = self._rows(
                cur,
                "SELECT received_at, topic, reason, size FROM rejected ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        return [RejectedRow(self._time_value(r[0]), r[1], r[2], int(r[3])) for r in rows]

    def summary(self, now: datetime | None = None) -> list[GatewaySummary]:
        """One line per (store, gateway): counts, gap classes and lag, from one snapshot."""
        now = now or datetime.now(UTC)
        out: list[GatewaySummary] = []
        with self._transaction(self.dialect.begin_read) as cur:
            for row in self._rows(cur, _GATEWAYS):
                gw = self._gateway_row(row)
                dups, conflicts, bad, newest = row[9:]
                classes = self._classes(cur, gw, now)
                gaps = classes.gaps
                recorded = None if newest is None else self._time_value(newest)
                out.append(
                    GatewaySummary(
                        store_id=gw.store_id,
                        gateway_id=gw.gateway_id,
                        events=gw.events,
                        max_seq=gw.max_seq,
                        gaps=len(gaps),
                        missing=size(gaps),
                        duplicates=int(dups),
                        conflicts=int(conflicts),
                        lag=None if recorded is None else now - recorded,
                        last_received_at=gw.watermark.received_at,
                        complete_through=gw.complete_through,
                        explained=size(classes.explained),
                        lost=size(classes.lost),
                        pending=size(classes.pending),
                        bad_reports=int(bad),
                    )
                )
        return out
