"""Pure Modbus register work: plan read blocks, decode register values, encode writes. No I/O.

Decoding follows the profile's point: the registers of a value are put in order (``word_order``), each
register's two bytes in order (``byte_order``), then the bytes are read big-endian as the type
(IEEE 754 binary32 for float32). A raw value listed in ``sentinels`` (as unsigned) is a fault, not a value.
Only :class:`drivers.base.DecodeError` leaves the decoders and only :class:`WriteRefusedError` the encoder.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from drivers.errors import DecodeError, DriverError
from drivers.modbus.profile import MAX_REASON, Point, Writable

MAX_REGISTERS: Final = 125
"""Modbus Application Protocol v1.1b, 6.3: at most 125 registers per read (function 3 and 4)."""
MAX_BITS: Final = 2000
"""Modbus Application Protocol v1.1b, 6.1-6.2: at most 2000 coils or discrete inputs per read."""

_STRUCT: Final[dict[str, str]] = {
    "int16": ">h",
    "uint16": ">H",
    "bool": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
}


class WriteRefusedError(DriverError, ValueError):
    """A write that is not sent: unknown point, read-only, out of range, not representable. Also a
    ValueError, so callers outside the driver (the HQ downlink) tell it from an I/O failure."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers (or bits) from ``start`` with function ``function``."""

    function: int
    start: int
    count: int
    points: tuple[Point, ...]


@dataclass(slots=True)
class Decoded:
    """What one poll of a group read: the parts of a ``sensor.sample``."""

    values: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """What goes on the wire for a write: function 5 (one coil), 6 (one register) or 16 (registers)."""

    function: Literal[5, 6, 16]
    address: int
    values: tuple[int, ...]


def plan_reads(
    points: Iterable[Point],
    *,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
    max_gap: int = 8,
) -> list[ReadBlock]:
    """Fewest contiguous reads covering ``points``: per function code, by address, joining neighbours
    at most ``max_gap`` unused addresses apart while the block stays within the request limit."""
    by_function: dict[int, list[Point]] = {}
    for point in points:
        by_function.setdefault(point.function, []).append(point)
    blocks: list[ReadBlock] = []
    for function in sorted(by_function):
        limit = max_bits if function in (1, 2) else max_registers
        ordered = sorted(by_function[function], key=lambda p: p.address)
        start, end, members = ordered[0].address, ordered[0].address + ordered[0].width, [ordered[0]]
        for point in ordered[1:]:
            stop = point.address + point.width
            if point.address - end <= max_gap and max(end, stop) - start <= limit:
                end = max(end, stop)
                members.append(point)
                continue
            blocks.append(ReadBlock(function, start, end - start, tuple(members)))
            start, end, members = point.address, stop, [point]
        blocks.append(ReadBlock(function, start, end - start, tuple(members)))
    return blocks


def decode_block(block: ReadBlock, data: Sequence[int] | Sequence[bool], into: Decoded) -> None:
    """Decode one block's response into ``into``. A response shorter or longer than asked is a DecodeError
    (a longer one answers another request: a late RTU reply); bit responses are padded to a multiple of 8
    by the protocol, so up to 7 extra bits are ignored."""
    longest = (block.count + 7) // 8 * 8 if block.function in (1, 2) else block.count
    if len(data) < block.count:
        raise DecodeError("short_response", f"asked {block.count} values at {block.start}, got {len(data)}")
    if len(data) > longest:
        raise DecodeError("long_response", f"asked {block.count} values at {block.start}, got {len(data)}")
    for point in block.points:
        at = point.address - block.start
        if point.is_bit:
            _put(into, point, point.name, 1.0 if data[at] else 0.0)
            continue
        words = [int(w) for w in data[at : at + point.width]]
        decode_point(point, words, into)


def decode_point(point: Point, words: Sequence[int], into: Decoded) -> None:
    """Decode one register point from its ``width`` registers."""
    if len(words) != point.width:
        raise DecodeError("short_response", f"{point.name}: needs {point.width} registers, got {len(words)}")
    for word in words:
        if not 0 <= word <= 0xFFFF:
            raise DecodeError("bad_register", f"{point.name}: register value {word} is not 16-bit")
    raw_bytes = registers_to_bytes(words, point.byte_order, point.word_order)
    unsigned = int.from_bytes(raw_bytes, "big")
    reason = point.sentinels.get(unsigned)
    if reason is not None:
        for metric in point.metric_names():
            into.faults[metric] = f"{reason[:MAX_REASON]} (raw {unsigned:#0{2 + 4 * point.width}x})"
        return
    if point.bits:
        for bit in point.bits:
            on = bool(unsigned >> bit.bit & 1) != bit.invert
            _put(into, point, bit.name, 1.0 if on else 0.0, unit=False)
        return
    raw: float = struct.unpack(_STRUCT[point.type], raw_bytes)[0]
    if point.type == "bool":
        _put(into, point, point.name, 1.0 if raw else 0.0)
        return
    if not math.isfinite(raw):
        into.faults[point.name] = f"not a number (raw {unsigned:#010x})"
        return
    value = raw * point.scale + point.offset
    if not math.isfinite(value):
        into.faults[point.name] = "out of range after scaling"
        return
    _put(into, point, point.name, value if point.type == "float32" else round(value, 9))


def _put(into: Decoded, point: Point, metric: str, value: float, *, unit: bool = True) -> None:
    into.values[metric] = value
    if unit and point.unit:
        into.units[metric] = point.unit


def registers_to_bytes(words: Sequence[int], byte_order: str, word_order: str) -> bytes:
    """The value's bytes, most significant first, from its registers as they came off the wire."""
    ordered = list(words) if word_order == "big" else list(reversed(words))
    out = bytearray()
    for word in ordered:
        pair = word.to_bytes(2, "big")
        out += pair if byte_order == "big" else pair[::-1]
    return bytes(out)


def bytes_to_registers(data: bytes, byte_order: str, word_order: str) -> list[int]:
    """The inverse of :func:`registers_to_bytes`."""
    words = []
    for i in range(0, len(data), 2):
        pair = data[i : i + 2]
        words.append(int.from_bytes(pair if byte_order == "big" else pair[::-1], "big"))
    return words if word_order == "big" else list(reversed(words))


def encode_write(point: Point, value: object, narrowed: Writable | None = None) -> WriteRequest:
    """The request that writes ``value`` (engineering units) to ``point``, or WriteRefusedError.

    ``value`` is what HQ sent, not yet trusted: a numeric point takes a number only (not true or "5"), a
    boolean point true or false only (not 1). ``narrowed`` is the device's own range for the point, which the
    config keeps inside the profile's (:class:`drivers.modbus.config.WriteLimits`)."""
    if point.write is None:
        raise WriteRefusedError("read_only", f"{point.name} is not writable")
    number = strict_value(point, value)
    limits = narrowed if narrowed is not None else point.write
    if not limits.min <= number <= limits.max:
        whose = ""
        if narrowed is not None:
            whose = f" (this device's range; the profile's is {point.write.min:g}..{point.write.max:g})"
        raise WriteRefusedError(
            "out_of_range",
            f"{point.name}: {_shown(number)} is outside {limits.min:g}..{limits.max:g}{whose}",
        )
    words = encode_value(point, float(number))
    if point.function == 1:
        return WriteRequest(5, point.address, words)
    return WriteRequest(6 if len(words) == 1 else 16, point.address, words)


def strict_value(point: Point, value: object) -> float:
    """``value`` as a number if its JSON type fits the point, else WriteRefusedError: a boolean point takes
    true or false (as 1 or 0), any other point a finite number that is not a boolean."""
    if point.type == "bool":
        if not isinstance(value, bool):
            raise WriteRefusedError("invalid_value", f"{point.name}: write true or false, not {_kind(value)}")
        return 1 if value else 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteRefusedError("invalid_value", f"{point.name}: write a number, not {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WriteRefusedError("invalid_value", f"{point.name}: the value must be a finite number")
    return value


def _kind(value: object) -> str:
    """What a refused value is, without echoing it (a string from HQ could be anything)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shown(value: float) -> str:
    """A refused number for a message; an integer too large for a float (JSON allows any) by its size."""
    if isinstance(value, int) and not -(10**15) < value < 10**15:
        return f"an integer of {value.bit_length()} bits"
    return f"{value:g}"


def encode_value(point: Point, value: float) -> tuple[int, ...]:
    """The registers (or the one bit, for coils and inputs) that hold ``value`` for ``point``: what a
    write sends, and what the simulator serves. Bit-field registers take the whole raw value."""
    if point.type == "bool":
        if value not in (0, 1):
            raise WriteRefusedError("invalid_value", f"{point.name}: write 0 or 1")
        return (int(value),)
    raw = (value - point.offset) / point.scale
    if point.type == "float32":
        try:
            data = struct.pack(">f", raw)
        except OverflowError as err:
            raise WriteRefusedError(
                "out_of_range", f"{point.name}: {value:g} does not fit a float32"
            ) from err
    else:
        whole = round(raw)
        if abs(raw - whole) > 1e-6 * max(1.0, abs(raw)):
            raise WriteRefusedError(
                "invalid_value",
                f"{point.name}: {value:g} is not a multiple of the resolution {point.scale:g}",
            )
        lo, hi = _int_range(point.type)
        if not lo <= whole <= hi:
            raise WriteRefusedError("out_of_range", f"{point.name}: {value:g} does not fit a {point.type}")
        data = struct.pack(_STRUCT[point.type], whole)
    return tuple(bytes_to_registers(data, point.byte_order, point.word_order))


def _int_range(kind: str) -> tuple[int, int]:
    bits = 16 if kind.endswith("16") else 32
    if kind.startswith("u"):
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
