"""The HQ uplink: publishes the outbox to HQ's broker in batches (QoS 1), by class priority (docs/OUTBOX.md).

Each batch holds events of one class in seq order. The in-flight window counts batches from publish until
their PUBACK is *recorded on disk* by the journal, so a SIGKILL makes HQ see at most one window twice (it
deduplicates by event id) and never miss one. Free slots go to the highest class with events waiting, except
every ``low_class_every``-th, which goes to the lowest waiting class (no class starves). ``critical`` has one
extra slot and is exempt from the drain rate limit, so a live alert overtakes any backlog.

The connection carries a retained birth message on ``.../status`` (online, version, config hash) and a
last will (offline), so HQ sees a gateway that vanished. While HQ is unreachable, a TCP probe ends the
reconnect backoff as soon as the port answers again (delivery resumes within about a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import orjson

from cloud_bridge.commands import MAX_RESEND_SEQS
from cloud_bridge.topics import events_topic, status_topic
from cloud_bridge.wire import Compressor, encode_batch
from gateway import __version__
from gateway.config import GatewayConfig
from gateway.kernel.clock import BOOT_ID
from gateway.kernel.journal import Committed, Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import MqttClient, MqttError, Will
from gateway.kernel.outbox import CLASSES, CRITICAL, seq_ranges
from gateway.kernel.ratelimit import TokenBucket
from gateway.kernel.supervise import Backoff, reconnect_forever, tcp_reachable

_LOGGER = logging.getLogger(__name__)


def status_payload(status: str, config_hash: str | None, reason: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "status": status,
            "version": __version__,
            "config_hash": config_hash,
            "boot_id": BOOT_ID,
            "reason": reason,
            "at": time.time(),
        }
    )


class DrainLimit:
    """The drain's rate limit in events/s and bytes/s (0 = unlimited), one second of burst each: a batch may
    overdraw, and the debt is waited out before the next."""

    def __init__(
        self, events_per_s: int, bytes_per_s: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        now = clock()
        self._events = TokenBucket(events_per_s, events_per_s, now)
        self._bytes = TokenBucket(bytes_per_s, bytes_per_s, now)

    def delay(self) -> float:
        """Seconds until a batch may be sent (0: now)."""
        now = self._clock()
        return max(self._events.delay(now), self._bytes.delay(now))

    def take(self, events: int, nbytes: int) -> None:
        now = self._clock()
        self._events.spend(now, events)
        self._bytes.spend(now, nbytes)


@dataclass(slots=True)
class _Sent:
    cls: int | None
    """None: a resend batch (no watermark moves)."""
    first: int
    last: int
    count: int
    future: asyncio.Future[None]


RESEND: Final = -1
"""The window's next batch is one HQ asked for again (the downlink's resend command), not a class's."""


class _Delivery:
    """One connection's delivery state: how far each class was sent, and the batches awaiting HQ's PUBACK."""

    def __init__(self, delivered: dict[int, int], up: Callable[[], None]) -> None:
        self.pos = delivered
        """Per class, the last seq sent (starts at the delivered watermark)."""
        self.inflight: dict[int, deque[_Sent]] = {c: deque() for c in delivered}
        self.resending: deque[_Sent] = deque()
        self.timer: asyncio.Future[None] | None = None
        """The drain rate limit's wait, while it holds the next batch back."""
        self._up: Callable[[], None] | None = up

    def healthy(self) -> None:
        """Call ``up()`` (once per connection)."""
        if self._up is not None:
            up, self._up = self._up, None
            up()

    def in_window(self) -> int:
        return sum(map(len, self.inflight.values())) + len(self.resending)

    def busy(self) -> bool:
        return any(self.inflight.values()) or bool(self.resending)

    def cancel(self) -> None:
        """The connection ended: stop the timer and the batches still waiting (retrieving errors of the others)."""
        if self.timer is not None:
            self.timer.cancel()
        for batch in [b for s in self.inflight.values() for b in s] + list(self.resending):
            if not batch.future.done():
                batch.future.cancel()
            elif not batch.future.cancelled():
                batch.future.exception()


class Uplink:
    """Delivers the outbox to HQ; one connection at a time, reconnecting with backoff."""

    def __init__(
        self, config: GatewayConfig, journal: Journal, metrics: Metrics, config_hash: str | None
    ) -> None:
        self._hq = config.hq
        self._store_id = config.store.id
        self._gateway_id = config.gateway_id
        self._client_id = config.client_id("uplink", config.hq)
        self._journal = journal
        self._metrics = metrics
        self._config_hash = config_hash
        self._events_topic = events_topic(self._hq.topic_prefix, self._store_id, self._gateway_id)
        self._status_topic = status_topic(self._hq.topic_prefix, self._store_id, self._gateway_id)
        self._compressor = (
            None
            if self._hq.compression == "none"
            else Compressor(self._hq.compression, self._hq.compression_level)
        )
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uplink-encode")
        self._limiter = DrainLimit(self._hq.drain_max_events_per_s, self._hq.drain_max_bytes_per_s)
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._resends: deque[list[int]] = deque()
        self._client: MqttClient | None = None
        self._picks = 0
        self._settling: deque[int] = deque()
        """Acknowledged batches (by ack generation) whose watermark the journal has not yet written: they still
        hold a window slot, so a SIGKILL resends at most one window. Kept across sessions: a link that flaps
        while the journal cannot write (disk full) must not get a fresh window per connection."""
        self.stopping = False
        """Set before cancelling run(): the session then leaves a retained 'offline' status behind."""
        journal.add_listener(self._on_commit)
        journal.add_persist_listener(self._wake.set)

    def _on_commit(self, committed: Committed) -> None:
        self._caught_up.clear()
        self._wake.set()

    async def run(self) -> None:
        try:
            await reconnect_forever(
                "HQ broker",
                self._session,
                _LOGGER,
                # sqlite3.Error: a damaged page in the backlog must not take the gateway (and intake) down.
                (MqttError, OSError, sqlite3.Error),
                Backoff(cap=self._hq.reconnect_max_s),
                probe=lambda: tcp_reachable(self._hq.host, self._hq.port),
            )
        finally:
            self._encoder.shutdown(wait=False)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    async def _session(self, up: Callable[[], None]) -> str:
        will = Will(self._status_topic, status_payload("offline", self._config_hash, "connection lost"))
        client = MqttClient(self._hq, self._client_id, clean_start=True, will=will)
        self._client = client
        try:
            await client.connect()
            await client.publish(self._status_topic, status_payload("online", self._config_hash), retain=True)
            _LOGGER.info("uplink: connected to HQ %s:%d", self._hq.host, self._hq.port)
            self._metrics.uplink_connected.set(1)
            return await self._deliver(client, up)
        finally:
            self._metrics.uplink_connected.set(0)
            if self.stopping and client.is_connected:
                await self._say_offline(client)
            await client.disconnect()

    # --- resend (downlink command) ------------------------------------------------------------------

    async def resend(self, first: int, last: int) -> dict[str, list[list[int]]]:
        """Queue a resend of seqs first..last still on disk; answers which ranges will go and which are gone."""
        if not 1 <= first <= last or last - first >= MAX_RESEND_SEQS:
            raise ValueError(f"resend needs 1 <= from_seq <= to_seq and at most {MAX_RESEND_SEQS} seqs")
        # Seqs only: the bodies (up to 100,000 of them) are read batch by batch when they are sent.
        present = await self._journal.seqs_between(first, last)
        have = set(present)
        missing = [seq for seq in range(first, last + 1) if seq not in have]
        answer: dict[str, list[list[int]]] = {"resent": seq_ranges(present), "missing": seq_ranges(missing)}
        if present:
            # HQ asks again while an earlier resend is still on its way: queue only what is not queued yet, and
            # never more than MAX_RESEND_SEQS seqs in all (the rest is answered "busy": HQ asks again later).
            queued = sum(b - a + 1 for a, b in self._resends)
            busy: list[list[int]] = []
            for a, b in uncovered(present[0], present[-1], self._resends):
                room = MAX_RESEND_SEQS - queued
                if room <= 0:
                    busy.append([a, b])
                    continue
                take = min(b, a + room - 1)
                self._resends.append([a, take])
                queued += take - a + 1
                if take < b:
                    busy.append([take + 1, b])
            if busy:
                answer["busy"] = busy
            self._wake.set()
        return answer

    # --- delivery -----------------------------------------------------------------------------------

    def _draining(self) -> bool:
        """Whether a backlog is draining (more than two windows of events wait): only then does the drain rate
        limit apply, so live traffic is never throttled, only the catch-up after an outage."""
        return self._journal.backlog > 2 * self._hq.inflight_batches * self._hq.batch_max_events

    def _pick(self, pos: dict[int, int], used: int) -> int | None:
        """The class whose batch goes next, or None (window full, or nothing waiting).

        Critical first, always, with one slot beyond the window: an anti-starvation turn taken while an alert
        waits would put the alert behind that batch and behind the drain rate limit it is exempt from. The
        turns count non-critical batches only, so alerts do not take telemetry's turn either."""
        waiting = self._journal.waiting_classes(pos)
        if not waiting:
            return None
        window = self._hq.inflight_batches
        if CRITICAL in waiting:
            return CRITICAL if used < window + 1 else None
        if used >= window:
            return None
        every = self._hq.low_class_every
        if len(waiting) > 1 and self._picks % every == every - 1:
            return max(waiting)
        return min(waiting)

    @staticmethod
    def _complete_through(
        pos: dict[int, int], last: dict[int, int], inflight: dict[int, deque[_Sent]]
    ) -> int:
        """Every seq below the first unacknowledged event of every class is delivered or evicted."""
        heads = []
        for cls, sent in inflight.items():
            if sent:
                heads.append(sent[0].first)
            elif last[cls] > pos[cls]:
                heads.append(pos[cls] + 1)
        return min(heads) - 1 if heads else max(last.values())

    async def _deliver(self, client: MqttClient, up: Callable[[], None]) -> str:
        """Send batches until the connection ends. ``up()`` (which resets the reconnect backoff) is called once
        HQ has acknowledged a batch or there is nothing to send: a broker that refuses every batch (an ACL
        mistake) keeps us backing off instead of reconnecting several times a second."""
        delivery = _Delivery(self._journal.delivered_watermarks(), up)
        closed = asyncio.ensure_future(client.wait_closed())
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                self._take_acknowledgements(delivery)
                await self._fill_window(delivery, client, loop)
                self._note_if_idle(delivery)
                await self._wait_for_progress(delivery, closed)
                if closed.done():
                    return closed.result()
        finally:
            closed.cancel()
            delivery.cancel()

    def _take_acknowledgements(self, delivery: _Delivery) -> None:
        """Settle the batches HQ has acknowledged, in order; the journal records their watermarks."""
        journal = self._journal
        for cls, sent in delivery.inflight.items():
            while sent and sent[0].future.done():
                batch = sent.popleft()
                self._settle(batch)
                journal.note_delivered(cls, batch.last)
                self._settling.append(journal.ack_generation[0])
                delivery.healthy()
        while delivery.resending and delivery.resending[0].future.done():
            self._settle(delivery.resending.popleft())
        persisted = journal.ack_generation[1]
        while self._settling and self._settling[0] <= persisted:
            self._settling.popleft()
        if len(self._settling) * 2 >= self._hq.inflight_batches:
            # Half the window waits for watermarks on disk: have the journal write them now rather than when
            # the next commit or its hold (SD wear) would.
            journal.hurry_acks()

    def _next_turn(self, delivery: _Delivery) -> int | None:
        """The window's next batch: a class, :data:`RESEND`, or None (window full, or nothing waiting)."""
        used = delivery.in_window() + len(self._settling)
        picked = self._pick(delivery.pos, used)
        if self._resends and picked != CRITICAL and used < self._hq.inflight_batches:
            return RESEND  # HQ asked for these: after live alerts, before any backlog
        return picked

    async def _fill_window(
        self, delivery: _Delivery, client: MqttClient, loop: asyncio.AbstractEventLoop
    ) -> None:
        while (turn := self._next_turn(delivery)) is not None:
            if turn != CRITICAL and self._rate_limited(delivery):
                return
            if turn == RESEND:
                resent = await self._send_resend(client, loop)
                if resent is not None:
                    delivery.resending.append(resent)
            else:
                await self._send_class(delivery, client, loop, turn)

    def _rate_limited(self, delivery: _Delivery) -> bool:
        """While a backlog drains, the drain rate limit may hold the next batch back; a timer then wakes the
        loop when it may go."""
        if not self._draining() or (wait := self._limiter.delay()) <= 0:
            return False
        if delivery.timer is None or delivery.timer.done():
            delivery.timer = asyncio.ensure_future(asyncio.sleep(wait))
        return True

    async def _send_class(
        self, delivery: _Delivery, client: MqttClient, loop: asyncio.AbstractEventLoop, cls: int
    ) -> None:
        """Send the next batch of class ``cls``, unless there is none after all."""
        journal = self._journal
        pos = delivery.pos
        seen = journal.class_last(cls)
        rows = await journal.read_class(cls, pos[cls], self._hq.batch_max_events, self._hq.batch_max_bytes)
        if not rows:
            pos[cls] = max(pos[cls], seen)  # evicted meanwhile
            return
        if cls != CRITICAL and journal.class_last(CRITICAL) > pos[CRITICAL]:
            # A critical event (maybe the report of an eviction that ran during this read) goes first: this
            # batch's complete_through must not cover seqs HQ cannot explain yet.
            return
        # This class's head is the batch's own first seq: anything of the class below it and above pos was
        # evicted, and its report (critical, sent first) is already on its way.
        through = self._complete_through({**pos, cls: rows[0][0] - 1}, journal.last_seqs(), delivery.inflight)
        batch = await self._send(client, loop, cls, rows, through)
        delivery.inflight[cls].append(batch)
        pos[cls] = batch.last
        if cls != CRITICAL:
            self._picks += 1

    def _note_if_idle(self, delivery: _Delivery) -> None:
        """Nothing in flight and nothing waiting: the link is healthy, and HQ may have everything."""
        if delivery.busy() or self._resends or self._journal.waiting_classes(delivery.pos):
            return
        delivery.healthy()
        if self._journal.caught_up:
            self._caught_up.set()

    async def _wait_for_progress(self, delivery: _Delivery, closed: asyncio.Future[str]) -> None:
        """Until the connection closes, a wake-up (commit, resend, persisted acknowledgements), the oldest batch
        of a class or resend is acknowledged, or the rate limit's timer runs out."""
        waits: list[asyncio.Future[Any]] = [closed, asyncio.ensure_future(self._wake.wait())]
        waits += [s[0].future for s in delivery.inflight.values() if s]
        if delivery.resending:
            waits.append(delivery.resending[0].future)
        if delivery.timer is not None and not delivery.timer.done():
            waits.append(delivery.timer)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        waits[1].cancel()

    def _settle(self, batch: _Sent) -> None:
        error = batch.future.exception()
        if error is not None:
            raise MqttError(f"batch {batch.first}..{batch.last} not acknowledged: {error}")
        self._metrics.uplink_batches.inc()
        if batch.cls is not None:
            self._metrics.uplink_events.inc(batch.count)

    async def _send(
        self,
        client: MqttClient,
        loop: asyncio.AbstractEventLoop,
        cls: int | None,
        rows: list[tuple[int, bytes]],
        through: int,
    ) -> _Sent:
        seqs = [r[0] for r in rows]
        payload = await loop.run_in_executor(
            self._encoder,
            lambda: encode_batch(
                self._store_id,
                self._gateway_id,
                seqs,
                [r[1] for r in rows],
                cls=None if cls is None else CLASSES[cls],
                complete_through=through,
                compressor=self._compressor,
                resend=cls is None,
            ),
        )
        if cls != CRITICAL and self._draining():
            self._limiter.take(len(rows), len(payload))
        self._metrics.uplink_bytes.inc(len(payload))
        return _Sent(cls, seqs[0], seqs[-1], len(seqs), client.publish(self._events_topic, payload, qos=1))

    async def _send_resend(self, client: MqttClient, loop: asyncio.AbstractEventLoop) -> _Sent | None:
        span = self._resends[0]
        rows = await self._journal.read_range(
            span[0], span[1], self._hq.batch_max_events, self._hq.batch_max_bytes
        )
        if not rows or rows[-1][0] >= span[1]:
            self._resends.popleft()
        else:
            span[0] = rows[-1][0] + 1
        if not rows:
            return None
        return await self._send(client, loop, None, rows, self._journal.delivered_seq)

    async def drain(self, within_s: float) -> bool:
        """Wait (up to ``within_s`` seconds) until HQ has everything committed so far; True if it has."""
        if self._journal.caught_up:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while not self._journal.caught_up:
                    self._caught_up.clear()
                    await self._caught_up.wait()
        return self._journal.caught_up

    async def _say_offline(self, client: MqttClient, within_s: float = 2.0) -> None:
        """The retained offline status of a clean shutdown (a clean DISCONNECT does not fire the last will)."""
        with contextlib.suppress(MqttError, TimeoutError):
            async with asyncio.timeout(within_s):
                await client.publish(
                    self._status_topic, status_payload("offline", self._config_hash, "shutdown"), retain=True
                )


def uncovered(first: int, last: int, spans: Iterable[Sequence[int]]) -> list[list[int]]:
    """The parts of first..last (inclusive) that no span [a, b] in ``spans`` covers, in order."""
    pieces = [[first, last]]
    for a, b in spans:
        cut: list[list[int]] = []
        for lo, hi in pieces:
            if b < lo or a > hi:
                cut.append([lo, hi])
                continue
            if lo < a:
                cut.append([lo, a - 1])
            if hi > b:
                cut.append([b + 1, hi])
        pieces = cut
    return pieces
