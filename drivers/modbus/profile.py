"""The Modbus profile model: a controller's register map, polling groups and writable points.

Addresses are PDU addresses (0-based, as on the wire): a manual's "40257" or "register 257" (1-based) is
256 here. Holding registers are function 3, input registers 4, coils 1, discrete inputs 2.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Final, Literal

from pydantic import Field, model_validator

from drivers.profiles import ProfileBase
from gateway.kernel.model import StrictModel

MetricName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
Function = Literal[1, 2, 3, 4]
ValueType = Literal["int16", "uint16", "int32", "uint32", "float32", "bool"]

WIDTH: Final[dict[str, int]] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "bool": 1}
"""Registers (or bits, for coils and discrete inputs) a value of each type takes."""
MAX_METRICS_PER_GROUP: Final = 64
"""A ``sensor.sample`` carries at most this many values (gateway.kernel.events.SensorSample)."""
MAX_REASON: Final = 180
"""A sentinel's reason, short enough that with " (raw 0x...)" it fits SensorSample.faults' 200 characters."""


class BitField(StrictModel):
    """One bit of a register reported as its own boolean metric (alarm bits, door, defrost, compressor)."""

    name: MetricName = Field(description="Metric name of this bit (0 or 1 in the sample).")
    bit: int = Field(ge=0, le=31, description="Bit number, 0 = least significant.")
    invert: bool = Field(default=False, description="Report 1 when the bit is clear.")


class Writable(StrictModel):
    """A point that commands and rules may write, with the range the gateway accepts."""

    min: float = Field(description="Lowest value accepted, in engineering units.")
    max: float = Field(description="Highest value accepted, in engineering units.")

    @model_validator(mode="after")
    def _ordered(self) -> Writable:
        if self.min > self.max:
            raise ValueError("min must not be above max")
        return self


class Point(StrictModel):
    """One register (or coil) of the map."""

    name: MetricName = Field(description="Metric name (for a bit-field register: the register's name).")
    address: int = Field(ge=0, le=65535, description="PDU address, 0-based.")
    function: Function = Field(
        default=3, description="1 coils, 2 discrete inputs, 3 holding registers, 4 input registers."
    )
    type: ValueType = Field(default="int16", description="How the register(s) decode; coils are 'bool'.")
    byte_order: Literal["big", "little"] = Field(
        default="big", description="Byte order inside each register (Modbus is big-endian)."
    )
    word_order: Literal["big", "little"] = Field(
        default="big", description="For 32-bit types: 'big' = high word at the lower address."
    )
    scale: float = Field(default=1.0, description="value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="value = raw * scale + offset.")
    unit: Annotated[str, Field(max_length=16)] | None = Field(default=None, description="Unit, e.g. '°C'.")
    group: str = Field(description="The polling group this point is read in.")
    bits: list[BitField] = Field(
        default_factory=list,
        max_length=32,
        description="Report these bits as boolean metrics instead of the register's value.",
    )
    sentinels: dict[int, Annotated[str, Field(min_length=1, max_length=MAX_REASON)]] = Field(
        default_factory=dict,
        description="Raw values (as unsigned) that mean 'no reading', e.g. 0x8000: probe fault.",
    )
    write: Writable | None = Field(default=None, description="Writable point (setpoint, defrost start).")

    @property
    def width(self) -> int:
        return WIDTH[self.type]

    @property
    def is_bit(self) -> bool:
        return self.function in (1, 2)

    @model_validator(mode="after")
    def _consistent(self) -> Point:
        if self.is_bit and self.type != "bool":
            raise ValueError("coils (1) and discrete inputs (2) have type 'bool'")
        if not self.is_bit and self.type == "bool" and self.bits:
            raise ValueError("a 'bool' register has no bit fields; use type uint16 with bits")
        if self.bits:
            if self.type not in ("uint16", "uint32"):
                raise ValueError("bit fields need type uint16 or uint32")
            limit = 16 * self.width
            for field in self.bits:
                if field.bit >= limit:
                    raise ValueError(f"bit {field.bit} is beyond a {self.type}")
            if self.write is not None:
                raise ValueError("a bit-field register cannot be writable")
        if self.write is not None and self.function in (2, 4):
            raise ValueError("discrete inputs (2) and input registers (4) are read-only")
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError("scale must be a non-zero number")
        for raw in self.sentinels:
            if not 0 <= raw < 1 << (16 * self.width):
                raise ValueError(f"sentinel {raw:#x} does not fit a {self.type}")
        return self

    def metric_names(self) -> list[str]:
        return [b.name for b in self.bits] if self.bits else [self.name]


class PollGroup(StrictModel):
    interval_s: float = Field(gt=0, le=86_400, description="How often the group's points are read.")


class ModbusProfile(ProfileBase):
    """A Modbus controller: register map, polling groups, writable points and request limits."""

    family: Literal["modbus"] = "modbus"
    groups: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")], PollGroup] = Field(
        min_length=1, description="Polling groups by name (e.g. temperatures, alarms, parameters)."
    )
    points: list[Point] = Field(min_length=1, max_length=1000, description="The register map.")
    max_registers_per_read: int = Field(
        default=125, ge=2, le=125, description="Some controllers answer fewer than Modbus's 125."
    )
    max_bits_per_read: int = Field(default=2000, ge=1, le=2000, description="Coils/inputs per request.")
    max_gap: int = Field(
        default=8, ge=0, le=100, description="Unused registers a read block may span to join two points."
    )
    gaps_readable: bool = Field(
        default=True,
        description="False if the controller refuses reads over unmapped addresses (then max_gap is 0).",
    )

    @model_validator(mode="after")
    def _map_is_consistent(self) -> ModbusProfile:
        seen: set[str] = set()
        per_group: dict[str, int] = {}
        spans: dict[int, list[tuple[int, int, str]]] = {}
        for point in self.points:
            if point.group not in self.groups:
                raise ValueError(f"point {point.name}: unknown group {point.group!r}")
            for metric in {point.name, *point.metric_names()}:
                if metric in seen:
                    raise ValueError(f"metric {metric!r} is defined twice")
                seen.add(metric)
            per_group[point.group] = per_group.get(point.group, 0) + len(point.metric_names())
            spans.setdefault(point.function, []).append(
                (point.address, point.address + point.width, point.name)
            )
        for group, count in per_group.items():
            if count > MAX_METRICS_PER_GROUP:
                raise ValueError(f"group {group!r} has {count} metrics; at most {MAX_METRICS_PER_GROUP}")
        for function, ranges in spans.items():
            ranges.sort()
            for (_, end, name), (start, _, other) in itertools.pairwise(ranges):
                if start < end:
                    raise ValueError(f"function {function}: {name} and {other} overlap")
            if ranges[-1][1] > 65536:
                raise ValueError(f"function {function}: {ranges[-1][2]} runs past address 65535")
        return self

    def point(self, name: str) -> Point | None:
        return next((p for p in self.points if p.name == name), None)

    def effective_gap(self) -> int:
        return self.max_gap if self.gaps_readable else 0
