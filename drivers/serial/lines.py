"""Pure parsers for line-oriented serial devices: barcode scanners and scales (one reading per line)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from drivers.epc import gs1_check_digit
from drivers.errors import DecodeError

_PRINTABLE: Final = re.compile(rb"^[\x20-\x7e]+$")
_AIM_ID: Final = re.compile(r"^\][A-Za-z][0-9A-Za-z]")
"""AIM symbology identifier (']E0' EAN-13, ']C1' GS1-128 ...), sent first when the scanner is set to."""
TO_KG: Final = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125}


@dataclass(frozen=True, slots=True)
class Barcode:
    code: str
    symbology: str | None = None
    gtin: str | None = None
    """GTIN-14 when the code is a GTIN-8/12/13/14 with a valid check digit."""


@dataclass(frozen=True, slots=True)
class ScaleReading:
    weight_kg: float
    stable: bool


@dataclass(frozen=True, slots=True)
class ScaleFormat:
    """How a scale writes a line: a regex with a ``weight`` group (and optional ``unit`` and ``status``)."""

    pattern: re.Pattern[str]
    default_unit: str = "kg"
    stable: frozenset[str] = frozenset()
    """``status`` values meaning stable (empty: every reading is stable)."""
    overload: frozenset[str] = frozenset()


def parse_barcode(line: bytes, max_length: int = 128) -> Barcode | DecodeError:
    text = line.strip(b" \t")
    if not text:
        return DecodeError("empty", "an empty barcode line")
    if len(text) > max_length:
        return DecodeError("too_long", f"barcode of {len(text)} characters > {max_length}")
    if not _PRINTABLE.match(text):
        return DecodeError("bad_barcode", "a barcode line with non-printable bytes")
    code = text.decode("ascii")
    symbology = None
    if _AIM_ID.match(code):
        symbology, code = code[:3], code[3:]
        if not code:
            return DecodeError("empty", "a symbology identifier without a code")
    gtin = None
    if code.isdigit() and len(code) in (8, 12, 13, 14) and gs1_check_digit(code[:-1]) == int(code[-1]):
        gtin = code.zfill(14)
    return Barcode(code, symbology, gtin)


def parse_scale(line: bytes, fmt: ScaleFormat) -> ScaleReading | DecodeError:
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        return DecodeError("bad_line", "a scale line with non-ASCII bytes")
    match = fmt.pattern.fullmatch(text)
    if match is None:
        return DecodeError("no_match", f"line does not match the scale format: {text[:80]!r}")
    groups = match.groupdict()
    status = groups.get("status")
    if status is not None and status in fmt.overload:
        return DecodeError("overload", f"the scale reports overload ({status})")
    unit = (groups.get("unit") or fmt.default_unit).strip().lower()
    factor = TO_KG.get(unit)
    if factor is None:
        return DecodeError("bad_unit", f"unknown weight unit {unit!r}")
    weight_text = (groups.get("weight") or "").replace(" ", "")
    try:
        weight = float(weight_text)
    except ValueError:
        return DecodeError("bad_weight", f"not a number: {weight_text[:40]!r}")
    if weight != weight or abs(weight) > 1e6:  # NaN or absurd
        return DecodeError("bad_weight", f"weight out of range: {weight_text[:40]!r}")
    stable = not fmt.stable or (status is not None and status in fmt.stable)
    return ScaleReading(round(weight * factor, 6), stable)
