"""Xiaomi LYWSD03MMC (and other Telink thermometers) with custom firmware: service data under UUID 0x181A.

Formats of https://github.com/pvvx/ATC_MiThermometer (README, "Advertising formats"), decoded as the reference
parser does (custom-components/ble_monitor ``ble_parser/atc.py``):

- ATC1441, 13 bytes big-endian: MAC, temperature int16 * 0.1 °C, humidity %, battery %, battery mV, counter.
- pvvx custom, 15 bytes little-endian: MAC reversed, temperature int16 * 0.01 °C, humidity uint16 * 0.01 %,
  battery mV, battery %, counter, flags (bit 0 reed switch, bit 1 GPIO_TRG output, bits 3/4 triggers).
- pvvx custom encrypted, 11 bytes: counter, AES-128-CCM ciphertext of temperature int16 * 0.01, humidity
  uint16 * 0.01, battery %, flags, then a 4-byte MIC. Nonce = MAC reversed (6) + the AD header of the frame
  (length, 0x16, ``1A 18``) + counter; associated data is the single byte 0x11.

The reed switch follows the firmware: flags bit 0 is the reed input's level (``trigger_flg_t.rds1_input``, read
with a pull-up, so 1 = contact open), and the firmware's own BTHome frames report that same bit as "opened"
(src/bthome_beacon.c: ``p->opened1 = trg.flg.rds1_input``). So ``opening`` = flags & 1. The bit is sent whether
or not a switch is wired to the sensor, so ``opening`` is reported only with ``reed_switch``.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble._common import need_key, sample
from drivers.errors import DecodeError
from gateway.kernel.events import SensorSample

SOURCE_ATC1441: Final = "atc1441"
SOURCE_PVVX: Final = "pvvx"
ATC1441_LENGTH: Final = 13
PVVX_LENGTH: Final = 15
PVVX_ENCRYPTED_LENGTH: Final = 11
MIC_BYTES: Final = 4
AAD: Final = b"\x11"
AD_SERVICE_DATA_16: Final = 0x16
UUID16: Final = b"\x1a\x18"
"""0x181A as sent on air (little-endian)."""

_ATC1441: Final = struct.Struct(">6shBBHB")
_PVVX: Final = struct.Struct("<6shHHBBB")
_PVVX_PLAIN: Final = struct.Struct("<hHBB")
_UNITS: Final = {"temperature": "°C", "humidity": "%", "voltage": "V", "battery_pct": "%"}


def _check_mac(own: bytes, mac: bytes) -> None:
    if own != mac:
        raise DecodeError(
            "mac_mismatch", f"the frame carries MAC {own.hex(':')}, it was sent by {mac.hex(':')}"
        )


def decode_atc1441(data: bytes, mac: bytes) -> SensorSample:
    """Decode ATC1441-format service data (the bytes after the UUID) from the device with address ``mac``."""
    if len(data) != ATC1441_LENGTH:
        raise DecodeError("bad_length", f"ATC1441 service data is {ATC1441_LENGTH} bytes, got {len(data)}")
    own_mac, temp, hum, battery, millivolts, counter = _ATC1441.unpack(data)
    _check_mac(own_mac, mac)
    values = {
        "temperature": temp / 10,
        "humidity": float(hum),
        "voltage": millivolts / 1000,
        "battery_pct": float(battery),
    }
    return sample(SOURCE_ATC1441, values, _UNITS, counter=counter, battery_pct=battery)


def decode_pvvx(
    data: bytes, mac: bytes, bindkey: bytes | None = None, *, reed_switch: bool = False
) -> SensorSample:
    """Decode pvvx custom service data, plain (15 bytes) or encrypted (11 bytes), from address ``mac``.

    A device with a ``bindkey`` must send encrypted frames; a plain one from it is refused (``not_encrypted``).
    ``reed_switch``: a reed switch is fitted, so the flags' bit 0 is reported as ``opening``."""
    if len(data) == PVVX_ENCRYPTED_LENGTH:
        return _decrypt_pvvx(data, mac, need_key(bindkey, "pvvx"), reed_switch)
    if len(data) != PVVX_LENGTH:
        raise DecodeError(
            "bad_length",
            f"pvvx service data is {PVVX_LENGTH} bytes (or {PVVX_ENCRYPTED_LENGTH} encrypted), got {len(data)}",
        )
    if bindkey is not None:
        raise DecodeError("not_encrypted", "the device has a bindkey but sent an unencrypted pvvx frame")
    own_mac, temp, hum, millivolts, battery, counter, flags = _PVVX.unpack(data)
    _check_mac(own_mac[::-1], mac)
    values = {
        "temperature": temp / 100,
        "humidity": hum / 100,
        "voltage": millivolts / 1000,
        "battery_pct": float(battery),
    }
    if reed_switch:
        values["opening"] = float(flags & 1)
    return sample(SOURCE_PVVX, values, _UNITS, counter=counter, battery_pct=battery)


def pvvx_nonce(mac: bytes, size: int, counter: int) -> bytes:
    """The 11-byte nonce of an encrypted pvvx frame whose service data is ``size`` bytes long."""
    return mac[::-1] + bytes((size + 3, AD_SERVICE_DATA_16)) + UUID16 + bytes((counter,))


def _decrypt_pvvx(data: bytes, mac: bytes, key: bytes, reed_switch: bool) -> SensorSample:
    counter = data[0]
    nonce = pvvx_nonce(mac, len(data), counter)
    try:
        plain = AESCCM(key, tag_length=MIC_BYTES).decrypt(nonce, data[1:], AAD)
    except InvalidTag:
        raise DecodeError("decrypt_failed", "pvvx frame does not verify: wrong bindkey or damaged") from None
    temp, hum, battery, flags = _PVVX_PLAIN.unpack(plain)
    values = {
        "temperature": temp / 100,
        "humidity": hum / 100,
        "battery_pct": float(battery),
    }
    if reed_switch:
        values["opening"] = float(flags & 1)
    return sample(SOURCE_PVVX, values, _UNITS, counter=counter, battery_pct=battery)
