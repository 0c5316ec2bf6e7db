"""The MQTT intake driver: a persistent session on the store broker, PUBACK only after the journal commit.

Every message goes through its device's limits (payload size, rate) before it is decoded, and every event
into the journal, through the driver's :class:`drivers.sink.DeviceSink`, as for every driver: the device
registry (drivers/devices.py) counts and reports what a device's rate limit drops (``device.status``
rate_limited), and a dropped QoS 1 message is still acknowledged so that a flooding device cannot jam the
session. Each configured device is registered once, by the first driver (in config order) with a route for
its profile; any MQTT driver may then take its messages.

Memory is bounded by MQTT flow control: with QoS 1 the broker sends at most ``receive_maximum`` messages we
have not acknowledged, and we acknowledge only after COMMIT. A gateway killed at any moment loses nothing the
broker accepted: un-acked messages are redelivered to the persistent session, and the journal's dedup key
(device, kind, receipt number) drops those that were committed just before the kill.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
from collections.abc import Callable, Hashable
from typing import Final

import orjson

from drivers.base import DriverContext
from drivers.devices import Device
from drivers.mqtt.config import MqttDriverConfig
from drivers.mqtt.decode import (
    Decoded,
    Rejection,
    RouteSpec,
    TopicRouter,
    decode_pos,
    decode_routed,
    decode_tag_reads,
)
from drivers.mqtt.profile import MqttProfile, RfidWindow, profile_limits, resolve_profile
from drivers.profiles import get_profile
from drivers.rfid import InventoryTracker
from drivers.sink import QuarantineQuota
from gateway.kernel.journal import Draft
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError
from gateway.kernel.supervise import reconnect_forever

_LOGGER = logging.getLogger(__name__)

MAX_UNLISTED_DEVICES: Final = 1000
"""With ``unknown_devices: accept``, devices not under ``devices`` that one driver tracks, at most."""
WINDOW_TICK_MAX_S: Final = 1.0


class MqttIntake:
    """One driver instance: subscribes to its routes and feeds the journal."""

    def __init__(self, config: MqttDriverConfig, ctx: DriverContext) -> None:
        self.name = config.name
        self._config = config
        self._broker = ctx.config.store_broker
        self._client_id = ctx.client_id(f"intake-{config.name}")
        self._journal = journal = ctx.journal
        self._registry = ctx.devices
        profiles = {d.id: resolve_profile(d.profile) for d in ctx.config.devices}
        self._router = TopicRouter(config, profiles)
        self._sink = ctx.sink(self.name)
        self._quota = QuarantineQuota(self._sink)
        self._ctx = ctx
        self._client: MqttClient | None = None
        self._accepting = True
        self._high_water = journal.high_water
        self._devices: dict[str, Device] = {}
        self._unlisted = 0
        ours = config.profiles()
        for device in ctx.config.devices:
            profile = profiles[device.id]
            if profile in ours and ctx.devices.get(device.id) is None:
                limits = device.limits_over(profile_limits(profile))
                self._devices[device.id] = ctx.devices.add(device.id, self.name, limits, profile)
        self._rfid_windows = _rfid_windows(config)
        self._trackers: dict[str, InventoryTracker] = {}

    async def run(self) -> None:
        """Stay connected until cancelled (and close RFID windows on time, when a route carries tag reads)."""
        connect = reconnect_forever(
            f"store broker ({self.name})", self._session, _LOGGER, (MqttError, OSError)
        )
        if not self._rfid_windows:
            await connect
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(connect, name=f"{self.name}-session")
            tg.create_task(self._close_windows(), name=f"{self.name}-rfid-windows")

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

    def pause(self) -> None:
        """Stop taking messages (shutdown): those not yet taken stay with the broker for the next start. The
        quarantine summaries still open are written now."""
        self._accepting = False
        self._quota.flush()

    async def disconnect(self) -> None:
        if self._client is not None:
            await self._client.disconnect()

    def _on_message(self, client: MqttClient, message: Message) -> None:
        if not self._accepting:
            return
        self._sink.note_received()
        qos = message.qos
        ack = functools.partial(client.ack, message.mid, qos) if qos else None
        topic = message.topic
        payload = bytes(message.payload)
        try:
            self._take(topic, payload, ack, client if qos else None)
        except Exception as err:  # a decoder bug: quarantine this message, never jam the connection
            source, device, redact = self._source_of(topic)
            if redact:
                # Its message and traceback may quote the payload: only the exception's type and where it was
                # raised leave this handler.
                where = traceback.extract_tb(err.__traceback__)[-1]
                at = f"{type(err).__name__} at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}"
                _LOGGER.error("%s: decoding a message on a redacted route failed: %s", self.name, at)
                detail = f"{at} (its message is not kept: redacted route)"
            else:
                _LOGGER.exception("%s: decoding a message on %r failed", self.name, topic[:200])
                detail = repr(err)[:300]
            self._quota.reject(
                source,
                device,
                "internal_error",
                detail,
                payload,
                # On a redacted route the topic may be all an attacker controls (its id level): only the
                # registered device's own topic is kept, else the route's bucket.
                topic=topic if not redact or device is not None else _route_bucket(source),
                device_id=None if device is None else device.id,
                ack=ack,
                redact=redact,
                origin=client if qos else None,
            )
        if self._journal.pending >= self._high_water:
            # Bounded memory whatever the broker does with its in-flight window: stop reading the socket
            # until the journal has committed most of what is waiting.
            client.pause_reading()
            self._journal.when_below(max(1, self._high_water // 2), client.resume_reading)

    def _reject(
        self,
        device: Device,
        spec: RouteSpec,
        reason: str,
        detail: str,
        payload: bytes,
        topic: str,
        ack: Callable[[], None] | None,
        origin: object,
    ) -> None:
        """Quarantine one message of a registered device (within its quota; redacted on a kiosk route)."""
        self._quota.reject(
            ("device", device.id),
            device,
            reason,
            detail,
            payload,
            topic=topic,
            ack=ack,
            redact=spec.redact,
            origin=origin,
        )

    def _source_of(self, topic: str) -> tuple[Hashable, Device | None, bool]:
        """The quarantine-quota source of a topic, its device if registered, and whether its route is redacted
        (True when even routing fails: nothing says it is not a kiosk's)."""
        try:
            routed = self._router.match(topic)
        except Exception:
            return ("route", None), None, True
        if isinstance(routed, Rejection):
            return _rejection_source(routed), None, routed.redact
        spec, device_id = routed
        device = self._devices.get(device_id) or self._registry.get(device_id)
        return ("device", device_id), device, spec.redact

    def _take(self, topic: str, payload: bytes, ack: Callable[[], None] | None, origin: object) -> None:
        routed = self._router.match(topic)
        if isinstance(routed, Rejection):
            # Kept topic: on a redacted route, an invalid id (anything the sender chose) is not.
            kept = (routed.bucket or None) if routed.redact and routed.device_id is None else topic
            self._quota.reject(
                _rejection_source(routed),
                None,
                routed.reason,
                routed.detail,
                payload,
                topic=kept,
                device_id=routed.device_id,
                ack=ack,
                redact=routed.redact,
                origin=origin,
            )
            return
        spec, device_id = routed
        device = self._devices.get(device_id) or self._device(device_id, spec)
        if device is None:
            self._quota.reject(
                ("route", spec.profile),
                None,
                "too_many_devices",
                f"more than {MAX_UNLISTED_DEVICES} devices not under 'devices'",
                payload,
                topic=topic,
                device_id=device_id,
                ack=ack,
                redact=spec.redact,
                origin=origin,
            )
            return
        size = len(payload)
        verdict = "too_large" if size > self._router.max_payload else self._sink.admit(device, size, ack)
        if verdict != "ok":
            if verdict == "rate_limited":
                return  # counted, reported and acked by the sink
            limit = min(self._router.max_payload, device.limits.max_payload_bytes)
            self._reject(
                device, spec, "too_large", f"{size} bytes > limit {limit}", payload, topic, ack, origin
            )
            return
        if spec.decoder == "rfid":
            self._take_reads(device, spec, payload, topic, ack, origin)
            return
        if spec.decoder == "pos" or spec.decoder == "reading":
            decoded: Decoded | list[Decoded] | Rejection = decode_pos(spec.kind, device_id, payload)
        else:
            decoded = decode_routed(spec, device_id, payload)
        if isinstance(decoded, Rejection):
            self._reject(device, spec, decoded.reason, decoded.detail, payload, topic, ack, origin)
        elif isinstance(decoded, Decoded):
            self._submit(device, decoded.to_draft(ack, self.name), origin)
        else:
            last = len(decoded) - 1
            for n, item in enumerate(decoded):
                # One ack for the message, on its last event: the journal commits in order.
                if not self._submit(device, item.to_draft(ack if n == last else None, self.name), origin):
                    return

    def _submit(self, device: Device, draft: Draft, origin: object) -> bool:
        if origin is not None:
            draft.origin = origin
        # False when the journal is full: not acknowledged, so the broker keeps it and redelivers it to our session.
        return self._sink.submit(draft, device)

    def _take_reads(
        self,
        device: Device,
        spec: RouteSpec,
        payload: bytes,
        topic: str,
        ack: Callable[[], None] | None,
        origin: object,
    ) -> None:
        reads = decode_tag_reads(device.id, payload)
        if isinstance(reads, Rejection):
            self._reject(device, spec, reads.reason, reads.detail, payload, topic, ack, origin)
            return
        tracker = self._trackers.get(device.id)
        if tracker is None:
            window = self._rfid_windows[spec.profile]
            tracker = InventoryTracker(window.window_s, window.depart_after_s, max_tags=window.max_tags)
            self._trackers[device.id] = tracker
        now = self._registry.monotonic()
        for read in reads:
            tracker.read(read.epc, read.rssi, read.antenna, now)
        if ack is not None:
            ack()  # reads live in the shelf's window, not the journal: a window lost in a crash is re-read
        device.seen()

    def _device(self, device_id: str, spec: RouteSpec) -> Device | None:
        """A device not registered by this driver: registered by another one, or (accept mode) a new one."""
        device = self._registry.get(device_id)
        if device is None:
            if self._unlisted >= MAX_UNLISTED_DEVICES:
                return None
            self._unlisted += 1
            device = self._registry.add(device_id, self.name, profile_limits(spec.profile), spec.profile)
        self._devices[device_id] = device
        return device

    async def _close_windows(self) -> None:
        """One ``rfid.inventory`` per shelf per window, committed when the window is due."""
        tick = min(WINDOW_TICK_MAX_S, min(w.window_s for w in self._rfid_windows.values()) / 4)
        while True:
            await asyncio.sleep(tick)
            now = self._registry.monotonic()
            for device_id, tracker in list(self._trackers.items()):
                if not tracker.due(now):
                    continue
                inventory = tracker.close_window(now)
                if inventory is not None:
                    body = orjson.dumps(inventory.model_dump(mode="json", exclude_none=True))
                    self._sink.submit(Draft("rfid.inventory", device_id, body, inventory, driver=self.name))


def _route_bucket(source: Hashable) -> str | None:
    """The route pattern a ``("route", bucket)`` quota source stands for (None for any other source)."""
    if isinstance(source, tuple) and len(source) == 2 and source[0] == "route" and isinstance(source[1], str):
        return source[1]
    return None


def _rejection_source(rejection: Rejection) -> Hashable:
    """A configured device answers for its own topics; unknown and invalid ids share their route's quota."""
    if rejection.bucket is None and rejection.device_id is not None:
        return ("device", rejection.device_id)
    return ("route", rejection.bucket)


def _rfid_windows(config: MqttDriverConfig) -> dict[str, RfidWindow]:
    """Profile -> inventory window, for this driver's RFID shelf routes."""
    out = {}
    for route in config.routes:
        if route.profile is not None:
            profile = get_profile(route.profile, MqttProfile)
            if profile.decoder == "rfid":
                out[route.profile] = profile.rfid or RfidWindow()
    return out
