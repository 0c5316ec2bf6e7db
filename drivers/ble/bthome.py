"""BTHome v2 (https://bthome.io/format/, https://bthome.io/encryption/): service data under UUID 0xFCD2.

The service data is a device-information byte (bit 0 encrypted, bit 2 trigger-based, bits 5-7 version 2) and
objects: an object id then a value whose length the id fixes. An unknown id ends decoding (its length is
unknown, so nothing after it can be read): the objects before it are kept and the rest is named in ``faults``
(bthome-ble's parser also stops at an unknown id and keeps what it read); an unknown id first is a DecodeError.
The spec asks senders to order objects by id; receivers (bthome-ble) accept any order, and so do we.

Encrypted frames are AES-128-CCM with a 4-byte MIC: the objects, then a 4-byte counter, then the MIC; nonce =
MAC (6) + UUID ``D2 FC`` + info byte + counter. The ``counter`` of an encrypted frame's sample is that 32-bit
encryption counter (authenticated, so the driver can refuse replays); of a plain frame, the packet id (0x00).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble._common import need_key, sample
from drivers.errors import DecodeError
from gateway.kernel.events import SensorSample

SOURCE: Final = "bthome.v2"
UUID16: Final = b"\xd2\xfc"
"""0xFCD2 as sent on air (little-endian), as it goes into the nonce."""
ENCRYPTED: Final = 0x01
TRIGGER_BASED: Final = 0x04
VERSION: Final = 2
MIC_BYTES: Final = 4
COUNTER_BYTES: Final = 4


@dataclass(frozen=True, slots=True)
class Obj:
    """One object type: metric name, value length, signedness, factor, unit."""

    metric: str
    length: int
    signed: bool = False
    factor: float = 1.0
    unit: str = ""


def _binary(name: str) -> Obj:
    return Obj(name, 1)


SKIP: Final = ""
"""Metric name of objects that are read (for their length) but not reported: device type, firmware version."""
VARIABLE: Final = -1
"""Length of objects whose first byte is their length (text, raw)."""

OBJECTS: Final[dict[int, Obj]] = {
    0x00: Obj("packet_id", 1),
    0x01: Obj("battery_pct", 1, unit="%"),
    0x02: Obj("temperature", 2, True, 0.01, "°C"),
    0x03: Obj("humidity", 2, False, 0.01, "%"),
    0x04: Obj("pressure", 3, False, 0.01, "hPa"),
    0x05: Obj("illuminance", 3, False, 0.01, "lx"),
    0x06: Obj("mass", 2, False, 0.01, "kg"),
    0x07: Obj("mass_lb", 2, False, 0.01, "lb"),
    0x08: Obj("dew_point", 2, True, 0.01, "°C"),
    0x09: Obj("count", 1),
    0x0A: Obj("energy", 3, False, 0.001, "kWh"),
    0x0B: Obj("power", 3, False, 0.01, "W"),
    0x0C: Obj("voltage", 2, False, 0.001, "V"),
    0x0D: Obj("pm2_5", 2, unit="µg/m³"),
    0x0E: Obj("pm10", 2, unit="µg/m³"),
    0x0F: _binary("generic_boolean"),
    0x10: _binary("power_on"),
    0x11: _binary("opening"),
    0x12: Obj("co2", 2, unit="ppm"),
    0x13: Obj("tvoc", 2, unit="µg/m³"),
    0x14: Obj("moisture", 2, False, 0.01, "%"),
    0x15: _binary("battery_low"),
    0x16: _binary("battery_charging"),
    0x17: _binary("carbon_monoxide"),
    0x18: _binary("cold"),
    0x19: _binary("connectivity"),
    0x1A: _binary("door_open"),
    0x1B: _binary("garage_door_open"),
    0x1C: _binary("gas"),
    0x1D: _binary("heat"),
    0x1E: _binary("light"),
    0x1F: _binary("unlocked"),
    0x20: _binary("moisture_detected"),
    0x21: _binary("motion"),
    0x22: _binary("moving"),
    0x23: _binary("occupancy"),
    0x24: _binary("plugged_in"),
    0x25: _binary("presence"),
    0x26: _binary("problem"),
    0x27: _binary("running"),
    0x28: _binary("safe"),
    0x29: _binary("smoke"),
    0x2A: _binary("sound"),
    0x2B: _binary("tamper"),
    0x2C: _binary("vibration"),
    0x2D: _binary("window_open"),
    0x2E: Obj("humidity", 1, unit="%"),
    0x2F: Obj("moisture", 1, unit="%"),
    0x3A: Obj("button", 1),
    0x3C: Obj("dimmer", 2),
    0x3D: Obj("count", 2),
    0x3E: Obj("count", 4),
    0x3F: Obj("rotation", 2, True, 0.1, "°"),
    0x40: Obj("distance", 2, unit="mm"),
    0x41: Obj("distance_m", 2, False, 0.1, "m"),
    0x42: Obj("duration", 3, False, 0.001, "s"),
    0x43: Obj("current", 2, False, 0.001, "A"),
    0x44: Obj("speed", 2, False, 0.01, "m/s"),
    0x45: Obj("temperature", 2, True, 0.1, "°C"),
    0x46: Obj("uv_index", 1, False, 0.1),
    0x47: Obj("volume", 2, False, 0.1, "L"),
    0x48: Obj("volume_ml", 2, unit="mL"),
    0x49: Obj("volume_flow_rate", 2, False, 0.001, "m³/h"),
    0x4A: Obj("voltage", 2, False, 0.1, "V"),
    0x4B: Obj("gas_volume", 3, False, 0.001, "m³"),
    0x4C: Obj("gas_volume", 4, False, 0.001, "m³"),
    0x4D: Obj("energy", 4, False, 0.001, "kWh"),
    0x4E: Obj("volume", 4, False, 0.001, "L"),
    0x4F: Obj("water", 4, False, 0.001, "L"),
    0x50: Obj("timestamp", 4, unit="s"),
    0x51: Obj("acceleration", 2, False, 0.001, "m/s²"),
    0x52: Obj("gyroscope", 2, False, 0.001, "°/s"),
    0x53: Obj(SKIP, VARIABLE),
    0x54: Obj(SKIP, VARIABLE),
    0x55: Obj("volume_storage", 4, False, 0.001, "L"),
    0x56: Obj("conductivity", 2, unit="µS/cm"),
    0x57: Obj("temperature", 1, True, 1.0, "°C"),
    0x58: Obj("temperature", 1, True, 0.35, "°C"),
    0x59: Obj("count", 1, True),
    0x5A: Obj("count", 2, True),
    0x5B: Obj("count", 4, True),
    0x5C: Obj("power", 4, True, 0.01, "W"),
    0x5D: Obj("current", 2, True, 0.001, "A"),
    0x5E: Obj("direction", 2, False, 0.01, "°"),
    0x5F: Obj("precipitation", 2, False, 0.1, "mm"),
    0x60: Obj("channel", 1),
    0x61: Obj("rotational_speed", 2, unit="rpm"),
    0xF0: Obj(SKIP, 2),
    0xF1: Obj(SKIP, 4),
    0xF2: Obj(SKIP, 3),
}
"""Object id -> how to read it (the table of https://bthome.io/format/)."""


def _places(factor: float) -> int:
    text = f"{factor:.10f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


_PLACES: Final = {oid: _places(o.factor) for oid, o in OBJECTS.items()}


def decode_bthome(data: bytes, mac: bytes, bindkey: bytes | None = None) -> SensorSample:
    """Decode BTHome v2 service data (the bytes after the UUID) from the device with address ``mac``.

    A device with a ``bindkey`` must send encrypted frames: a plain one from it is refused (``not_encrypted``),
    so nobody nearby can inject readings by advertising its MAC unencrypted."""
    if not data:
        raise DecodeError("truncated", "BTHome service data is empty")
    info = data[0]
    version = info >> 5
    if version != VERSION:
        raise DecodeError("unsupported_version", f"BTHome version {version} (info byte {info:#04x}); want 2")
    counter: int | None = None
    if info & ENCRYPTED:
        key = need_key(bindkey, "BTHome")
        if len(data) < 1 + COUNTER_BYTES + MIC_BYTES + 1:
            raise DecodeError("truncated", f"encrypted BTHome frame of {len(data)} bytes is too short")
        ciphertext = data[1 : -COUNTER_BYTES - MIC_BYTES]
        count = data[-COUNTER_BYTES - MIC_BYTES : -MIC_BYTES]
        nonce = mac + UUID16 + data[:1] + count
        try:
            body = AESCCM(key, tag_length=MIC_BYTES).decrypt(nonce, ciphertext + data[-MIC_BYTES:], None)
        except InvalidTag:
            raise DecodeError(
                "decrypt_failed", "BTHome frame does not verify: wrong bindkey or damaged"
            ) from None
        counter = int.from_bytes(count, "little")
    elif bindkey is not None:
        raise DecodeError("not_encrypted", "the device has a bindkey but sent an unencrypted BTHome frame")
    else:
        body = data[1:]
    values, units, faults = _objects(body)
    packet_id = values.pop("packet_id", None)
    if packet_id is not None and counter is None:
        counter = int(packet_id)
    battery = values.get("battery_pct")
    return sample(SOURCE, values, units, faults=faults, counter=counter, battery_pct=battery)


def _objects(body: bytes) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    values: dict[str, float] = {}
    units: dict[str, str] = {}
    pos = 0
    end = len(body)
    while pos < end:
        oid = body[pos]
        obj = OBJECTS.get(oid)
        if obj is None:
            detail = f"BTHome object id {oid:#04x} at byte {pos}: unknown, so its length is too"
            if not values:
                raise DecodeError("unknown_object", detail)
            return values, units, {f"object_{oid:02x}": f"{detail}; {end - pos} bytes not read"}
        pos += 1
        length = obj.length
        if length == VARIABLE:
            if pos >= end:
                raise DecodeError("truncated", f"BTHome object {oid:#04x} has no length byte")
            length = body[pos]
            pos += 1
        if pos + length > end:
            raise DecodeError("truncated", f"BTHome object {oid:#04x} needs {length} bytes, {end - pos} left")
        raw = body[pos : pos + length]
        pos += length
        if obj.metric == SKIP:
            continue
        if oid == 0x3C:  # dimmer: event (0 none, 1 left, 2 right) and steps
            values["dimmer_event"] = raw[0]
            values["dimmer_steps"] = raw[1]
            continue
        number = int.from_bytes(raw, "little", signed=obj.signed)
        value = round(number * obj.factor, _PLACES[oid]) if obj.factor != 1.0 else float(number)
        name = obj.metric
        n = 2
        while name in values:  # a second object of the same kind (two probes): temperature_2
            name = f"{obj.metric}_{n}"
            n += 1
        values[name] = value
        if obj.unit:
            units[name] = obj.unit
    return values, units, {}
