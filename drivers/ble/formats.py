"""Names shared by the BLE config and decoders, in a module that imports nothing of the driver framework
(``gateway.config`` imports the driver configs, which import this)."""

from __future__ import annotations

import re
from typing import Final, Literal

BleFormat = Literal["bthome.v2", "ruuvi.rawv2", "atc1441", "pvvx"]
FORMATS: Final[tuple[BleFormat, ...]] = ("bthome.v2", "ruuvi.rawv2", "atc1441", "pvvx")
MAC_PATTERN: Final = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
_MAC_RE: Final = re.compile(MAC_PATTERN)


def uuid16(short: int) -> str:
    """The 128-bit UUID string bleak uses as the service data key of a 16-bit UUID."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


BTHOME_UUID: Final = uuid16(0xFCD2)
ENVIRONMENTAL_SENSING_UUID: Final = uuid16(0x181A)
"""Service data UUID of the ATC1441 and pvvx formats."""
RUUVI_COMPANY_ID: Final = 0x0499


def mac_bytes(mac: str) -> bytes:
    """'A4:C1:38:8D:18:B2' -> its 6 bytes, in the order written."""
    if not _MAC_RE.match(mac):
        raise ValueError(f"not a MAC address: {mac!r} (want six hex pairs separated by ':')")
    return bytes.fromhex(mac.replace(":", ""))
