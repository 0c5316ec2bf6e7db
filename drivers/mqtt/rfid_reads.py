"""Pure decoding of an RFID shelf's MQTT message: one tag read or a list of them.

Accepted shapes (JSON): ``{"epc": "3074257BF7194E4000001A85", "rssi": -52.5, "antenna": 1}``, a list of
such objects, or ``{"reads": [...]}``. EPC is hex (any case, 4 to 124 digits, even length); ``rssi`` (dBm)
and ``antenna`` (0-255) are optional. Anything else raises :class:`drivers.base.DecodeError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from drivers.errors import DecodeError

MAX_READS: Final = 1000
"""Reads per message, at most."""
_EPC: Final = re.compile(r"[0-9A-Fa-f]{4,124}")
_KEYS: Final = frozenset({"epc", "rssi", "antenna"})


@dataclass(frozen=True, slots=True)
class TagRead:
    epc: str
    """Upper-case hex."""
    rssi: float | None
    antenna: int | None


def decode_reads(payload: bytes) -> list[TagRead]:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise DecodeError("not_json", "a tag read is a JSON object or a list of them") from None
    if isinstance(doc, dict) and "reads" in doc:
        if set(doc) != {"reads"}:
            raise DecodeError("invalid", "a 'reads' message has only the 'reads' list")
        doc = doc["reads"]
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise DecodeError("empty", "no tag reads in the message")
    if len(items) > MAX_READS:
        raise DecodeError("too_many_reads", f"{len(items)} reads > {MAX_READS} per message")
    return [_read(n, item) for n, item in enumerate(items)]


def _read(n: int, item: Any) -> TagRead:
    if not isinstance(item, dict):
        raise DecodeError("invalid", f"read {n}: not an object")
    extra = set(item) - _KEYS
    if extra:
        raise DecodeError(
            "invalid", f"read {n}: unknown field(s) {', '.join(repr(k[:30]) for k in sorted(extra)[:3])}"
        )
    epc = item.get("epc")
    if not isinstance(epc, str) or not _EPC.fullmatch(epc) or len(epc) % 2:
        raise DecodeError("bad_epc", f"read {n}: epc must be 4-124 hex digits, an even number")
    rssi = item.get("rssi")
    if rssi is not None:
        if isinstance(rssi, bool) or not isinstance(rssi, int | float) or not -128 <= rssi <= 128:
            raise DecodeError("invalid", f"read {n}: rssi must be a number of dBm, -128..128")
        rssi = float(rssi)
    antenna = item.get("antenna")
    if antenna is not None and (
        isinstance(antenna, bool) or not isinstance(antenna, int) or not 0 <= antenna <= 255
    ):
        raise DecodeError("invalid", f"read {n}: antenna must be an integer 0..255")
    return TagRead(epc.upper(), rssi, antenna)
