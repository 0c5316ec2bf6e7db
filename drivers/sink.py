"""The one way a driver hands what it read to the gateway: limits, health, quarantine, then the journal.

A driver's I/O loop reads bytes, calls its pure decoder, and then calls exactly one of
:meth:`DeviceSink.emit` (a good reading), :meth:`DeviceSink.reject` (bytes that could not be decoded:
quarantined with a reason) or :meth:`DeviceSink.failed` (an I/O error or timeout after the driver's own
retries). ``ack`` callbacks run only after the event is committed to disk (or quarantined).

A driver that must apply the limits before it decodes (the MQTT intake: a flooding device costs no decoding,
and one message may become several events) uses the two halves of :meth:`DeviceSink.emit` instead:
:meth:`DeviceSink.admit` for the device's limits, then :meth:`DeviceSink.submit` for each event it decoded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Literal

import orjson
from pydantic import BaseModel

from drivers.devices import Device
from gateway.kernel.journal import QUARANTINE_KEEP_BYTES, Draft, Journal, Rejected
from gateway.kernel.metrics import Metrics

_LOGGER = logging.getLogger(__name__)

REDACTED: Final = b"<redacted: the payload may hold biometric or personal data>"
QUOTA_ROWS: Final = 10
"""Quarantine rows one source (a device, or a route's unknown ids) gets per window; the rest are summarised."""
QUOTA_WINDOW_S: Final = 10.0
QUOTA_MAX_WINDOW_S: Final = 600.0
"""While a source keeps exceeding its quota, each window is twice the last, up to this."""


class DeviceSink:
    """One driver instance's path into the journal."""

    def __init__(self, driver: str, journal: Journal, metrics: Metrics) -> None:
        self.driver = driver
        self._journal = journal
        self._metrics = metrics
        self._received = metrics.received.labels(driver)
        self._received_pending = 0
        self._rate_limited = metrics.dropped.labels(driver, "rate_limited")
        self._journal_busy = metrics.dropped.labels(driver, "journal_busy")
        journal.add_listener(self._flush_received)

    def emit(
        self,
        device: Device,
        kind: str,
        data: BaseModel | bytes,
        *,
        size: int,
        occurred_at: str | None = None,
        dedup_key: str | None = None,
        ack: Callable[[], None] | None = None,
        raw: bytes = b"",
        origin: object = None,
        done: Callable[[int | None], None] | None = None,
    ) -> bool:
        """Submit one good reading of ``device``. ``data`` is a validated payload model (or its JSON bytes);
        ``size`` is what came off the wire (the device's payload limit applies to it). False when the reading
        was not taken: rate-limited (counted, reported, and acked), too large (quarantined), or the journal
        is full (not acked: the caller keeps it or the device resends). ``done`` (see :class:`Draft`) runs on
        the journal's writer thread after COMMIT with the event's seq, or None for a redelivery; a reading the
        journal itself quarantined (too large, a fault storing it) is acked without ``done``."""
        self._received.inc()
        verdict = self.admit(device, size, ack)
        if verdict == "too_large":
            limit = device.limits.max_payload_bytes
            self.reject(
                device, "too_large", f"{size} bytes > max_payload_bytes {limit}", raw, ack=ack, size=size
            )
            return False
        if verdict != "ok":
            return False
        body = (
            data if isinstance(data, bytes) else orjson.dumps(data.model_dump(mode="json", exclude_none=True))
        )
        draft = Draft(kind, device.id, body, data, occurred_at, dedup_key, ack, self.driver, origin, done)
        return self.submit(draft, device)

    def note_received(self) -> None:
        """Count one message in without taking the metric's lock: the count reaches the metric after the
        journal's next commit, or at once with the next rate-limited drop. For a driver taking thousands of
        messages a second (:meth:`emit` counts at once)."""
        self._received_pending += 1

    def _flush_received(self, _: object = None) -> None:
        if self._received_pending:
            self._received.inc(self._received_pending)
            self._received_pending = 0

    def admit(
        self, device: Device, size: int, ack: Callable[[], None] | None = None
    ) -> Literal["ok", "rate_limited", "too_large"]:
        """``device``'s limits for one message of ``size`` bytes (what came off the wire). A rate-limited one is
        dropped here: counted (on the device, which reports it, and in the metrics, at once: nothing may commit
        while a device floods, and the counts must show it) and acked, so a flooding device cannot jam a
        session. A too large one is the caller's to quarantine, with its detail."""
        verdict = device.admit(size)
        if verdict == "rate_limited":
            self._flush_received()
            self._rate_limited.inc()
            if ack is not None:
                ack()
        return verdict

    def submit(self, draft: Draft, device: Device | None = None) -> bool:
        """Hand one event to the journal; ``device`` (if any) counts it as a good message. False when the
        journal is full: counted, and the draft's ``ack`` does not run (the caller keeps it or the device or
        broker sends it again)."""
        if not self._journal.submit(draft):
            self._journal_busy.inc()
            return False
        if device is not None:
            device.seen()
        return True

    def reject(
        self,
        device: Device | None,
        reason: str,
        detail: str,
        raw: bytes,
        *,
        topic: str | None = None,
        device_id: str | None = None,
        ack: Callable[[], None] | None = None,
        size: int | None = None,
        redact: bool = False,
        origin: object = None,
    ) -> bool:
        """Quarantine bytes that could not become an event, with a reason code and a human-readable detail.
        ``redact`` keeps the payload out of the quarantine (it may hold biometric or personal data). False when
        the journal is full (counted; not acknowledged, so the device or broker sends it again)."""
        if device is not None:
            device.quarantined()
        kept = REDACTED if redact else raw[:QUARANTINE_KEEP_BYTES]
        rejected = Rejected(
            self.driver,
            reason,
            detail[:500],
            len(raw) if size is None else size,
            kept,
            topic,
            device.id if device is not None else device_id,
            ack,
            origin,
        )
        if not self._journal.submit(rejected):
            self._journal_busy.inc()
            return False
        return True

    def count_quarantined(self, reason: str) -> None:
        """Count a message quarantined only as part of a summary row (see :class:`QuarantineQuota`)."""
        self._metrics.quarantined.labels(self.driver, reason).inc()

    def failed(self, device: Device, reason: str) -> None:
        """An I/O error or timeout talking to ``device``, after the driver's own retries."""
        device.failed(reason)

    def reachable(self, device: Device) -> None:
        """``device`` answered but had nothing to report: it is alive (clears error/offline)."""
        device.reachable()

    @property
    def backlogged(self) -> bool:
        """True while the journal has a commit's worth waiting: a polling driver may skip a round."""
        return self._journal.pending >= self._journal.high_water


class GarbageBatch:
    """One device's undecodable input, quarantined as one row per ``interval_s``: counts by reason, the total
    size and the first item's bytes (and its error), so a noisy line or a mis-keyed sensor cannot fill the
    quarantine and push out other devices' rows. ``counted_in`` says what the row's headline counts."""

    def __init__(
        self,
        sink: DeviceSink,
        device: Device,
        unit: str,
        counted_in: Literal["items", "bytes"],
        interval_s: float,
    ) -> None:
        self._sink = sink
        self._device = device
        self._unit = unit
        self._counted_in = counted_in
        self._interval_s = interval_s
        self._reasons: Counter[str] = Counter()
        self._bytes = 0
        self._sample = b""
        self._detail = ""
        self._timer: asyncio.TimerHandle | None = None

    def add(self, reason: str, raw: bytes, size: int | None = None, detail: str = "") -> None:
        self._reasons[reason] += 1
        self._bytes += len(raw) if size is None else size
        if not self._sample:
            self._sample = raw
            self._detail = detail
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self.flush)

    def flush(self) -> None:
        """Quarantine what is held now (the timer does it a second after the first item)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._reasons:
            return
        reasons = self._reasons
        reason = reasons.most_common(1)[0][0] if len(reasons) == 1 else "garbage"
        counts = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        headline = reasons.total() if self._counted_in == "items" else self._bytes
        kept = f"the first, kept: {self._detail}" if self._detail else "first bytes kept"
        self._sink.reject(
            self._device,
            reason,
            f"{headline} {self._unit} that did not decode ({counts}); {kept}",
            self._sample,
            size=self._bytes,
        )
        reasons.clear()
        self._bytes = 0
        self._sample = b""
        self._detail = ""


@dataclass(slots=True)
class _Spell:
    """One source's current quota window."""

    allowance: int
    window_s: float
    timer: asyncio.TimerHandle | None = None
    reasons: Counter[str] = field(default_factory=Counter)
    size: int = 0
    reason: str = ""
    """The first summarised message's reason: the summary row's, and the one its commit counts."""
    sample: bytes = b""
    detail: str = ""
    topic: str | None = None
    device_id: str | None = None
    redact: bool = False


class QuarantineQuota:
    """Per-source quarantine quota: one source (a device, or all the unknown ids of one route) gets
    :data:`QUOTA_ROWS` rows per window, each message whole as :meth:`DeviceSink.reject` keeps it; beyond that, its
    messages are acknowledged at once and summarised in one row at the end of the window (counts by reason, total
    size, the first one's bytes unless redacted). A source still over its quota gets no fresh rows, and windows
    twice as long, until a window passes within quota. So one till flooding garbage cannot fill the quarantine
    and have its row cap evict other devices' evidence.

    Counters stay exact: each message counts on its device at once (``quarantined``), and in
    ``storegw_messages_quarantined_total`` under its own reason, the first summarised one when its summary row
    commits (the journal counts every row it commits), the others at once."""

    def __init__(
        self,
        sink: DeviceSink,
        rows: int = QUOTA_ROWS,
        window_s: float = QUOTA_WINDOW_S,
        max_window_s: float = QUOTA_MAX_WINDOW_S,
    ) -> None:
        self._sink = sink
        self._rows = rows
        self._window_s = window_s
        self._max_window_s = max_window_s
        self._spells: dict[Hashable, _Spell] = {}

    def reject(
        self,
        source: Hashable,
        device: Device | None,
        reason: str,
        detail: str,
        raw: bytes,
        *,
        topic: str | None = None,
        device_id: str | None = None,
        ack: Callable[[], None] | None = None,
        redact: bool = False,
        origin: object = None,
    ) -> None:
        """Quarantine one message of ``source`` (whole, or in the source's summary when over its quota)."""
        spell = self._spells.get(source)
        if spell is None:
            spell = self._spells[source] = _Spell(self._rows, self._window_s)
        if spell.timer is None:
            spell.timer = asyncio.get_running_loop().call_later(spell.window_s, self._window_ended, source)
        if spell.allowance > 0:
            spell.allowance -= 1
            self._sink.reject(
                device,
                reason,
                detail,
                raw,
                topic=topic,
                device_id=device_id,
                ack=ack,
                redact=redact,
                origin=origin,
            )
            return
        if device is not None:
            device.quarantined()
        if not spell.reasons:
            spell.reason = reason
            spell.sample = REDACTED if redact else raw[:QUARANTINE_KEEP_BYTES]
            spell.detail = "" if redact else detail[:200]
            spell.topic = topic
            spell.device_id = device.id if device is not None else device_id
            spell.redact = redact
        else:
            self._sink.count_quarantined(reason)
            spell.redact = spell.redact or redact
        spell.reasons[reason] += 1
        spell.size += len(raw)
        if ack is not None:
            ack()  # nothing of it waits for the journal: holding it would only hold the broker's window

    def flush(self) -> None:
        """Write every pending summary now (shutdown), and forget every window."""
        for source in list(self._spells):
            spell = self._spells.pop(source)
            if spell.timer is not None:
                spell.timer.cancel()
            self._summarise(spell)

    def _window_ended(self, source: Hashable) -> None:
        spell = self._spells[source]
        spell.timer = None
        if not spell.reasons:
            del self._spells[source]  # within quota: the next message starts a fresh allowance
            return
        window = spell.window_s
        self._summarise(spell, window)
        spell.window_s = min(window * 2, self._max_window_s)
        spell.timer = asyncio.get_running_loop().call_later(spell.window_s, self._window_ended, source)

    def _summarise(self, spell: _Spell, window: float | None = None) -> None:
        if not spell.reasons:
            return
        counts = ", ".join(f"{n} {r}" for r, n in spell.reasons.most_common())
        span = f"in {window:g} s " if window is not None else ""
        kept = (
            "none kept (redacted route)"
            if spell.redact
            else f"the first kept: {spell.detail}"
            if spell.detail
            else "the first kept"
        )
        detail = (
            f"{spell.reasons.total()} more message(s) {span}over this source's quarantine quota of {self._rows}"
            f" rows, counted, not stored ({counts}); {kept}"
        )
        sample = REDACTED if spell.redact else spell.sample
        if not self._sink.reject(
            None,
            spell.reason,
            detail,
            sample,
            topic=spell.topic,
            device_id=spell.device_id,
            size=spell.size,
            redact=spell.redact,
        ):
            self._sink.count_quarantined(spell.reason)  # no row will commit to count it
        spell.reasons = Counter()
        spell.size = 0
        spell.sample = b""
        spell.detail = ""
