"""Local actions for the rules' alerts (docs/RULES.md, "Actions"): an MQTT message to a store device (a buzzer, a
display), a write to a Modbus device's writable point (start a defrost) held back by an interlock.

Two consumers (:mod:`gateway.kernel.consumer`), one per action type, read the committed ``alert.raised`` and
``alert.cleared`` events after their own cursors, in seq order, and run the actions the alert's rule names for
that level. So an action runs only after its alert committed, and a broker that is down delays only the MQTT
actions: intake, the rules, the notifications and the Modbus actions go on. Each action's outcome is an event,
``action.done`` or ``action.failed``, committed under a dedup key of the alert, its level and the action's id; an
action whose key is already committed never runs again, so it runs at most once per episode and level, across
restarts.

The window: a crash after the action was carried out (the message taken by the broker, the register written)
but before its ``action.done`` committed runs it once more at the next start.

A Modbus write runs only while the alert is still open (a raised action found after its clear, catching up, is
recorded as failed with ``alert_ended``), and only when every condition of its interlock holds on the metric's
value in the device's newest ``sensor.sample`` that holds it (one per poll group for a controller), of this run of
the gateway and no older than the action's ``max_age_s``; otherwise it is
held back and recorded as failed with ``interlock``. A write the driver refuses (not a writable point, outside
the range) is failed with ``refused``, a device that does not answer with ``unreachable``; neither is retried.

An MQTT message is retried only while the broker cannot be reached or the connection drops; one the broker refuses
(MQTT 5 PUBACK reason code >= 0x80) is failed with ``refused``, a topic that is not valid with the alert's values
with ``invalid``; neither is retried, so the actions after it are not held up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import orjson

from gateway.kernel.clock import BOOT_ID
from gateway.kernel.config import BrokerConfig
from gateway.kernel.events import ActionDone, ActionFailed, AlertCleared, AlertRaised
from gateway.kernel.journal import Journal
from gateway.kernel.mqtt_client import MqttClient, MqttError, PublishInvalidError, PublishRefusedError
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_actions import PLACEHOLDER, ModbusWriteAction, MqttPublishAction
from gateway.kernel.supervise import Backoff
from rules.engine import ACTIVE, CLEARING, RuleEngine, split_alert_id

_LOGGER = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S: Final = 10.0
WRITE_TIMEOUT_S: Final = 30.0
"""A write that has not finished by then is failed (``unreachable``), as HQ's device.write is."""
SCAN_EVENTS: Final = 20_000
"""An interlock looks for the device's latest readings among this many newest events at most."""
SCAN_ROWS: Final = 200
"""The device's samples read at a time while looking for an interlock's metrics."""
MAX_TOPIC_BYTES: Final = 256

ActionType = Literal["mqtt_publish", "modbus_write"]
Writer = Callable[[str, str, Any], Awaitable[None]]
"""``async write(device_id, point, value)``: the drivers' writer of a device (``DriverContext.device_writers``).
It raises ValueError for a write it refuses, anything else for a device it cannot reach."""


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish and return once the broker took it (QoS 1: its PUBACK); raise if it did not."""
        ...


class BrokerPublisher:
    """A connection of its own to the store broker, made when first needed and again after it dropped."""

    def __init__(self, broker: BrokerConfig, client_id: str) -> None:
        self._broker = broker
        self._client_id = client_id
        self._client: MqttClient | None = None

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        client = self._client
        if client is None or not client.is_connected:
            await self.close()
            client = MqttClient(self._broker, self._client_id, clean_start=True)
            await client.connect()
            self._client = client
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await client.publish(topic, payload, qos=qos, retain=retain)
        except TimeoutError:
            await self.close()  # a broker that takes nothing: a new connection next time
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.disconnect()


@dataclass(frozen=True, slots=True)
class Alert:
    """What an action needs to know of the alert event it runs for."""

    alert_id: str
    level: Literal["raised", "cleared"]
    rule_id: str
    subject: str
    episode: int
    device_id: str | None
    severity: str
    message: str

    def values(self, store_id: str) -> dict[str, str]:
        return {
            "alert_id": self.alert_id,
            "rule_id": self.rule_id,
            "subject": self.subject,
            "episode": str(self.episode),
            "device_id": self.device_id or "",
            "severity": self.severity,
            "level": self.level,
            "message": self.message,
            "store_id": store_id,
        }


def alert_of(event: Event) -> Alert | None:
    """The alert an ``alert.raised`` or ``alert.cleared`` event is about, or None (not one of the rules')."""
    model = event.model
    severity: str = ""
    if isinstance(model, AlertRaised):
        alert_id, level, severity = model.details.get("alert_id"), "raised", model.severity
    elif isinstance(model, AlertCleared):
        alert_id, level = model.alert_id, "cleared"
    else:
        return None
    found = split_alert_id(alert_id) if isinstance(alert_id, str) else None
    if found is None or not isinstance(alert_id, str):
        return None
    rule_id, subject, episode = found
    return Alert(
        alert_id,
        "raised" if level == "raised" else "cleared",
        rule_id,
        subject,
        episode,
        event.device_id,
        severity,
        model.message,
    )


def _unfit(c: str) -> bool:
    """A character MQTT forbids in a topic or that brokers refuse (mosquitto drops the connection): controls
    (U+0000-U+001F, U+007F-U+009F), noncharacters (U+FDD0-U+FDEF, U+xxFFFE, U+xxFFFF) and lone surrogates."""
    code = ord(c)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or 0xFDD0 <= code <= 0xFDEF
        or code & 0xFFFE == 0xFFFE
        or 0xD800 <= code <= 0xDFFF
    )


def render_topic(template: str, values: Mapping[str, str]) -> str | None:
    """The topic with its placeholders filled in; None when it is not a topic one may publish to (a value
    brought a wildcard, a control character, a noncharacter or a lone surrogate, an empty level at an end, or it
    is longer than MAX_TOPIC_BYTES of UTF-8, well inside MQTT's 65,535)."""
    topic = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
    if (
        not topic
        or any(c in topic for c in "+#")
        or any(_unfit(c) for c in topic)
        or topic.startswith("/")
        or topic.endswith("/")
        or len(topic.encode()) > MAX_TOPIC_BYTES
    ):
        return None
    return topic


def render_payload(template: str, values: Mapping[str, str]) -> bytes:
    """The payload with its placeholders filled in, each value escaped as inside a JSON string (a JSON template
    stays JSON whatever a message holds)."""
    return PLACEHOLDER.sub(
        lambda m: orjson.dumps(values[m.group(1)]).decode()[1:-1] if m.group(1) in values else m.group(0),
        template,
    ).encode()


class ActionConsumer:
    """Runs the actions of one type for the committed alerts, in seq order, each at most once per episode and
    level."""

    kinds: frozenset[str] | None = frozenset({"alert.raised", "alert.cleared"})
    retry_base_s: float = 1.0
    """MQTT: the first retry waits up to this long; each next one up to twice as long, at most a minute."""
    problem: str | None = None
    """Why the message in hand is being retried (the store broker unreachable), for /health."""

    def __init__(
        self,
        action_type: ActionType,
        engine: RuleEngine,
        journal: Journal,
        *,
        publisher: Publisher | None = None,
        writers: Mapping[str, Writer] | None = None,
        store_id: str = "",
    ) -> None:
        self.type = action_type
        self.name = f"actions-{action_type}"
        self._engine = engine
        self._journal = journal
        self._publisher = publisher
        self._writers: Mapping[str, Writer] = writers if writers is not None else {}
        self._store_id = store_id

    async def handle(self, events: Sequence[Event]) -> None:
        for event in events:
            alert = alert_of(event)
            if alert is None:
                continue
            rule = self._engine.rules.get(alert.rule_id)  # the rule as it is now (a removed rule: nothing)
            if rule is None:
                continue
            for action in rule.actions:
                if action.type != self.type or alert.level not in action.on:
                    continue
                key = f"action:{alert.alert_id}:{alert.level}:{action.id}"
                if await self._journal.key_known(key):
                    continue  # done (or failed) before: a restart after its outcome committed
                if isinstance(action, MqttPublishAction):
                    outcome = await self._publish(action, alert)
                else:
                    outcome = await self._write(action, alert)
                await self._record(outcome, key)

    # --- MQTT ------------------------------------------------------------------------------------------------

    async def _publish(self, action: MqttPublishAction, alert: Alert) -> ActionDone:
        values = alert.values(self._store_id)
        topic = render_topic(action.topic, values)
        common: dict[str, Any] = {
            "source": "rule",
            "action": action.id,
            "type": action.type,
            "alert_id": alert.alert_id,
            "level": alert.level,
            "device_id": alert.device_id,
        }
        if topic is None:
            return ActionFailed(
                **common, attempts=0, reason="invalid", error="the topic with the alert's values is not valid"
            )
        template = (
            action.payload_cleared if alert.level == "cleared" and action.payload_cleared else action.payload
        )
        payload = render_payload(template, values)
        if self._publisher is None:
            return ActionFailed(
                **common, topic=topic, attempts=0, reason="unreachable", error="no store broker"
            )
        backoff = Backoff(base=self.retry_base_s, cap=60.0)
        attempts = 0
        self.problem = None
        while True:  # a broker that is down delays only these actions: retried for as long as it takes
            attempts += 1
            try:
                await self._publisher.publish(topic, payload, action.qos, action.retain)
            except PublishRefusedError as err:  # the broker's answer (an ACL's 0x87): the same every time
                _LOGGER.warning("action %s for %s: the broker refused it: %s", action.id, alert.alert_id, err)
                self.problem = None
                return ActionFailed(
                    **common, topic=topic, attempts=attempts, reason="refused", error=str(err)[:500]
                )
            except PublishInvalidError as err:
                self.problem = None
                return ActionFailed(
                    **common, topic=topic, attempts=attempts, reason="invalid", error=str(err)[:500]
                )
            except (MqttError, OSError, TimeoutError) as err:  # no connection, or it dropped: retried
                self.problem = type(err).__name__
                delay = backoff.next_delay()
                _LOGGER.warning(
                    "action %s for %s: publishing failed (%s), retrying in %.0f s",
                    action.id,
                    alert.alert_id,
                    type(err).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self.problem = None
            return ActionDone(**common, topic=topic, attempts=attempts)

    # --- Modbus ----------------------------------------------------------------------------------------------

    async def _write(self, action: ModbusWriteAction, alert: Alert) -> ActionDone:
        device = action.device or alert.device_id
        common: dict[str, Any] = {
            "source": "rule",
            "action": action.id,
            "type": action.type,
            "alert_id": alert.alert_id,
            "level": alert.level,
            "device_id": device,
            "point": action.point,
            "value": action.value,
        }
        writer = self._writers.get(device) if device is not None else None
        if device is None or writer is None:
            why = "the alert has no device" if device is None else f"no writable device {device!r}"
            return ActionFailed(**common, attempts=0, reason="invalid", error=why)
        if alert.level == "raised" and not await self._still_open(alert):
            return ActionFailed(
                **common, attempts=0, reason="alert_ended", error="the alert cleared before the write"
            )
        held = await self._interlock(action, device)
        if held is not None:
            _LOGGER.info("action %s for %s held back: %s", action.id, alert.alert_id, held)
            return ActionFailed(**common, attempts=0, reason="interlock", error=held[:500])
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer(device, action.point, action.value)
        except ValueError as err:  # the driver refused it: not a writable point, outside the range
            return ActionFailed(**common, reason="refused", error=str(err)[:500])
        except TimeoutError:
            why = f"the write did not finish within {WRITE_TIMEOUT_S:g} s"
            return ActionFailed(**common, reason="unreachable", error=why)
        except (
            Exception
        ) as err:  # the device cannot be reached (DriverError), or a bug: recorded, never fatal
            _LOGGER.warning("action %s for %s: the write failed: %s", action.id, alert.alert_id, err)
            return ActionFailed(**common, reason="unreachable", error=str(err)[:500])
        return ActionDone(**common)

    async def _still_open(self, alert: Alert) -> bool:
        rows = await self._journal.query(
            "SELECT state, episode FROM rule_state WHERE rule_id = ? AND subject = ?",
            (alert.rule_id, alert.subject),
        )
        return bool(rows) and rows[0][0] in (ACTIVE, CLEARING) and int(rows[0][1]) == alert.episode

    async def _interlock(self, action: ModbusWriteAction, device: str) -> str | None:
        """None when every condition holds on the latest readings; else why the write is held back."""
        wanted: dict[str, set[str]] = {}
        for condition in action.interlock:
            wanted.setdefault(condition.device or device, set()).add(condition.metric)
        readings = {
            source: await self._latest(source, metrics, action.max_age_s)
            for source, metrics in wanted.items()
        }
        for condition in action.interlock:
            source = condition.device or device
            values = readings[source]
            if values is None:
                return f"no reading of {source} in the last {action.max_age_s:g} s"
            value = values.get(condition.metric)
            op, bound = condition.comparison
            if value is None:
                return f"{source} did not report {condition.metric} (must be {op} {bound:g})"
            if not condition.holds(value):
                return f"{source} {condition.metric} is {value:g} (must be {op} {bound:g})"
        return None

    async def _latest(self, device: str, metrics: set[str], max_age_s: float) -> dict[str, float] | None:
        """Each metric's value in the device's newest ``sensor.sample`` that holds it, among the samples committed
        by this run of the gateway no older than ``max_age_s`` (on the monotonic clock: a wall-clock step changes
        nothing); None when there is no such sample at all. A controller's driver sends one sample per poll group
        (the door in one, the temperatures in another), so each metric is looked for on its own."""
        found: dict[str, float] = {}
        fresh_any = False
        floor, upper = self._journal.last_seq - SCAN_EVENTS, self._journal.last_seq + 1
        while len(found) < len(metrics):
            rows = await self._journal.query(
                "SELECT seq, body FROM events WHERE kind = 'sensor.sample' AND device_id = ? AND seq > ?"
                " AND seq < ? ORDER BY seq DESC LIMIT ?",
                (device, floor, upper, SCAN_ROWS),
            )
            for seq, body in rows:
                upper = int(seq)
                values = _fresh_values(body, max_age_s)
                if values is None:  # too old (every sample before it is older still), or damaged
                    return found if fresh_any else None
                fresh_any = True
                for metric in metrics - found.keys():
                    if metric in values:
                        found[metric] = values[metric]
                if len(found) == len(metrics):
                    break
            if len(rows) < SCAN_ROWS:
                break
        return found if fresh_any else None

    # --- the record ------------------------------------------------------------------------------------------

    async def _record(self, outcome: ActionDone, key: str) -> None:
        await record_action(self._journal, outcome, key)


def _fresh_values(body: bytes | str, max_age_s: float) -> dict[str, float] | None:
    """The numeric values of a ``sensor.sample`` envelope committed by this run of the gateway at most
    ``max_age_s`` ago; None when it is older, of another run, or not readable."""
    try:
        envelope = orjson.loads(body)
        values = envelope["data"]["values"]
        fresh = (
            envelope["boot_id"] == BOOT_ID
            and time.monotonic_ns() - int(envelope["mono_ns"]) <= max_age_s * 1e9
        )
    except (ValueError, KeyError, TypeError):
        return None
    if not fresh or not isinstance(values, dict):
        return None
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


async def record_action(journal: Journal, outcome: ActionDone, key: str) -> int | None:
    """Commit ``action.done`` (or ``action.failed``) under ``key``; its seq once committed, None when an event was
    committed under that key before."""
    kind = "action.failed" if isinstance(outcome, ActionFailed) else "action.done"
    return await journal.record(kind, outcome, key)
