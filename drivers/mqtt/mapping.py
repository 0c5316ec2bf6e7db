"""Pure payload mapping: a generic sensor's JSON, CSV or binary payload -> ``sensor.sample`` payloads.

:func:`compile_mapping` turns a mapping model (drivers/mqtt/profile.py) into a :class:`Mapper` once per route;
``Mapper.map(payload)`` returns the samples or raises :class:`drivers.base.DecodeError`, and nothing else.
Every value is ``raw * scale + offset``; booleans are 0 or 1 (never scaled); a result that is not a finite
number is refused.
"""

from __future__ import annotations

import csv
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from drivers.errors import DecodeError
from drivers.mqtt.profile import (
    CsvMapping,
    JsonMapping,
    Path,
    RawMapping,
    parse_path,
)
from gateway.kernel.events import SensorSample

_NUMBER: Final = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_TRUE: Final = frozenset({"true", "on", "yes"})
_FALSE: Final = frozenset({"false", "off", "no"})
_STRUCT: Final = {
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
}


@dataclass(frozen=True, slots=True)
class Mapped:
    """One decoded sample and the device's own time for it (ISO 8601 with offset), if it sent one."""

    sample: SensorSample
    occurred_at: str | None = None


@dataclass(frozen=True, slots=True)
class _Metric:
    metric: str
    unit: str | None
    scale: float
    offset: float
    optional: bool

    def value(self, raw: float, *, boolean: bool = False) -> float:
        if boolean or (self.scale == 1.0 and self.offset == 0.0):
            value = raw
        else:
            # 12 significant digits: 5055 * 0.01 is 50.55, not 50.550000000000004 (sensors have far fewer).
            value = float(f"{raw * self.scale + self.offset:.12g}")
        if not math.isfinite(value):
            raise DecodeError("out_of_range", f"{self.metric}: {raw!r} scaled is not a finite number")
        return value


class Mapper:
    """A compiled mapping; ``source`` (profile name) goes into each sample."""

    def __init__(self, source: str, run: Callable[[bytes], list[Mapped]]) -> None:
        self.source = source
        self._run = run

    def map(self, payload: bytes) -> list[Mapped]:
        return self._run(payload)


def compile_mapping(mapping: JsonMapping | CsvMapping | RawMapping, source: str) -> Mapper:
    if isinstance(mapping, JsonMapping):
        return _json_mapper(mapping, source)
    if isinstance(mapping, CsvMapping):
        return _csv_mapper(mapping, source)
    return _raw_mapper(mapping, source)


def _metric(field: Any) -> _Metric:
    return _Metric(field.metric, field.unit, field.scale, field.offset, field.optional)


def _sample(
    values: dict[str, float], units: dict[str, str], faults: dict[str, str], source: str
) -> SensorSample:
    if not values and not faults:
        raise DecodeError("empty", "no mapped field is present in the message")
    return SensorSample(values=values, units=units, faults=faults, source=source)


# --- JSON --------------------------------------------------------------------------------------------------


def _lookup(doc: object, path: Path) -> object:
    """The value at ``path``, or ``_MISSING``."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(doc, list) or step >= len(doc):
                return _MISSING
            doc = doc[step]
        else:
            if not isinstance(doc, dict) or step not in doc:
                return _MISSING
            doc = doc[step]
    return doc


_MISSING: Final = object()


def _json_number(name: str, value: object) -> tuple[float, bool]:
    """(number, is_boolean) of a JSON value."""
    if isinstance(value, bool):
        return (1.0 if value else 0.0), True
    if isinstance(value, int | float):
        return float(value), False
    if isinstance(value, str) and len(value) <= 64 and _NUMBER.fullmatch(value.strip()):
        return float(value), False
    shown = (
        repr(value)[:60] if isinstance(value, str | int | float) or value is None else type(value).__name__
    )
    raise DecodeError("not_a_number", f"{name}: {_printable(shown)} is not a number or boolean")


def _json_mapper(mapping: JsonMapping, source: str) -> Mapper:
    fields = [(parse_path(f.path), f.path, _metric(f)) for f in mapping.fields]
    units = {f.metric: f.unit for f in mapping.fields if f.unit is not None}
    time_path = parse_path(mapping.time_path) if mapping.time_path is not None else None

    def run(payload: bytes) -> list[Mapped]:
        doc = _load_json(payload)
        values: dict[str, float] = {}
        for path, text, metric in fields:
            raw = _lookup(doc, path)
            if raw is _MISSING or raw is None:
                if metric.optional:
                    continue
                raise DecodeError("missing_field", f"{text}: not in the message")
            number, boolean = _json_number(text, raw)
            values[metric.metric] = metric.value(number, boolean=boolean)
        occurred = None
        if time_path is not None:
            stamp = _lookup(doc, time_path)
            if stamp is not _MISSING and stamp is not None:
                occurred = device_time(stamp)
        present = {m: u for m, u in units.items() if m in values}
        return [Mapped(_sample(values, present, {}, source), occurred)]

    return Mapper(source, run)


def _load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        raise DecodeError("not_json", f"not JSON: {_printable(str(err), 200)}") from None


def device_time(value: object) -> str:
    """A device's ISO 8601 time with an offset, normalised to milliseconds; DecodeError otherwise."""
    if not isinstance(value, str) or len(value) > 40:
        raise DecodeError("bad_time", "device time must be an ISO 8601 string with an offset")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise DecodeError("bad_time", f"device time {_printable(value)!r} is not ISO 8601") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise DecodeError("bad_time", f"device time {_printable(value)!r} has no UTC offset")
    return parsed.isoformat(timespec="milliseconds")


# --- CSV ---------------------------------------------------------------------------------------------------


def _text_number(name: str, text: str) -> tuple[float, bool]:
    word = text.strip()
    lowered = word.lower()
    if lowered in _TRUE:
        return 1.0, True
    if lowered in _FALSE:
        return 0.0, True
    if len(word) <= 64 and _NUMBER.fullmatch(word):
        return float(word), False
    raise DecodeError("not_a_number", f"{name}: {_printable(word[:60])!r} is not a number or boolean")


def _csv_mapper(mapping: CsvMapping, source: str) -> Mapper:
    columns = [(c.column, _metric(c)) for c in mapping.columns]
    units = {c.metric: c.unit for c in mapping.columns if c.unit is not None}
    delimiter = mapping.delimiter
    header = mapping.header
    max_lines = mapping.max_lines

    def run(payload: bytes) -> list[Mapped]:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DecodeError(
                "not_utf8", f"CSV is not UTF-8 text: {err.reason} at byte {err.start}"
            ) from None
        lines = [line for line in text.splitlines() if line.strip()]
        if "\x00" in text:
            raise DecodeError("not_csv", "CSV text holds a NUL character")
        try:
            rows = list(csv.reader(lines, delimiter=delimiter, strict=True))
        except csv.Error as err:
            raise DecodeError("not_csv", f"not CSV: {_printable(str(err), 200)}") from None
        names: dict[str, int] = {}
        if header:
            if not rows:
                raise DecodeError("empty", "no header line")
            names = {name.strip(): i for i, name in enumerate(rows[0])}
            rows = rows[1:]
        if not rows:
            raise DecodeError("empty", "no data line")
        if len(rows) > max_lines:
            raise DecodeError("too_many_lines", f"{len(rows)} data lines > max_lines {max_lines}")
        index = []
        for column, metric in columns:
            if isinstance(column, str):
                if column not in names:
                    if metric.optional:
                        continue
                    raise DecodeError("missing_field", f"column {column!r} is not in the header")
                index.append((names[column], metric))
            else:
                index.append((column, metric))
        out = []
        for n, row in enumerate(rows, start=1):
            values: dict[str, float] = {}
            for i, metric in index:
                cell = row[i] if i < len(row) else ""
                if not cell.strip():
                    if metric.optional:
                        continue
                    raise DecodeError("missing_field", f"line {n}: column {i} ({metric.metric}) is empty")
                number, boolean = _text_number(f"line {n} column {i}", cell)
                values[metric.metric] = metric.value(number, boolean=boolean)
            present = {m: u for m, u in units.items() if m in values}
            out.append(Mapped(_sample(values, present, {}, source)))
        return out

    return Mapper(source, run)


# --- raw bytes ---------------------------------------------------------------------------------------------


def _raw_mapper(mapping: RawMapping, source: str) -> Mapper:
    fields: Sequence[tuple[struct.Struct, int, bool, int | None, _Metric]] = [
        (
            struct.Struct(("<" if f.endian == "little" else ">") + _STRUCT[f.type]),
            f.byte,
            f.type == "float32",
            f.invalid,
            _metric(f),
        )
        for f in mapping.fields
    ]
    units = {f.metric: f.unit for f in mapping.fields if f.unit is not None}
    exact = mapping.length
    minimum = mapping.min_length

    def run(payload: bytes) -> list[Mapped]:
        if exact is not None and len(payload) != exact:
            raise DecodeError("bad_length", f"{len(payload)} bytes, the frame is {exact}")
        if len(payload) < minimum:
            raise DecodeError("bad_length", f"{len(payload)} bytes, the fields need {minimum}")
        values: dict[str, float] = {}
        faults: dict[str, str] = {}
        for layout, at, is_float, invalid, metric in fields:
            (raw,) = layout.unpack_from(payload, at)
            if (invalid is not None and raw == invalid) or (is_float and not math.isfinite(raw)):
                faults[metric.metric] = f"device sent the 'not available' value {raw!r}"
                continue
            values[metric.metric] = metric.value(float(raw))
        present = {m: u for m, u in units.items() if m in values}
        return [Mapped(_sample(values, present, faults, source))]

    return Mapper(source, run)


def _printable(text: str, limit: int = 120) -> str:
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
