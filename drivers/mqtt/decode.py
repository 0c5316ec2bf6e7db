"""Pure decoding of store-broker MQTT messages into journal drafts (no I/O: tests call it with bytes).

``decode_message`` returns a :class:`Decoded` or a :class:`Rejection` with a reason code (the label of the
``storegw_messages_quarantined`` metric) and a human-readable detail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson
from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter, ValidationError

from drivers.errors import DecodeError
from drivers.mqtt.checkin import decode_checkin
from drivers.mqtt.config import MqttDriverConfig, TopicRoute
from drivers.mqtt.mapping import Mapper, compile_mapping
from drivers.mqtt.profile import SENSOR_READING_PROFILE, MqttProfile
from drivers.mqtt.rfid_reads import TagRead, decode_reads
from drivers.profiles import get_profile
from gateway.kernel.events import PosReturn, PosSale, SensorReading, SensorSample, StaffCheckin
from gateway.kernel.journal import Draft
from gateway.kernel.model import ID_PATTERN

_DEVICE_ID: Final = re.compile(ID_PATTERN)
ROUTE_CACHE_SIZE: Final = 4096
"""Topics remembered by the router: a store has a few per device."""


class PosSaleMessage(PosSale):
    """A till's sale message: the ``pos.sale`` payload plus the till's own clock reading."""

    occurred_at: AwareDatetime | None = Field(
        default=None, strict=True, description="Till time, ISO 8601 with offset (a number is refused)."
    )


class PosReturnMessage(PosReturn):
    occurred_at: AwareDatetime | None = Field(
        default=None, strict=True, description="Till time, ISO 8601 with offset (a number is refused)."
    )


class SensorReadingMessage(SensorReading):
    """A sensor's reading (telemetry): the ``sensor.reading`` payload plus the sensor's clock reading."""

    occurred_at: AwareDatetime | None = Field(
        default=None, strict=True, description="Sensor time, ISO 8601 with offset (a number is refused)."
    )


Message = PosSaleMessage | PosReturnMessage | SensorReadingMessage

_ADAPTERS: Final[dict[str, TypeAdapter[Any]]] = {
    "pos.sale": TypeAdapter(PosSaleMessage),
    "pos.return": TypeAdapter(PosReturnMessage),
    "sensor.reading": TypeAdapter(SensorReadingMessage),
}


@dataclass(frozen=True, slots=True)
class Decoded:
    kind: str
    device_id: str
    data: PosSale | SensorReading | SensorSample | StaffCheckin
    """The validated message (a payload subclass); ``data_json`` is its payload without occurred_at."""
    data_json: bytes
    occurred_at: str | None
    dedup_key: str | None
    """Sales and returns: their identity. Telemetry has none (a redelivered reading may repeat: harmless)."""

    def to_draft(self, ack: Callable[[], None] | None, driver: str) -> Draft:
        """The journal item for this message; ``ack`` runs after its commit."""
        return Draft(
            self.kind,
            self.device_id,
            self.data_json,
            self.data,
            self.occurred_at,
            self.dedup_key,
            ack,
            driver,
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str
    device_id: str | None = None
    redact: bool = field(default=False, compare=False)
    """The topic is on a redacted route (a kiosk's): quarantine without the payload, and the detail quotes
    nothing from the message (nor an invalid device id)."""
    bucket: str | None = field(default=None, compare=False)
    """The route pattern, for messages no registered device answers for (unknown or invalid ids): their
    quarantine quota is shared per route, since an id is whatever the sender puts in the topic."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What a matched route means: the event kind, its decoder, the device profile, and (sensors) the mapper."""

    kind: str
    decoder: str
    """'pos', 'reading' (legacy sensor.reading), 'checkin', 'rfid' or 'sample'."""
    profile: str
    mapper: Mapper | None = None
    redact: bool = False
    """Quarantine this route's messages without their payload (kiosks: personal and maybe biometric data)."""


def route_spec(route: TopicRoute) -> RouteSpec:
    if route.profile is None:
        kind = route.kind or "pos.sale"
        return RouteSpec(kind, "reading" if kind == "sensor.reading" else "pos", route.device_profile)
    profile = get_profile(route.profile, MqttProfile)
    if profile.decoder == "pos":
        return RouteSpec(route.kind or "pos.sale", "pos", route.profile)
    if profile.decoder == "checkin":
        return RouteSpec("staff.checkin", "checkin", route.profile, redact=True)
    if profile.decoder == "rfid":
        return RouteSpec("rfid.inventory", "rfid", route.profile)
    mapping = route.mapping or profile.mapping
    assert mapping is not None  # the profile model requires a mapping for decoder 'sample'
    return RouteSpec("sensor.sample", "sample", route.profile, compile_mapping(mapping, route.profile))


class TopicRouter:
    """Maps a topic to (route, device id) using the driver's templates; built once per driver.

    ``known_devices`` is the configured device ids, or device id -> profile: then a device publishing on a
    route of another profile is refused (``wrong_profile``)."""

    def __init__(self, config: MqttDriverConfig, known_devices: frozenset[str] | Mapping[str, str]) -> None:
        self._routes = [(regex, route_spec(route), route.pattern) for regex, route in config.topic_regexes()]
        # A subscription's '+' also matches an empty level, which no route regex does: such a topic on a redacted
        # route is still that route's (an image on 'store/kiosk//checkin' stays out of the quarantine).
        self._redacted_shapes = [
            re.compile(regex.pattern.replace("([^/]+)", "([^/]*)"))
            for regex, spec, _ in self._routes
            if spec.redact
        ]
        self._known = known_devices
        self._profiles = known_devices if isinstance(known_devices, Mapping) else None
        self._accept_unknown = config.unknown_devices == "accept"
        self.max_payload = config.max_payload_bytes
        self._cache: dict[str, tuple[RouteSpec, str] | Rejection] = {}

    def route(self, topic: str) -> tuple[str, str] | Rejection:
        """(event kind, device id) of a topic."""
        matched = self.match(topic)
        return matched if isinstance(matched, Rejection) else (matched[0].kind, matched[1])

    def match(self, topic: str) -> tuple[RouteSpec, str] | Rejection:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        routed = self._match(topic)
        if len(self._cache) >= ROUTE_CACHE_SIZE:
            self._cache.clear()  # bounded: a flood of random topics cannot grow it
        self._cache[topic] = routed
        return routed

    def _match(self, topic: str) -> tuple[RouteSpec, str] | Rejection:
        """Redaction follows the route matched, before any device lookup."""
        for regex, spec, pattern in self._routes:
            match = regex.fullmatch(topic)
            if match is None:
                continue
            device_id = match.group(1)
            redact = spec.redact
            if not _DEVICE_ID.fullmatch(device_id):
                detail = (
                    f"a device id of {len(device_id)} characters is not a valid id (not kept: redacted route)"
                    if redact
                    else f"device id {device_id[:80]!r} is not a valid id"
                )
                return Rejection("bad_device_id", detail, None, redact, pattern)
            if device_id not in self._known:
                if not self._accept_unknown:
                    return Rejection(
                        "unknown_device",
                        f"device {device_id!r} is not configured",
                        device_id,
                        redact,
                        pattern,
                    )
            elif self._profiles is not None and self._profiles[device_id] != spec.profile:
                own = self._profiles[device_id]
                return Rejection(
                    "wrong_profile",
                    f"device {device_id!r} is a {own!r}, this topic is for {spec.profile!r}",
                    device_id,
                    redact or _redacts(own),
                )
            return spec, device_id
        if any(shape.fullmatch(topic) for shape in self._redacted_shapes):
            return Rejection(
                "unknown_topic", "no route matches this topic (not kept: redacted route)", None, True, ""
            )
        return Rejection("unknown_topic", f"no route matches topic {topic[:200]!r}", bucket="")


def _redacts(profile: str) -> bool:
    """Whether a device of this profile sends what must be quarantined without its payload (a kiosk)."""
    if profile == SENSOR_READING_PROFILE:
        return False
    try:
        return get_profile(profile, MqttProfile).decoder == "checkin"
    except Exception:  # not an MQTT profile: nothing says it is a kiosk's
        return False


def decode_message(router: TopicRouter, topic: str, payload: bytes) -> Decoded | Rejection:
    """Turn one MQTT message of a till (or legacy sensor.reading) route into an event draft, or say why it cannot
    be one. Kiosk, RFID and mapped sensor routes decode with :func:`decode_routed`."""
    routed = router.match(topic)
    if isinstance(routed, Rejection):
        return routed
    spec, device_id = routed
    if len(payload) > router.max_payload:
        return Rejection("too_large", f"{len(payload)} bytes > limit {router.max_payload}", device_id)
    if spec.decoder not in ("pos", "reading"):
        return Rejection("internal_error", f"a {spec.decoder!r} route decodes with decode_routed", device_id)
    return decode_pos(spec.kind, device_id, payload)


def decode_pos(kind: str, device_id: str, payload: bytes) -> Decoded | Rejection:
    """A till's sale or return (or a legacy sensor.reading): validated straight from the JSON bytes."""
    try:
        message = _ADAPTERS[kind].validate_json(payload)
    except ValidationError as err:
        return Rejection(_reason(err), _summarise(err), device_id)
    except (ValueError, TypeError, ArithmeticError) as err:
        # pydantic can leak these for odd inputs (pydantic#12284); an integer beyond 64 bits inside a list where
        # a Decimal is expected raises OverflowError (found by hypothesis).
        return Rejection("invalid", _printable(str(err)), device_id)
    occurred = message.occurred_at
    return Decoded(
        kind=kind,
        device_id=device_id,
        data=message,
        data_json=message.model_dump_json(exclude={"occurred_at"}).encode(),
        occurred_at=None if occurred is None else _iso(occurred),
        dedup_key=None
        if isinstance(message, SensorReading)
        else dedup_key(device_id, kind, message.register_id, message.receipt_no),
    )


def decode_routed(spec: RouteSpec, device_id: str, payload: bytes) -> list[Decoded] | Rejection:
    """A kiosk or mapped sensor message: its events (a CSV message may hold several lines), or why not."""
    try:
        if spec.decoder == "checkin":
            checkin = decode_checkin(payload)
            data = checkin.data
            key = (
                None
                if checkin.occurred_at is None
                else orjson.dumps((device_id, spec.kind, data.employee_id, checkin.occurred_at)).decode()
            )
            return [Decoded(spec.kind, device_id, data, _json(data), checkin.occurred_at, key)]
        if spec.mapper is not None:
            return [
                Decoded(spec.kind, device_id, m.sample, _json(m.sample), m.occurred_at, None)
                for m in spec.mapper.map(payload)
            ]
    except DecodeError as err:
        return Rejection(err.reason, _printable(err.detail), device_id)
    except ValidationError as err:
        return Rejection("invalid", _summarise(err), device_id)
    return Rejection("internal_error", f"route decoder {spec.decoder!r} has no events", device_id)


def decode_tag_reads(device_id: str, payload: bytes) -> list[TagRead] | Rejection:
    """An RFID shelf's message: its tag reads, or why not."""
    try:
        return decode_reads(payload)
    except DecodeError as err:
        return Rejection(err.reason, _printable(err.detail), device_id)


def _json(data: BaseModel) -> bytes:
    return orjson.dumps(data.model_dump(mode="json", exclude_none=True))


def dedup_key(device_id: str, kind: str, register_id: str, receipt_no: str) -> str:
    """The identity of a sale or return: a redelivered message has the same key. JSON keeps it unambiguous
    whatever characters the till puts in register or receipt numbers."""
    return orjson.dumps((device_id, kind, register_id, receipt_no)).decode()


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds")


def _reason(err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    return "not_json" if first["type"] in ("json_invalid", "json_type") else "invalid"


def _summarise(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:5]:
        # An unknown key is part of loc: the sender chose it, so bound it and escape it (no log injection).
        loc = ".".join(str(p) if isinstance(p, int) else _printable(p, 40) for p in e["loc"]) or "(message)"
        parts.append(f"{loc}: {_printable(e['msg'], 200)}")
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _printable(text: str, limit: int = 300) -> str:
    """Text safe for a log line: control characters escaped, length bounded."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
