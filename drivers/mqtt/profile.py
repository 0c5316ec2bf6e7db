"""MQTT device profiles: what a kind of MQTT device publishes and how its payload maps to events.

A profile (``firmware_configs/profiles/<name>.yaml``, ``family: mqtt``) names a ``decoder``:

- ``pos``: a till's sale or return (the existing ``pos.sale`` / ``pos.return`` decoder; the route says which);
- ``checkin``: a check-in kiosk (``staff.checkin``; never an image, see :mod:`drivers.mqtt.checkin`);
- ``rfid``: an RFID shelf's tag reads, summarised per window as ``rfid.inventory``;
- ``sample``: a generic sensor, its payload mapped to ``sensor.sample`` by ``mapping`` (JSON, CSV or raw).

This module holds only pydantic models (no runtime imports): the gateway config imports it.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from pydantic import Field, field_validator, model_validator

from drivers.limits import DeviceLimits
from drivers.profiles import ProfileBase, get_profile
from gateway.kernel.model import StrictModel

METRIC: Final = r"^[a-z][a-z0-9_]{0,47}$"
PATH_STEP: Final = re.compile(r"([^.\[\]]+)|\[(\d{1,6})\]")
"""One step of a field path: a key (anything but '.', '[' and ']') or a list index ``[n]``."""

Path = tuple[str | int, ...]


def parse_path(path: str) -> Path:
    """``data.readings[0].value`` -> ('data', 'readings', 0, 'value'); ValueError when it is not a path."""
    steps: list[str | int] = []
    pos = 0
    while pos < len(path):
        if steps and path[pos] == ".":
            pos += 1
        match = PATH_STEP.match(path, pos)
        if match is None or (match.group(1) is not None and steps and path[pos - 1] != "."):
            raise ValueError(f"not a field path at character {pos + 1}: {path!r} (write data.temp or a[0].v)")
        steps.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not steps or path.endswith("."):
        raise ValueError(f"not a field path: {path!r}")
    return tuple(steps)


class _Scaled(StrictModel):
    metric: Annotated[str, Field(pattern=METRIC)] = Field(description="Metric name in sensor.sample values.")
    unit: Annotated[str, Field(max_length=16)] | None = Field(default=None, description="Unit, e.g. '°C'.")
    scale: float = Field(default=1.0, description="value * scale + offset (booleans stay 0/1).")
    offset: float = Field(default=0.0, description="Added after scaling.")
    optional: bool = Field(default=False, description="A message without this field is still valid.")


class JsonField(_Scaled):
    path: str = Field(max_length=200, description="Field path: 'temp', 'data.temp', 'readings[0].value'.")

    @field_validator("path")
    @classmethod
    def _is_path(cls, value: str) -> str:
        parse_path(value)
        return value


class JsonMapping(StrictModel):
    """A JSON object; each field is a number, a numeric string or a boolean (true = 1)."""

    format: Literal["json"] = Field(description="The payload is one JSON object.")
    fields: list[JsonField] = Field(min_length=1, max_length=64, description="Where each metric is.")
    time_path: str | None = Field(
        default=None, max_length=200, description="Field with the device's ISO 8601 time (with offset)."
    )

    @field_validator("time_path")
    @classmethod
    def _is_time_path(cls, value: str | None) -> str | None:
        if value is not None:
            parse_path(value)
        return value

    @model_validator(mode="after")
    def _unique_metrics(self) -> JsonMapping:
        _check_unique([f.metric for f in self.fields])
        return self


class CsvColumn(_Scaled):
    column: Annotated[int, Field(ge=0, le=255)] | Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="0-based column index, or the column's name in the header line."
    )


class CsvMapping(StrictModel):
    """One or more CSV lines per message; each data line becomes one sample."""

    format: Literal["csv"] = Field(description="The payload is CSV text (UTF-8).")
    delimiter: Annotated[str, Field(min_length=1, max_length=1, pattern=r"^[^\r\n\"0-9.+-]$")] = Field(
        default=",", description="One character: ',', ';', '\\t', '|'."
    )
    header: bool = Field(default=False, description="Each message starts with a header line naming columns.")
    columns: list[CsvColumn] = Field(min_length=1, max_length=64, description="Which column is which metric.")
    max_lines: int = Field(default=100, ge=1, le=10_000, description="Data lines per message, at most.")

    @model_validator(mode="after")
    def _names_need_a_header(self) -> CsvMapping:
        _check_unique([c.metric for c in self.columns])
        if not self.header and any(isinstance(c.column, str) for c in self.columns):
            raise ValueError("columns named by header need 'header: true'; otherwise give 0-based indexes")
        return self


RawType = Literal["int8", "uint8", "int16", "uint16", "int32", "uint32", "float32"]
RAW_SIZES: Final[dict[str, int]] = {
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
}


class RawField(_Scaled):
    byte: int = Field(ge=0, le=4095, description="Byte offset of the field in the payload.")
    type: RawType = Field(description="int8/uint8/int16/uint16/int32/uint32/float32.")
    endian: Literal["big", "little"] = Field(default="big", description="Byte order.")
    invalid: int | None = Field(
        default=None, description="Raw integer the device sends for 'not available' (e.g. 0x8000 = -32768)."
    )


class RawMapping(StrictModel):
    """A fixed binary frame (struct-like)."""

    format: Literal["raw"] = Field(description="The payload is binary.")
    length: int | None = Field(default=None, ge=1, le=4096, description="Exact frame length, if fixed.")
    fields: list[RawField] = Field(min_length=1, max_length=64, description="Fields at byte offsets.")

    @model_validator(mode="after")
    def _fields_fit(self) -> RawMapping:
        _check_unique([f.metric for f in self.fields])
        if self.length is not None:
            for f in self.fields:
                if f.byte + RAW_SIZES[f.type] > self.length:
                    raise ValueError(f"field {f.metric!r} ends past the frame length {self.length}")
        return self

    @property
    def min_length(self) -> int:
        return self.length or max(f.byte + RAW_SIZES[f.type] for f in self.fields)


PayloadMapping = Annotated[JsonMapping | CsvMapping | RawMapping, Field(discriminator="format")]


def _check_unique(metrics: list[str]) -> None:
    dupes = sorted({m for m in metrics if metrics.count(m) > 1})
    if dupes:
        raise ValueError(f"metric(s) mapped twice: {', '.join(dupes)}")


class RfidWindow(StrictModel):
    window_s: float = Field(
        default=5.0, gt=0, le=3600, description="One rfid.inventory per shelf per window."
    )
    depart_after_s: float = Field(
        default=30.0, gt=0, le=86_400, description="A tag unseen this long is reported as departed."
    )
    max_tags: int = Field(default=5000, ge=1, le=5000, description="Tags tracked per shelf.")


Decoder = Literal["pos", "checkin", "rfid", "sample"]


class MqttProfile(ProfileBase):
    """An MQTT device profile (see the module docstring for the decoders)."""

    family: Literal["mqtt"] = "mqtt"
    decoder: Decoder = Field(description="Which decoder reads this device's messages.")
    topics: dict[str, str] = Field(
        default_factory=dict, description="Suggested topic templates (documentation; routes choose topics)."
    )
    message: dict[str, str] = Field(
        default_factory=dict, description="The message's fields and what they mean (documentation)."
    )
    mapping: PayloadMapping | None = Field(default=None, description="decoder 'sample': the payload mapping.")
    rfid: RfidWindow | None = Field(default=None, description="decoder 'rfid': the inventory window.")
    limits: DeviceLimits = Field(
        default_factory=DeviceLimits, description="Default limits of devices of this profile."
    )

    @model_validator(mode="after")
    def _decoder_settings(self) -> MqttProfile:
        if (self.mapping is not None) != (self.decoder == "sample"):
            raise ValueError("'mapping' goes with decoder 'sample', and only with it")
        if self.rfid is not None and self.decoder != "rfid":
            raise ValueError("'rfid' goes with decoder 'rfid' only")
        return self


SENSOR_READING_PROFILE: Final = "sensor"
"""The legacy device profile of ``sensor.reading`` routes (simulators/sensors.py); it has no file."""
PROFILE_ALIASES: Final[dict[str, str]] = {"pos_terminal": "pos-terminal"}
"""Older config names of profiles."""


def resolve_profile(name: str) -> str:
    return PROFILE_ALIASES.get(name, name)


SENSOR_READING_LIMITS: Final = DeviceLimits(rate_limit_per_s=2000, rate_burst=200_000)
"""Limits of legacy ``sensor`` devices: as generous as a till's (they had none before device limits existed,
and the outbox tests fill a journal with them at full speed)."""


def profile_limits(name: str) -> DeviceLimits:
    """The default limits of devices of a profile (a resolved name)."""
    if name == SENSOR_READING_PROFILE:
        return SENSOR_READING_LIMITS
    return get_profile(name, MqttProfile).limits
