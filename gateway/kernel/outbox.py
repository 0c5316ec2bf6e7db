"""Outbox bookkeeping: which class an event kind belongs to, per-class counters, and eviction order.

Pure code: the journal (gateway/kernel/journal/) runs it on its writer thread inside its transactions. The
contract is docs/OUTBOX.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

CLASSES: Final = ("critical", "transaction", "state", "telemetry")
"""Outbox classes, highest priority first. The index is the class number the journal stores and the wire
carries (the numbers below are these indexes, written out for the code that compares them)."""
CRITICAL: Final = 0
TRANSACTION: Final = 1
STATE: Final = 2
TELEMETRY: Final = 3

DEFAULT_KIND_CLASSES: Final[Mapping[str, int]] = {
    "alert.raised": CRITICAL,
    "alert.cleared": CRITICAL,
    "alert.acknowledged": CRITICAL,
    "alert.escalated": CRITICAL,
    "notification.sent": STATE,
    "notification.failed": CRITICAL,
    "action.done": STATE,
    "action.failed": CRITICAL,
    "outbox.evicted": CRITICAL,
    "pos.sale": TRANSACTION,
    "pos.return": TRANSACTION,
    "stock.level": TRANSACTION,
    "stock.adjusted": TRANSACTION,
    "stock.replenishment_draft": TRANSACTION,
    "clock.synced": TRANSACTION,
    "device.status": STATE,
    "gateway.status": STATE,
    "document.updated": STATE,
    "sensor.reading": TELEMETRY,
    "sensor.sample": TELEMETRY,
    "rfid.inventory": STATE,
    "staff.checkin": TRANSACTION,
    "barcode.scanned": STATE,
    "attendance.daily": TRANSACTION,
    "report.daily": TRANSACTION,
}

KIND_INDEXED: Final = "cls < 3"
"""The condition of the journal's ``events_kind`` index: telemetry (class 3, most events at a store) is not in
it, so a reading's commit writes no index page for it (SD wear). A query by kind names this condition word for
word to use the index; only kinds that can never be telemetry (:data:`READ_BACK_KINDS`) are looked up so."""

READ_BACK_KINDS: Final = frozenset(
    {
        "alert.raised",
        "alert.cleared",
        "alert.escalated",
        "alert.acknowledged",
        "document.updated",
        "gateway.status",
        "device.status",
        "pos.sale",
        "pos.return",
        "attendance.daily",
        "report.daily",
    }
)
"""Kinds the gateway looks up again by kind (the page, receipts, reports): ``outbox.kinds`` cannot make them
telemetry, the first class evicted and the one the kind index leaves out."""


def of_class(cls: int) -> str:
    """The SQL condition for the journal's events of class ``cls`` (a class number, written into the SQL): through
    the class index for the classes it holds (naming its condition, ``cls < 3``, word for word, as SQLite needs to
    use a partial index), by seq for telemetry, which it leaves out."""
    return f"cls = {int(cls)}" + ("" if cls == TELEMETRY else " AND " + KIND_INDEXED)


MAX_RANGES_PER_REPORT: Final = 2000
"""Seq runs per ``outbox.evicted`` event; a longer list is split over several events."""


def seq_ranges(seqs: Sequence[int]) -> list[list[int]]:
    """Ascending seqs as inclusive runs: [1,2,3,7] -> [[1,3],[7,7]]."""
    out: list[list[int]] = []
    for seq in seqs:
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def class_number(name: str) -> int:
    return CLASSES.index(name)


def class_name(number: int) -> str:
    return CLASSES[number]


class KindClasses:
    """Maps an event kind to its class number: the defaults, overridden by ``outbox.kinds``."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self._map = dict(DEFAULT_KIND_CLASSES)
        for kind, name in (overrides or {}).items():
            self._map[kind] = class_number(name)

    def __call__(self, kind: str) -> int:
        return self._map.get(kind, TELEMETRY)


@dataclass(frozen=True, slots=True)
class ClassState:
    """One class's counters, as persisted in ``outbox_state`` (one row per class)."""

    delivered_seq: int = 0
    """Every event of the class with seq <= this was acknowledged by HQ's broker, or evicted."""
    stored_events: int = 0
    stored_bytes: int = 0
    """Envelope bytes of the class on disk, delivered or not."""
    pending_events: int = 0
    """Events of the class on disk with seq > delivered_seq."""
    evicted_events: int = 0
    """Undelivered events evicted since the journal was created."""
    floor_seq: int = 0
    """No event of the class has a lower seq (a lower bound, raised when the class's oldest events go): where a
    search for its oldest events starts. Telemetry needs it, having no index of its own."""

    def stored(self, events: int, nbytes: int) -> ClassState:
        return replace(
            self,
            stored_events=self.stored_events + events,
            stored_bytes=self.stored_bytes + nbytes,
            pending_events=self.pending_events + events,
        )

    def acknowledged(self, through: int, events_on_disk: int) -> ClassState:
        if through <= self.delivered_seq:
            return self
        return replace(
            self, delivered_seq=through, pending_events=max(0, self.pending_events - events_on_disk)
        )

    def removed(
        self, events: int, nbytes: int, undelivered: int, through: int | None, floor: int | None = None
    ) -> ClassState:
        """Rows deleted: ``undelivered`` of them had not reached HQ (counted as evicted); the delivered watermark
        moves past them (``through``) so that nobody waits for them. ``floor``: they were the class's oldest, and
        none of its events is below this now."""
        return replace(
            self,
            floor_seq=self.floor_seq if floor is None else max(self.floor_seq, floor),
            stored_events=max(0, self.stored_events - events),
            stored_bytes=max(0, self.stored_bytes - nbytes),
            pending_events=max(0, self.pending_events - undelivered),
            evicted_events=self.evicted_events + undelivered,
            delivered_seq=self.delivered_seq if through is None else max(self.delivered_seq, through),
        )


@dataclass(frozen=True, slots=True)
class Victim:
    """What to evict next: the oldest events of ``cls``, delivered ones only or undelivered ones."""

    cls: int
    delivered: bool


def eviction_order(states: Mapping[int, ClassState], undelivered: bool = True) -> Iterable[Victim]:
    """For the overall disk budget: delivered events first (lowest class first: no loss), then (if
    ``undelivered``) undelivered telemetry and state, and only when nothing else is left, transactions, then
    critical."""
    for cls in (TELEMETRY, STATE, TRANSACTION, CRITICAL):
        state = states.get(cls)
        if state is not None and state.stored_events > state.pending_events:
            yield Victim(cls, delivered=True)
    if not undelivered:
        return
    for cls in (TELEMETRY, STATE, TRANSACTION, CRITICAL):
        state = states.get(cls)
        if state is not None and state.pending_events > 0:
            yield Victim(cls, delivered=False)


def eviction_reports(
    cls: int, reason: str, evicted: Sequence[tuple[int, int]], refused: int = 0, refused_bytes: int = 0
) -> list[dict[str, object]]:
    """``outbox.evicted`` payloads for evicted ``(seq, bytes)`` rows (ascending seq), at most
    MAX_RANGES_PER_REPORT runs each; each part carries the exact bytes of its own seqs. With no rows: one
    report of ``refused`` events (``disk_low``)."""
    runs = seq_ranges([seq for seq, _ in evicted])
    if not runs:
        return [
            {
                "class": class_name(cls),
                "reason": reason,
                "count": refused,
                "bytes": refused_bytes,
                "ranges": [],
            }
        ]
    reports: list[dict[str, object]] = []
    done = 0
    for start in range(0, len(runs), MAX_RANGES_PER_REPORT):
        part = runs[start : start + MAX_RANGES_PER_REPORT]
        count = sum(b - a + 1 for a, b in part)
        nbytes = sum(size for _, size in evicted[done : done + count])
        done += count
        reports.append(
            {"class": class_name(cls), "reason": reason, "count": count, "bytes": nbytes, "ranges": part}
        )
    return reports
