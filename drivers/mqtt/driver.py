"""The MQTT intake driver: a persistent session on the store broker, PUBACK only after the journal commit.

Memory is bounded by MQTT flow control: with QoS 1 the broker sends at most ``receive_maximum`` messages we
have not acknowledged, and we acknowledge only after COMMIT. A gateway killed at any moment loses nothing the
broker accepted: un-acked messages are redelivered to the persistent session, and the journal's dedup key
(device, kind, receipt number) drops those that were committed just before the kill.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from drivers.base import DriverContext
from drivers.mqtt.config import MqttDriverConfig
from drivers.mqtt.decode import Rejection, TopicRouter, decode_message
from gateway.journal import QUARANTINE_KEEP_BYTES, Draft, Rejected
from gateway.mqtt import Message, MqttClient, MqttError
from gateway.supervise import reconnect_forever

_LOGGER = logging.getLogger(__name__)


class MqttIntake:
    """One driver instance: subscribes to its routes and feeds the journal."""

    def __init__(self, config: MqttDriverConfig, ctx: DriverContext) -> None:
        self.name = config.name
        self._config = config
        self._broker = ctx.config.store_broker
        self._client_id = ctx.client_id(f"intake-{config.name}")
        self._journal = journal = ctx.journal
        self._metrics = metrics = ctx.metrics
        self._router = TopicRouter(config, frozenset(d.id for d in ctx.config.devices))
        self._ctx = ctx
        self._client: MqttClient | None = None
        self._accepting = True
        self._received = metrics.received.labels(self.name)
        self._received_pending = 0
        journal.add_listener(self._flush_received)
        self._high_water = journal.high_water

    async def run(self) -> None:
        """Stay connected until cancelled."""
        await reconnect_forever(f"store broker ({self.name})", self._session, _LOGGER, (MqttError, OSError))

    async def _session(self, up: Callable[[], None]) -> str:
        client = MqttClient(self._broker, self._client_id, clean_start=False, manual_ack=True)
        # Acks are bound to the connection a message came in on: a mid means nothing on another connection.
        client.on_message = functools.partial(self._on_message, client)
        self._client = client
        try:
            session_present = await client.connect()
            await client.subscribe([(r.subscription, self._config.qos) for r in self._config.routes])
            _LOGGER.info(
                "%s: connected to %s:%d (session %s)",
                self.name,
                self._broker.host,
                self._broker.port,
                "resumed" if session_present else "new",
            )
            self._ctx.set_state(self.name, True)
            up()
            return await client.wait_closed()
        finally:
            self._ctx.set_state(self.name, False, "disconnected from the store broker")
            await client.disconnect()
            # What this connection delivered but we did not commit yet can no longer be acknowledged; the broker
            # redelivers it to the next session, so holding it would only duplicate it.
            dropped = self._journal.discard(client)
            if dropped:
                _LOGGER.info(
                    "%s: %d uncommitted messages left for the broker to redeliver", self.name, dropped
                )

    def _flush_received(self, _: object = None) -> None:
        if self._received_pending:
            self._received.inc(self._received_pending)
            self._received_pending = 0

    def pause(self) -> None:
        """Stop taking messages (shutdown): those not yet taken stay with the broker for the next start."""
        self._accepting = False

    async def disconnect(self) -> None:
        if self._client is not None:
            await self._client.disconnect()

    def _on_message(self, client: MqttClient, message: Message) -> None:
        if not self._accepting:
            return
        # Counted locally and added to the metric after each commit: a Prometheus inc takes a lock.
        self._received_pending += 1
        ack = functools.partial(client.ack, message.mid, message.qos) if message.qos else None
        topic = message.topic
        payload = bytes(message.payload)
        try:
            decoded = decode_message(self._router, topic, payload)
        except Exception as err:  # a decoder bug: quarantine this message, never jam the connection
            _LOGGER.exception("%s: decoding a message on %r failed", self.name, topic[:200])
            decoded = Rejection("internal_error", repr(err)[:300])
        item: Draft | Rejected
        if isinstance(decoded, Rejection):
            item = Rejected(
                self.name,
                decoded.reason,
                decoded.detail,
                len(payload),
                payload[:QUARANTINE_KEEP_BYTES],
                topic,
                decoded.device_id,
                ack,
                client if message.qos else None,
            )
        else:
            item = decoded.to_draft(ack, self.name)
            if message.qos:
                item.origin = client
        if not self._journal.submit(item):
            # Not acknowledged: the broker keeps it and redelivers it to our session.
            self._metrics.dropped.labels(self.name, "journal_busy").inc()
        if self._journal.pending >= self._high_water:
            # Bounded memory whatever the broker does with its in-flight window: stop reading the socket
            # until the journal has committed most of what is waiting.
            client.pause_reading()
            self._journal.when_below(max(1, self._high_water // 2), client.resume_reading)
