"""The HQ uplink: publishes committed events to the HQ broker in batches (QoS 1), oldest first.

An event counts as delivered only when HQ's broker has acknowledged (PUBACK) the batch holding it and every
batch before it; the delivered watermark is persisted by the journal. After a reconnect or a restart, delivery
resumes from the first event not acknowledged, so HQ may see a batch twice (it deduplicates by event id) but
never misses one. At most ``inflight_batches`` batches await PUBACK at once.

The connection carries a retained birth message on ``.../status`` (online, version, config hash) and a
last will (offline), so HQ sees a gateway that vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import orjson

from cloud_bridge.topics import events_topic, status_topic
from cloud_bridge.wire import encode_batch
from gateway import __version__
from gateway.clock import BOOT_ID
from gateway.config import GatewayConfig
from gateway.journal import Committed, Journal
from gateway.metrics import Metrics
from gateway.mqtt import MqttClient, MqttError, Will
from gateway.supervise import reconnect_forever

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


class Uplink:
    """Delivers the journal to HQ; one connection at a time, reconnecting with backoff."""

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
        self._new_data = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._client: MqttClient | None = None
        self.stopping = False
        """Set before cancelling run(): the session then leaves a retained 'offline' status behind."""
        journal.add_listener(self._on_commit)

    def _on_commit(self, committed: Committed) -> None:
        self._caught_up.clear()
        self._new_data.set()

    async def run(self) -> None:
        await reconnect_forever("HQ broker", self._session, _LOGGER, (MqttError, OSError))

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

    async def _deliver(self, client: MqttClient, up: Callable[[], None]) -> str:
        """Send batches until the connection ends. ``up()`` (which resets the reconnect backoff) is called once
        HQ has acknowledged a batch or there is nothing to send: a broker that refuses every batch (an ACL
        mistake) keeps us backing off instead of reconnecting several times a second."""
        healthy = False
        sent_upto = self._journal.delivered_seq
        inflight: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        closed = asyncio.ensure_future(client.wait_closed())
        try:
            while True:
                while len(inflight) < self._hq.inflight_batches:
                    rows = await self._journal.read_after(
                        sent_upto, self._hq.batch_max_events, self._hq.batch_max_bytes
                    )
                    if not rows:
                        break
                    seqs = [r[0] for r in rows]
                    payload = encode_batch(self._store_id, self._gateway_id, seqs, [r[1] for r in rows])
                    inflight.append((seqs[0], seqs[-1], client.publish(self._events_topic, payload, qos=1)))
                    sent_upto = seqs[-1]
                if not inflight:
                    if not healthy:
                        healthy = True
                        up()
                    if self._journal.delivered_seq >= self._journal.last_seq:
                        self._caught_up.set()
                    self._new_data.clear()
                    if self._journal.last_seq > sent_upto:
                        continue
                    waiter = asyncio.ensure_future(self._new_data.wait())
                    await asyncio.wait((waiter, closed), return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if closed.done():
                        return closed.result()
                    continue
                first, last, fut = inflight[0]
                await asyncio.wait((fut, closed), return_when=asyncio.FIRST_COMPLETED)
                if not fut.done():
                    return closed.result()
                if fut.exception() is not None:
                    raise MqttError(f"batch {first}..{last} not acknowledged: {fut.exception()}")
                inflight.popleft()
                if not healthy:
                    healthy = True
                    up()
                self._journal.note_delivered(last)
                self._metrics.uplink_batches.inc()
                self._metrics.uplink_events.inc(last - first + 1)
        finally:
            closed.cancel()
            for _, _, fut in inflight:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()

    async def drain(self, within_s: float) -> bool:
        """Wait (up to ``within_s`` seconds) until HQ has everything committed so far; True if it has."""
        if self._journal.delivered_seq >= self._journal.last_seq:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self._journal.delivered_seq < self._journal.last_seq:
                    self._caught_up.clear()
                    await self._caught_up.wait()
        return self._journal.delivered_seq >= self._journal.last_seq

    async def _say_offline(self, client: MqttClient, within_s: float = 2.0) -> None:
        """The retained offline status of a clean shutdown (a clean DISCONNECT does not fire the last will)."""
        with contextlib.suppress(MqttError, TimeoutError):
            async with asyncio.timeout(within_s):
                await client.publish(
                    self._status_topic, status_payload("offline", self._config_hash, "shutdown"), retain=True
                )
