"""Resend bookkeeping in the HQ receiver's SQL store: which lost ranges to ask which gateway for in a round
(:meth:`SqlResendClaims.claim_resends`, shared fairly between receivers), and the gateways that take one range
per ``resend`` command.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cloud_bridge.commands import MAX_RESEND_RANGES as RESEND_MAX_RANGES
from cloud_bridge.commands import MAX_RESEND_SEQS as RESEND_MAX_SEQS
from cloud_bridge.hq import sql_limits
from cloud_bridge.hq.model import SINGLE_RANGE_COMMANDS, ResendRequest
from cloud_bridge.hq.ranges import Range, size
from cloud_bridge.hq.sql_base import GATEWAY_ROW, GatewayRow, SqlStoreBase

_CLAIM_RESEND: Final = (
    "UPDATE gateways SET resend_at_ms = ?, resend_commands = resend_commands + ?"
    " WHERE store_id = ? AND gateway_id = ? AND (resend_at_ms IS NULL OR resend_at_ms <= ?)"
)


class SqlResendClaims(SqlStoreBase):
    """Resend claims and single-range marks (part of :class:`~cloud_bridge.hq.sql.SqlReceiverStore`)."""

    def claim_resends(
        self,
        interval_s: float,
        max_ranges: int = RESEND_MAX_RANGES,
        *,
        max_seqs: int = RESEND_MAX_SEQS,
        online_s: float | None = None,
        max_gateways: int = sql_limits.MAX_RESEND_GATEWAYS,
        single_ranges: int = SINGLE_RANGE_COMMANDS,
        now: datetime | None = None,
    ) -> list[ResendRequest]:
        """Lost ranges to ask for: per gateway not asked within ``interval_s``, its lowest lost ranges, at most
        ``max_ranges`` of them and ``max_seqs`` seqs in all (one multi-range command), for at most
        ``max_gateways`` gateways per call (the rest come in the next round). A gateway marked single-range
        (:meth:`mark_single_range`) gets at most ``single_ranges`` ranges, flagged ``single_range``: one command
        each.

        Every gateway with lost seqs is asked, quiet ones included: a gateway that sends nothing new must heal
        too (a till closed for the night, a gateway whose only traffic was the lost burst). The budget follows
        the gaps (one command carries up to a thousand holes), and each gateway has at most one claim per
        interval, so with the command's expiry (the receiver sets it to the interval) at most about one waits
        in a quiet gateway's session. ``online_s`` restricts it to gateways heard from within that time.
        Each gateway is claimed by a single-row conditional update, so of several receivers sharing the
        database one asks and the others skip it until the interval has passed again. A gateway whose missing
        seqs were all explained or pending at the last round is skipped without reading its gaps until its row
        changes or its lost watermark can move (:meth:`_nothing_lost_until`).
        """
        now = now or datetime.now(UTC)
        now_ms = int(now.timestamp() * 1000)
        due = now_ms - int(interval_s * 1000)
        # A gateway not heard from for QUIET_AFTER_S may be away: its commands wait in its session at the broker
        # (mosquitto keeps even expired ones queued until it reconnects, counted against its queue limit), so
        # it is asked again only every QUIET_RESEND_S, not every interval.
        quiet_due = now_ms - int(max(interval_s, sql_limits.QUIET_RESEND_S) * 1000)
        heard_since = self._time_param(now - timedelta(seconds=max(interval_s, sql_limits.QUIET_AFTER_S)))
        sql = (
            f"SELECT {GATEWAY_ROW} FROM gateways"  # noqa: S608 - constants
            " WHERE complete_through > 0 AND (resend_at_ms IS NULL OR resend_at_ms <= ?"
            " OR (resend_at_ms <= ? AND last_received_at >= ?))"
            " AND (events < max_seq OR events < complete_through)"
        )
        params: list[Any] = [quiet_due, due, heard_since]
        if online_s is not None:
            sql += " AND last_received_at >= ?"
            params.append(self._time_param(now - timedelta(seconds=online_s)))
        sql += " ORDER BY coalesce(resend_at_ms, 0), store_id, gateway_id"
        out: list[ResendRequest] = []
        with self._session() as cur:
            candidates = self._rows(cur, sql, params)
            singles = {
                (str(a), str(b))
                for a, b in self._rows(
                    cur,
                    "SELECT store_id, gateway_id FROM single_range WHERE marked_at_ms > ?",
                    (now_ms - int(sql_limits.SINGLE_RANGE_RECHECK_S * 1000),),
                )
            }
            for row in candidates:
                if len(out) >= max_gateways:
                    break
                gw = self._gateway_row(row)
                skip = self._nothing_lost.get(gw.key)
                if skip is not None and skip[0] == gw and (skip[1] is None or now < skip[1]):
                    continue
                cur.execute(self.dialect.begin_read)
                try:  # the row again, in the snapshot its runs are read from
                    fresh = self._gateway(cur, gw.gateway_id, gw.store_id)
                    lost = [] if fresh is None else self._classes(cur, fresh, now).lost
                finally:
                    cur.execute("COMMIT")
                if fresh is not None and not lost:
                    self._nothing_lost[gw.key] = (fresh, self._nothing_lost_until(fresh, now))
                    continue
                self._nothing_lost.pop(gw.key, None)
                single = gw.key in singles
                per_gateway = min(max_ranges, single_ranges) if single else max_ranges
                if len(lost) > per_gateway or size(lost) > max_seqs:
                    # More holes than one command carries: start each ask where the previous one stopped, so
                    # low seqs the gateway no longer has (answered missing, never explained) cannot hide the
                    # recoverable holes above them forever.
                    (asked,) = self._rows(
                        cur,
                        "SELECT resend_commands FROM gateways WHERE store_id = ? AND gateway_id = ?",
                        gw.key,
                    )[0]
                    start = (int(asked or 0) * per_gateway) % len(lost)
                    lost = [*lost[start:], *lost[:start]]
                ranges = sorted(take_ranges(lost, per_gateway, max_seqs))
                if not ranges:
                    continue
                self._x(cur, _CLAIM_RESEND, (now_ms, 1, *gw.key, due))
                if cur.rowcount == 1:
                    out.append(ResendRequest(*gw.key, ranges, single_range=single))
        return out

    def _nothing_lost_until(self, gw: GatewayRow, now: datetime) -> datetime | None:
        """Until when a gateway with nothing lost at ``now`` stays so while its row does not change: the next
        time its lost watermark can move (a grace period after its last batch or its mark), None for never."""
        if self._grace <= timedelta(0):
            return None
        mark = gw.watermark
        times = [t + self._grace for t in (mark.received_at, mark.mark_at) if t is not None]
        return min((t for t in times if t > now), default=None)

    def mark_single_range(
        self, store_id: str, gateway_id: str, reason: str, now: datetime | None = None
    ) -> bool:
        """Remember that a gateway refused a multi-range ``resend`` (``reason``: its answer): it is asked one
        range per command from now on, for SINGLE_RANGE_RECHECK_S. Returns whether it was not marked yet."""
        now_ms = int((now or datetime.now(UTC)).timestamp() * 1000)
        with self._transaction(self.dialect.begin_write) as cur:
            before = self._rows(
                cur,
                "SELECT marked_at_ms FROM single_range WHERE store_id = ? AND gateway_id = ?",
                (store_id, gateway_id),
            )
            self._x(
                cur,
                "INSERT INTO single_range (store_id, gateway_id, marked_at_ms, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (store_id, gateway_id) DO UPDATE"
                " SET marked_at_ms = excluded.marked_at_ms, reason = excluded.reason",
                (store_id, gateway_id, now_ms, reason.replace("\x00", "")[:500]),
            )
        return not before or int(before[0][0]) <= now_ms - int(sql_limits.SINGLE_RANGE_RECHECK_S * 1000)

    def single_range_gateways(self) -> list[tuple[str, str]]:
        """The gateways marked single-range (whatever the age of the mark), by store and gateway."""
        with self._session() as cur:
            rows = self._rows(
                cur, "SELECT store_id, gateway_id FROM single_range ORDER BY store_id, gateway_id"
            )
        return [(str(a), str(b)) for a, b in rows]


def take_ranges(ranges: Sequence[Range], max_ranges: int, max_seqs: int) -> list[Range]:
    """The lowest ``ranges``, at most ``max_ranges`` of them and ``max_seqs`` seqs in all (the last one cut)."""
    out: list[Range] = []
    budget = max_seqs
    for a, b in ranges:
        if len(out) >= max_ranges or budget <= 0:
            break
        end = min(b, a + budget - 1)
        out.append((a, end))
        budget -= end - a + 1
    return out
