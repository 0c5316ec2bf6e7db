"""Pure EPC decoding (GS1 EPC Tag Data Standard): SGTIN-96 and SGTIN-198 to GTIN-14 and serial.

Any other header is kept as the raw EPC only (``scheme`` None). Malformed SGTINs (a reserved partition, a
company prefix or item reference with too many digits, a serial that breaks the scheme's rules) are a
:class:`DecodeError`: the tag still counts, by its raw EPC.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final

from drivers.errors import DecodeError

SGTIN_96: Final = 0x30
SGTIN_198: Final = 0x36

_PARTITIONS: Final = (
    # (company prefix bits, digits, item reference bits, digits): TDS table "SGTIN Partition Table".
    (40, 12, 4, 1),
    (37, 11, 7, 2),
    (34, 10, 10, 3),
    (30, 9, 14, 4),
    (27, 8, 17, 5),
    (24, 7, 20, 6),
    (20, 6, 24, 7),
)
_SERIAL_96_MAX: Final = 274_877_906_943
"""38 bits; TDS: the serial is a decimal integer without leading zeros."""
_SERIAL_CHARS: Final = frozenset(
    "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)
"""GS1 AI encodable character set 82 (TDS: the SGTIN-198 serial is 1..20 such characters, 7 bits each)."""


@dataclass(frozen=True, slots=True)
class EpcInfo:
    epc: str
    """Upper-case hex, as read."""
    scheme: str | None = None
    """'sgtin-96' or 'sgtin-198'; None for any other header."""
    filter: int | None = None
    gtin: str | None = None
    """GTIN-14 with its check digit."""
    serial: str | None = None
    company_prefix: str | None = None


def gs1_check_digit(digits: str) -> int:
    """The GS1 mod-10 check digit of ``digits`` (weights 3, 1, 3, ... from the right)."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits)))
    return (10 - total % 10) % 10


def decode_epc(epc_hex: str) -> EpcInfo | DecodeError:
    """Decode an EPC given as hex (either case). Never raises."""
    try:
        raw = binascii.unhexlify(epc_hex)
    except (binascii.Error, ValueError):
        return DecodeError("bad_epc", f"not an even-length hex string: {epc_hex[:64]!r}")
    return decode_epc_bytes(raw)


def decode_epc_bytes(raw: bytes) -> EpcInfo | DecodeError:
    if not raw:
        return DecodeError("bad_epc", "empty EPC")
    epc = raw.hex().upper()
    header = raw[0]
    if header == SGTIN_96:
        if len(raw) < 12:
            return DecodeError("bad_epc", f"SGTIN-96 needs 12 bytes, got {len(raw)}")
        return _sgtin(epc, int.from_bytes(raw[:12], "big"), 96)
    if header == SGTIN_198:
        if len(raw) < 25:
            return DecodeError("bad_epc", f"SGTIN-198 needs 25 bytes (198 bits), got {len(raw)}")
        # 198 bits, left-aligned in whole bytes: drop the padding bits at the end.
        return _sgtin(epc, int.from_bytes(raw[:25], "big") >> 2, 198)
    return EpcInfo(epc)


def _sgtin(epc: str, value: int, bits: int) -> EpcInfo | DecodeError:
    serial_bits = bits - 58  # header 8, filter 3, partition 3, company prefix + item reference 44
    filter_value = (value >> (bits - 11)) & 0x7
    partition = (value >> (bits - 14)) & 0x7
    if partition >= len(_PARTITIONS):
        return DecodeError("bad_epc", f"SGTIN partition {partition} is reserved")
    cp_bits, cp_digits, ir_bits, ir_digits = _PARTITIONS[partition]
    company = (value >> (serial_bits + ir_bits)) & ((1 << cp_bits) - 1)
    item = (value >> serial_bits) & ((1 << ir_bits) - 1)
    if company >= 10**cp_digits or item >= 10**ir_digits:
        return DecodeError("bad_epc", "SGTIN company prefix or item reference has too many digits")
    company_str = f"{company:0{cp_digits}d}"
    item_str = f"{item:0{ir_digits}d}"
    body = item_str[0] + company_str + item_str[1:]
    gtin = body + str(gs1_check_digit(body))
    serial_value = value & ((1 << serial_bits) - 1)
    if bits == 96:
        if serial_value > _SERIAL_96_MAX:
            return DecodeError("bad_epc", "SGTIN-96 serial out of range")
        serial = str(serial_value)
    else:
        serial_or_error = _serial_198(serial_value)
        if isinstance(serial_or_error, DecodeError):
            return serial_or_error
        serial = serial_or_error
    return EpcInfo(epc, f"sgtin-{bits}", filter_value, gtin, serial, company_str)


def _serial_198(value: int) -> str | DecodeError:
    chars = []
    for shift in range(133, -1, -7):
        code = (value >> shift) & 0x7F
        if code == 0:
            if (value & ((1 << shift) - 1)) != 0:
                return DecodeError("bad_epc", "SGTIN-198 serial has characters after its end")
            break
        char = chr(code)
        if char not in _SERIAL_CHARS:
            return DecodeError("bad_epc", f"SGTIN-198 serial has a character outside set 82: {code:#04x}")
        chars.append(char)
    if not chars:
        return DecodeError("bad_epc", "SGTIN-198 serial is empty")
    return "".join(chars)


def encode_sgtin96(gtin14: str, serial: int, company_digits: int = 7, filter_value: int = 1) -> bytes:
    """The SGTIN-96 EPC of a GTIN-14 and serial (for simulators and tests). Raises ValueError on bad input."""
    if len(gtin14) != 14 or not gtin14.isdigit() or gs1_check_digit(gtin14[:13]) != int(gtin14[13]):
        raise ValueError(f"not a GTIN-14 with a valid check digit: {gtin14!r}")
    partition = next((n for n, p in enumerate(_PARTITIONS) if p[1] == company_digits), None)
    if partition is None or not 0 <= serial <= _SERIAL_96_MAX or not 0 <= filter_value <= 7:
        raise ValueError("company prefix of 6..12 digits, serial of 38 bits, filter 0..7")
    cp_bits, cp_digits, ir_bits, _ = _PARTITIONS[partition]
    company = int(gtin14[1 : 1 + cp_digits])
    item = int(gtin14[0] + gtin14[1 + cp_digits : 13])
    value = SGTIN_96
    for field, width in (
        (filter_value, 3),
        (partition, 3),
        (company, cp_bits),
        (item, ir_bits),
        (serial, 38),
    ):
        value = (value << width) | field
    return value.to_bytes(12, "big")
