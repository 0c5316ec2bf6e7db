"""CRC-16 variants used by serial devices (parameters from the reveng CRC catalogue).

- CRC-16/MODBUS: poly 0x8005 reflected (0xA001), init 0xFFFF, no final XOR; check("123456789") = 0x4B37.
- CRC-16/MCRF4XX: poly 0x1021 reflected (0x8408), init 0xFFFF, no final XOR; check("123456789") = 0x6F91.
  Chafon / UHFReader18 readers use it over ``Len .. Data`` and send it low byte first.

MCRF4XX runs in C: a reflected CRC equals the bit-reversal of the unreflected CRC over bit-reversed bytes,
and the unreflected one (poly 0x1021, any init) is :func:`binascii.crc_hqx`.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import Final, Literal

CrcName = Literal["modbus", "mcrf4xx"]

_REVERSED_BYTES: Final = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _reflected_table(poly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_MODBUS_TABLE: Final = _reflected_table(0xA001)


def _reverse16(value: int) -> int:
    return (_REVERSED_BYTES[value & 0xFF] << 8) | _REVERSED_BYTES[value >> 8]


def crc16_modbus(data: bytes | bytearray | memoryview) -> int:
    crc = 0xFFFF
    table = _MODBUS_TABLE
    for byte in bytes(data):
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def crc16_mcrf4xx(data: bytes | bytearray | memoryview) -> int:
    return _reverse16(binascii.crc_hqx(bytes(data).translate(_REVERSED_BYTES), 0xFFFF))


CRC16: Final[dict[CrcName, Callable[[bytes | bytearray | memoryview], int]]] = {
    "modbus": crc16_modbus,
    "mcrf4xx": crc16_mcrf4xx,
}
"""CRC name (as written in profiles) -> function."""
