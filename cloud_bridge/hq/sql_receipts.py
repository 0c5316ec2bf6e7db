"""Proving that a receipt reached HQ, from the HQ receiver's SQL store: the receipt's events, the returns
naming it, and what HQ misses of each gateway holding them up to it (:meth:`SqlReceipts.receipt`). The receipt
columns it looks up are described in :mod:`cloud_bridge.hq.sql`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from cloud_bridge.hq import sql_limits
from cloud_bridge.hq.model import from_utc_ns
from cloud_bridge.hq.ranges import GapClasses, clip, size
from cloud_bridge.hq.sql_base import GATEWAY_ROW, Cursor, SqlStoreBase
from cloud_bridge.hq.sql_schema import IS_POS, POS_KINDS, receipt_fields

_RECEIPT_EVENT: Final = "id, store_id, gateway_id, seq, kind, device_id, received_at, corrected_ns, body"
"""The columns of a receipt lookup row (:meth:`SqlReceipts._receipt_event`)."""
_BY_RECEIPT: Final = (
    f"SELECT {_RECEIPT_EVENT} FROM events"  # noqa: S608 - constants
    " WHERE store_id = ? AND device_id = ? AND receipt_no = ? LIMIT ?"
)
_BY_ORIGINAL: Final = (
    f"SELECT {_RECEIPT_EVENT} FROM events"  # noqa: S608 - constants
    " WHERE store_id = ? AND original_receipt_no = ? LIMIT ?"
)
_UNFILLED: Final = (
    f"SELECT {_RECEIPT_EVENT} FROM events"  # noqa: S608 - constants
    f" WHERE store_id = ? AND receipt_no IS NULL AND {IS_POS}"
)

RECEIPT_MATCH: Final = "receipt_no"
"""How an event matched a receipt lookup: it is the receipt (its device and ``receipt_no``)..."""
RETURN_MATCH: Final = "original_receipt_no"
"""... or a ``pos.return`` of the store (any device) whose ``original_receipt_no`` names it."""


@dataclass(frozen=True, slots=True)
class ReceiptEvent:
    """One stored event a receipt lookup found; times as HQ holds them."""

    match: str
    """:data:`RECEIPT_MATCH` or :data:`RETURN_MATCH`."""
    store_id: str
    gateway_id: str
    seq: int
    kind: str
    id: str
    device_id: str | None
    receipt_no: str | None
    original_receipt_no: str | None
    register_id: str | None
    occurred_at: str | None
    """The till's clock, as the envelope says (with the till's UTC offset)."""
    recorded_at: str
    """The gateway's clock at commit, as the envelope says."""
    corrected_at: datetime | None
    """``recorded_at`` corrected by a ``clock.synced`` anchor (an event committed before the clock synced)."""
    received_at: datetime
    """When HQ stored it (the receiver's clock)."""


@dataclass(frozen=True, slots=True)
class GatewayCompleteness:
    """What HQ is missing of one gateway's seqs 1..``through_seq``."""

    store_id: str
    gateway_id: str
    holds_receipt: bool
    """Whether the receipt itself is among this gateway's events: ``through_seq`` is then its (highest) seq;
    otherwise the highest seq of a return naming it, or, when HQ has no such receipt, the gateway's upper
    bound (highest stored or promised seq)."""
    through_seq: int
    gaps: GapClasses
    """Missing seqs in 1..through_seq, by class."""

    @property
    def missing(self) -> int:
        return size(self.gaps.gaps)


@dataclass(frozen=True, slots=True)
class ReceiptProof:
    """What HQ holds for one receipt of one device of a store (:meth:`SqlReceiverStore.receipt`)."""

    store_id: str
    device_id: str
    receipt_no: str
    events: list[ReceiptEvent]
    """Its own events (``match`` = receipt_no) and returns naming it, by gateway and seq."""
    gateways: list[GatewayCompleteness]
    """Each gateway holding one of ``events``; when the receipt is not found, every gateway of the store."""

    @property
    def found(self) -> bool:
        return any(e.match == RECEIPT_MATCH for e in self.events)

    @property
    def lost_below(self) -> bool:
        """A seq up to the receipt's own, of a gateway holding it, is lost (not explained or pending)."""
        return any(g.gaps.lost for g in self.gateways if g.holds_receipt)


class SqlReceipts(SqlStoreBase):
    """Receipt lookups (part of :class:`~cloud_bridge.hq.sql.SqlReceiverStore`)."""

    def receipt(
        self, store_id: str, device_id: str, receipt_no: str, now: datetime | None = None
    ) -> ReceiptProof:
        """What HQ holds for a receipt: the device's sales and returns with this ``receipt_no``, the store's
        returns naming it as ``original_receipt_no``, and what HQ misses of the seqs of each gateway holding
        them up to the receipt (gap classes at ``now``), all from one snapshot.

        Index lookups (events_receipt, events_original_receipt), plus the bodies of the store's sales and
        returns an older receiver stored without the receipt columns (events_receipt_unfilled; usually
        none)."""
        now = now or datetime.now(UTC)
        with self._transaction(self.dialect.begin_read) as cur:
            rows: dict[str, Sequence[Any]] = {}
            for sql, params in (
                (_BY_RECEIPT, (store_id, device_id, receipt_no, sql_limits.MAX_RECEIPT_EVENTS)),
                (_BY_ORIGINAL, (store_id, receipt_no, sql_limits.MAX_RECEIPT_EVENTS)),
                (_UNFILLED, (store_id,)),
            ):
                for row in self._rows(cur, sql, params):
                    rows.setdefault(str(row[0]), row)
            found = [self._receipt_event(row, device_id, receipt_no) for row in rows.values()]
            events = sorted((e for e in found if e is not None), key=lambda e: (e.gateway_id, e.seq, e.id))
            gateways = self._receipt_gateways(cur, store_id, events, now)
        return ReceiptProof(store_id, device_id, receipt_no, events, gateways)

    def _receipt_event(self, row: Sequence[Any], device_id: str, receipt_no: str) -> ReceiptEvent | None:
        """The row as a :class:`ReceiptEvent` if its body matches the lookup (an unfilled row may not)."""
        event_id, store_id, gateway_id, seq, kind, device, received_at, corrected, body = row
        try:
            event = orjson.loads(bytes(body))
        except orjson.JSONDecodeError:
            return None
        if kind not in POS_KINDS or not isinstance(event, dict):
            return None
        own, original = receipt_fields(kind, event)
        if device == device_id and own == receipt_no:
            match = RECEIPT_MATCH
        elif original == receipt_no:
            match = RETURN_MATCH
        else:
            return None
        data = event["data"]
        register, occurred, recorded = (
            data.get("register_id"),
            event.get("occurred_at"),
            event.get("recorded_at"),
        )
        return ReceiptEvent(
            match=match,
            store_id=str(store_id),
            gateway_id=str(gateway_id),
            seq=int(seq),
            kind=str(kind),
            id=str(event_id),
            device_id=None if device is None else str(device),
            receipt_no=own,
            original_receipt_no=original,
            register_id=register if isinstance(register, str) else None,
            occurred_at=occurred if isinstance(occurred, str) else None,
            recorded_at=str(recorded),
            corrected_at=None if corrected is None else from_utc_ns(int(corrected)),
            received_at=self._time_value(received_at),
        )

    def _receipt_gateways(
        self, cur: Cursor, store_id: str, events: Sequence[ReceiptEvent], now: datetime
    ) -> list[GatewayCompleteness]:
        """The gap state up to the receipt of each gateway holding a found event; when the receipt itself is
        not found, of every gateway of the store up to its upper bound (the receipt may be in a gap)."""
        found = any(e.match == RECEIPT_MATCH for e in events)
        gateways = self._rows(
            cur,
            f"SELECT {GATEWAY_ROW} FROM gateways WHERE store_id = ? ORDER BY gateway_id",  # noqa: S608
            (store_id,),
        )
        holding = {e.gateway_id for e in events}
        out: list[GatewayCompleteness] = []
        for gw in map(self._gateway_row, gateways):
            if found and gw.gateway_id not in holding:
                continue
            seqs = [e.seq for e in events if e.gateway_id == gw.gateway_id]
            own = [e.seq for e in events if e.gateway_id == gw.gateway_id and e.match == RECEIPT_MATCH]
            through = max(own or seqs) if found else gw.upper
            classes = self._classes(cur, gw, now)
            gaps = GapClasses(
                *(clip(ranges, 1, through) for ranges in (classes.explained, classes.lost, classes.pending))
            )
            out.append(GatewayCompleteness(gw.store_id, gw.gateway_id, bool(own), through, gaps))
        return out
