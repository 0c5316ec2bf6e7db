"""What the HQ receiver stores, whatever the database: records, event checks and the reports events carry.

Pure code, no I/O. ``event_rows`` checks a decoded batch against its topic and turns each event into the
columns every backend stores; ``parse_report`` reads the events that change how HQ sees a gateway's seqs
(``outbox.evicted``, ``journal.corrupt`` and ``journal.missing`` explain gaps, ``clock.synced`` anchors the
clock). A backend implements :class:`ReceiverBackend`; the receiver talks to nothing else.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import orjson

from cloud_bridge.hq.ranges import GapClasses, Range, merge
from cloud_bridge.wire import MAX_SEQ, Batch, BatchError
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.model import ID_PATTERN

MAX_MONO_NS: Final = 10**18
"""A monotonic reading above this (31 years of uptime) is not believed; it also keeps the clock arithmetic
inside 64 bits."""
MIN_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)
MAX_UTC: Final = datetime(2200, 1, 1, tzinfo=UTC)
"""Times outside MIN_UTC..MAX_UTC are not believed: a year-10000 ``recorded_at`` stored in PostgreSQL would
break every later read of it ("timestamp too large")."""
MAX_TEXT_ID: Final = 64
"""Longest event id, kind, device id and boot id stored. Gateways send UUIDs, ID_PATTERN ids and 16-hex boot
ids; a longer one is not ours, and in PostgreSQL an indexed text of kilobytes fails the insert."""
_STORE_OR_GATEWAY_ID: Final = re.compile(ID_PATTERN)
MAX_EVICTED_RANGES: Final = 2000
"""Per ``outbox.evicted`` event (docs/OUTBOX.md); more is not a gateway of ours."""
REPORT_KINDS: Final = frozenset({"outbox.evicted", "alert.raised", "clock.synced"})
LOST_GRACE_S: Final = 60.0
"""How long a seq missing at or below ``complete_through`` is still called pending: with several receivers the
batch holding it may still wait in another receiver's queue (see :class:`LostWatermark`)."""

JOURNAL_LOSS_RULES: Final = frozenset({"journal.corrupt", "journal.missing"})
"""Alerts whose ``details.possibly_lost`` range the gateway may never deliver: its journal was damaged or lost."""


class BatchRejectedError(BatchError):
    """A well-formed batch the receiver will not store: it disagrees with its topic, or an event is bad."""


class StoreUnavailableError(StoreGatewayError):
    """The database cannot take the work now (locked, down, connection lost): ack nothing, retry later."""


def one_line(err: BaseException) -> str:
    """An error as one log or terminal line (libpq's messages span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class ReportError(StoreGatewayError, ValueError):
    """A report event (eviction, corrupt journal, clock anchor) whose data cannot be used; stored anyway."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    new: int
    duplicates: int
    conflicts: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message that was not stored, and why; recorded in the ``rejected`` table."""

    topic: str
    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class BatchToStore:
    """A decoded batch and the store/gateway its topic names; ``rows``, when given, are its
    :func:`event_rows`, made ahead (the receiver makes them while the database stores the group before)."""

    topic: str
    size: int
    store_id: str
    gateway_id: str
    batch: Batch
    rows: list[EventRow] | None = None


@dataclass(frozen=True, slots=True)
class GatewaySummary:
    store_id: str
    gateway_id: str
    events: int
    max_seq: int
    gaps: int
    """Missing ranges, whatever their class."""
    missing: int
    """Missing seqs: explained + lost + pending."""
    duplicates: int
    conflicts: int
    lag: timedelta | None
    """Now minus ``recorded_at`` of the newest (highest seq) event."""
    last_received_at: datetime | None
    complete_through: int | None = None
    explained: int = 0
    lost: int = 0
    pending: int = 0
    bad_reports: int = 0
    """Eviction, corrupt-journal or clock reports whose data could not be used."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    received_at: datetime
    topic: str
    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class ConflictRow:
    """An event that came under a seq held by another event id (``kept_id``), or whose id is stored at another
    seq (``kept_id`` None): stored in ``conflicts``, beside the event that holds the seq."""

    store_id: str
    gateway_id: str
    seq: int
    id: str
    kept_id: str | None
    kind: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class EventTime:
    """When an event happened as far as HQ can tell: ``corrected_at`` is set for unsynced events of a boot
    that has a ``clock.synced`` anchor."""

    seq: int
    recorded_at: datetime
    clock_synced: bool | None
    corrected_at: datetime | None


SINGLE_RANGE_COMMANDS: Final = 10
"""Single-range ``resend`` commands per gateway per round, for a gateway asked one range at a time (one of before
multi-range resends)."""


@dataclass(frozen=True, slots=True)
class ResendRequest:
    """Lost ranges to ask one gateway for in one round: at most MAX_RESEND_RANGES ranges and MAX_RESEND_SEQS
    seqs in all, so they fit one multi-range ``resend`` command; ``single_range``: the gateway takes one range
    per command (at most SINGLE_RANGE_COMMANDS ranges then)."""

    store_id: str
    gateway_id: str
    ranges: list[Range]
    single_range: bool = False


@dataclass(slots=True)
class EventRow:
    """One event as every backend stores it (not frozen: thousands are made per second)."""

    id: str
    seq: int
    kind: str
    device_id: str | None
    recorded_at: str
    boot_id: str | None
    mono_ns: int | None
    clock_synced: bool | None
    body: bytes
    event: dict[str, Any]
    """The envelope as parsed; emptied once ``receipt`` is filled for an event that is not a report
    (:data:`REPORT_KINDS`), so a batch waiting to be stored holds its bytes, not its parsed form."""
    receipt: tuple[str | None, str | None] | None = None
    """(receipt_no, original_receipt_no) when already read from ``event``."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Seqs a gateway says it will never send; ``source`` says why (``outbox.evicted:<reason>``, ...)."""

    source: str
    ranges: list[Range]


@dataclass(frozen=True, slots=True)
class Anchor:
    """A ``clock.synced`` anchor: this boot's monotonic clock read ``mono_ns`` at true time ``utc_ns``."""

    boot_id: str
    mono_ns: int
    utc_ns: int


@dataclass(frozen=True, slots=True)
class LostWatermark:
    """Up to which seq a gateway's missing seqs are *lost*: a ``complete_through`` HQ has known for at least a
    grace period, so a batch that another receiver still holds has had time to be stored.

    Three stored values give it without a history of watermarks: ``complete_through`` with the time of the
    gateway's last batch (a newer value cannot be older than that), a *mark* (the value and time taken at most
    once per grace period) and ``lost_through`` (the answer at the last batch, so it never goes back).
    While batches keep coming, a seq is called lost within two grace periods; once they stop, within one.
    Pure: the database stores the fields, this computes them.
    """

    complete_through: int = 0
    received_at: datetime | None = None
    """When the gateway's last batch was stored (``last_received_at``)."""
    mark_through: int = 0
    mark_at: datetime | None = None
    lost_through: int = 0

    def at(self, now: datetime, grace: timedelta) -> int:
        """The highest seq that can be called lost at ``now``."""
        if grace <= timedelta(0):
            return self.complete_through
        if self.received_at is not None and now - self.received_at >= grace:
            return self.complete_through
        if self.mark_at is not None and now - self.mark_at >= grace:
            return max(self.mark_through, self.lost_through)
        return self.lost_through

    def after_batch(self, complete_through: int, now: datetime, grace: timedelta) -> LostWatermark:
        """The fields once a batch is stored at ``now`` (``complete_through`` is the gateway's, after it)."""
        lost = self.at(now, grace)
        if self.mark_at is None or now - self.mark_at >= grace:
            return LostWatermark(complete_through, now, complete_through, now, lost)
        return LostWatermark(complete_through, now, self.mark_through, self.mark_at, lost)


def utc_ns(value: datetime) -> int:
    """Nanoseconds since the epoch, exactly (no float)."""
    delta = value - MIN_UTC
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def from_utc_ns(ns: int) -> datetime:
    return MIN_UTC + timedelta(microseconds=ns // 1000)


def parse_time(text: object) -> datetime | None:
    """An ISO 8601 time with a UTC offset, or None."""
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def _has_nul(*texts: str | None) -> bool:
    return any(t is not None and "\x00" in t for t in texts)


def clock_fields(event: dict[str, Any]) -> tuple[str | None, int | None, bool | None]:
    """(boot_id, mono_ns, clock_synced) of an envelope, each None when missing or not believable."""
    boot_id, mono, synced = event.get("boot_id"), event.get("mono_ns"), event.get("clock_synced")
    return (
        boot_id if isinstance(boot_id, str) and boot_id else None,
        mono if type(mono) is int and 0 <= mono <= MAX_MONO_NS else None,
        synced if isinstance(synced, bool) else None,
    )


def event_rows(store_id: str, gateway_id: str, batch: Batch) -> list[EventRow]:
    """The rows to store for a batch; raises :class:`BatchRejectedError` before anything is written.

    Everything a database would refuse for its size or value is refused here, with a reason: a database
    error is taken for the database being unwell, and the batch would be retried forever."""
    for what, value in (("store", store_id), ("gateway", gateway_id)):
        if not _STORE_OR_GATEWAY_ID.fullmatch(value):
            raise BatchRejectedError(f"the topic's {what} id {value[:80]!r} is not a valid id (ID_PATTERN)")
    if batch.store_id != store_id or batch.gateway_id != gateway_id:
        raise BatchRejectedError(
            f"batch says store {batch.store_id[:80]!r} gateway {batch.gateway_id[:80]!r}"
            f" but the topic says store {store_id!r} gateway {gateway_id!r}"
        )
    rows: list[EventRow] = []
    bodies = batch.bodies
    for i, event in enumerate(batch.events):
        seq, event_id = event["seq"], event["id"]
        if event.get("store_id") != store_id or event.get("gateway_id") != gateway_id:
            raise BatchRejectedError(
                f"event seq {seq} says store {_short(event.get('store_id'))}"
                f" gateway {_short(event.get('gateway_id'))}"
                f" but the topic says store {store_id!r} gateway {gateway_id!r}"
            )
        if not 1 <= seq <= MAX_SEQ:
            raise BatchRejectedError(f"event seq {seq} out of range 1..{MAX_SEQ}")
        kind, device_id, recorded_at = event.get("kind"), event.get("device_id"), event.get("recorded_at")
        if not isinstance(kind, str) or not (device_id is None or isinstance(device_id, str)):
            raise BatchRejectedError(
                f"event seq {seq} needs a string 'kind' and a string or null 'device_id'"
            )
        recorded = parse_time(recorded_at)
        if recorded is None:
            raise BatchRejectedError(
                f"event seq {seq} needs 'recorded_at' as an ISO 8601 time with a UTC offset"
            )
        if not MIN_UTC <= recorded < MAX_UTC:
            raise BatchRejectedError(f"event seq {seq} has 'recorded_at' {recorded_at!r} outside 1970..2199")
        boot_id, mono_ns, clock_synced = clock_fields(event)
        for name, text in (("id", event_id), ("kind", kind), ("device_id", device_id), ("boot_id", boot_id)):
            if text is not None and len(text) > MAX_TEXT_ID:
                raise BatchRejectedError(
                    f"event seq {seq} has a {name!r} longer than {MAX_TEXT_ID} characters"
                )
        if "\x00" in event_id or "\x00" in kind or _has_nul(device_id, boot_id):
            raise BatchRejectedError(f"event seq {seq} has a NUL character in a text field")
        rows.append(
            EventRow(
                id=event_id,
                seq=seq,
                kind=kind,
                device_id=device_id,
                recorded_at=str(recorded_at),
                boot_id=boot_id,
                mono_ns=mono_ns,
                clock_synced=clock_synced,
                body=orjson.dumps(event) if bodies is None else bodies[i],
                event=event,
            )
        )
    return rows


def _short(value: object) -> str:
    """A value for a reason: its repr, cut (a forged id may be kilobytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _seq_range(value: object, what: str) -> Range:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or type(value[0]) is not int
        or type(value[1]) is not int
        or not 1 <= value[0] <= value[1] <= MAX_SEQ
    ):
        raise ReportError(f"{what} must be [first, last] with 1 <= first <= last <= {MAX_SEQ}, got {value!r}")
    return (value[0], value[1])


def parse_report(row: EventRow) -> Explanation | Anchor | None:
    """What a report event says, None for other events; :class:`ReportError` if its data is unusable."""
    data = row.event.get("data")
    if row.kind == "outbox.evicted":
        if not isinstance(data, dict) or not isinstance(data.get("ranges"), list):
            raise ReportError("outbox.evicted needs data.ranges")
        ranges = data["ranges"]
        if len(ranges) > MAX_EVICTED_RANGES:
            raise ReportError(f"outbox.evicted lists {len(ranges)} ranges (at most {MAX_EVICTED_RANGES})")
        reason = data.get("reason")
        source = f"outbox.evicted:{reason}" if isinstance(reason, str) else "outbox.evicted"
        return Explanation(source[:100], merge(_seq_range(r, "an evicted range") for r in ranges))
    rule = data.get("rule") if isinstance(data, dict) else None
    if row.kind == "alert.raised" and isinstance(data, dict) and rule in JOURNAL_LOSS_RULES:
        details = data.get("details")
        lost = details.get("possibly_lost") if isinstance(details, dict) else None
        if lost is None:
            return None  # nothing was at risk (no seqs reserved before the corruption or the loss)
        return Explanation(str(rule), [_seq_range(lost, "details.possibly_lost")])
    if row.kind == "clock.synced":
        if not isinstance(data, dict):
            raise ReportError("clock.synced needs data")
        boot_id, mono, utc = data.get("boot_id"), data.get("mono_ns"), parse_time(data.get("utc"))
        if not isinstance(boot_id, str) or not boot_id or len(boot_id) > MAX_TEXT_ID or _has_nul(boot_id):
            raise ReportError(f"clock.synced needs data.boot_id as a string of 1..{MAX_TEXT_ID} characters")
        if type(mono) is not int or not 0 <= mono <= MAX_MONO_NS:
            raise ReportError(f"clock.synced needs data.mono_ns as an integer in 0..{MAX_MONO_NS}")
        if utc is None or not MIN_UTC <= utc < MAX_UTC:
            raise ReportError("clock.synced needs data.utc as an ISO 8601 time with a UTC offset, 1970..2200")
        return Anchor(boot_id, mono, utc_ns(utc))
    return None


def nearest_anchor(anchors: Sequence[tuple[int, int]], mono_ns: int) -> tuple[int, int]:
    """The (mono_ns, utc_ns) anchor closest to ``mono_ns`` (least drift); on a tie the earlier one.

    ``anchors`` is sorted by mono_ns and not empty. The SQL that applies a new anchor to stored events uses
    the same rule, so the result does not depend on the order events and anchors arrive in."""
    i = bisect.bisect_left(anchors, (mono_ns, -(2**63)))
    candidates = anchors[max(0, i - 1) : i + 1]
    return min(candidates, key=lambda a: (abs(a[0] - mono_ns), a[0]))


def corrected_ns(anchor: tuple[int, int], mono_ns: int) -> int:
    """``anchor.utc - (anchor.mono_ns - event.mono_ns)``, in ns (docs/OUTBOX.md, "Clock")."""
    return anchor[1] - (anchor[0] - mono_ns)


def resend_command(request_id: str, first: int, last: int) -> bytes:
    """A ``resend`` downlink command for one range (docs/OUTBOX.md, "Downlink commands"): the form every
    gateway takes."""
    return orjson.dumps(
        {"request_id": request_id, "command": "resend", "args": {"from_seq": first, "to_seq": last}}
    )


def resend_args(ranges: Sequence[Range]) -> dict[str, Any]:
    """The args of a ``resend`` command for ``ranges``: one range in the original ``from_seq``/``to_seq``
    form, so a gateway of before multi-range resends still answers it; several as ``ranges``."""
    if len(ranges) == 1:
        return {"from_seq": ranges[0][0], "to_seq": ranges[0][1]}
    return {"ranges": [list(r) for r in ranges]}


def resend_ranges_command(request_id: str, ranges: Sequence[Range]) -> bytes:
    """A ``resend`` command for several ranges (``args.ranges``), unsigned (:func:`resend_args`)."""
    return orjson.dumps({"request_id": request_id, "command": "resend", "args": resend_args(ranges)})


class ReceiverBackend(Protocol):
    """What the receiver needs from a database; SQLite (sqlite.py) and PostgreSQL (postgres.py)."""

    def apply(self, items: Iterable[BatchToStore | Rejection]) -> list[StoreResult | Rejection]:
        """Store several messages in one transaction; raises :class:`StoreUnavailableError` to retry."""

    def summary(self, now: datetime | None = None) -> list[GatewaySummary]: ...

    def classes(
        self, gateway_id: str, store_id: str | None = None, now: datetime | None = None
    ) -> GapClasses: ...

    def claim_resends(
        self,
        interval_s: float,
        max_ranges: int,
        *,
        max_seqs: int = ...,
        online_s: float | None = None,
        max_gateways: int = ...,
        single_ranges: int = ...,
        now: datetime | None = None,
    ) -> list[ResendRequest]:
        """Lost ranges of every gateway not asked within ``interval_s`` (quiet ones included; ``online_s``
        limits it to those heard from within it); claims them (shared by receivers)."""

    def mark_single_range(
        self, store_id: str, gateway_id: str, reason: str, now: datetime | None = None
    ) -> bool:
        """Ask this gateway one range per command from now on; returns whether it was not marked yet."""

    def subscriptions(self, client_id: str) -> list[str]:
        """The topic filters recorded as subscribed in the MQTT session of ``client_id``."""

    def record_subscriptions(self, client_id: str, topics: Sequence[str], *, replace: bool) -> None:
        """Record ``topics`` as subscribed by ``client_id`` (added, or with ``replace`` as all of them)."""

    def count_rejected(self) -> int: ...

    def conflicts(self, limit: int = 100) -> list[ConflictRow]: ...

    def rejections(self, limit: int = 100) -> list[RejectedRow]: ...

    def close(self) -> None: ...
