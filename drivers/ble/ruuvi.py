"""Ruuvi RAWv2, data format 5 (https://docs.ruuvi.com/communication/bluetooth-advertisements/data-format-5-rawv2).

Manufacturer data of company 0x0499, 24 bytes big-endian: format 5, temperature int16 * 0.005 °C, humidity
uint16 * 0.0025 %, pressure uint16 + 50 000 Pa, acceleration x/y/z int16 mG, power (11 bits battery mV above
1600, 5 bits tx power 2 dBm steps above -40), movement counter, measurement sequence, MAC. Each field has a
"not available" value; such a field is absent from ``values`` and named in ``faults``.
"""

from __future__ import annotations

import struct
from typing import Final

from drivers.ble._common import sample
from drivers.errors import DecodeError
from gateway.kernel.events import SensorSample

SOURCE: Final = "ruuvi.rawv2"
FORMAT: Final = 5
LENGTH: Final = 24
NOT_AVAILABLE: Final = "not available (the sensor sent the format's invalid marker)"
_LAYOUT: Final = struct.Struct(">BhHHhhhHBH6s")
_NO_MAC: Final = b"\xff" * 6


def decode_ruuvi(data: bytes, mac: bytes) -> SensorSample:
    """Decode Ruuvi manufacturer data (the bytes after the company id) from the device with address ``mac``."""
    if len(data) != LENGTH:
        raise DecodeError("bad_length", f"Ruuvi RAWv2 is {LENGTH} bytes, got {len(data)}")
    fmt, temp, hum, pres, ax, ay, az, power, movement, sequence, own_mac = _LAYOUT.unpack(data)
    if fmt != FORMAT:
        raise DecodeError("unsupported_format", f"Ruuvi data format {fmt}; only 5 (RAWv2) is decoded")
    if own_mac != _NO_MAC and own_mac != mac:
        raise DecodeError(
            "mac_mismatch", f"the frame carries MAC {own_mac.hex(':')}, it was sent by {mac.hex(':')}"
        )
    values: dict[str, float] = {}
    faults: dict[str, str] = {}

    def put(name: str, raw: int, invalid: int, value: float) -> None:
        if raw == invalid:
            faults[name] = NOT_AVAILABLE
        else:
            values[name] = value

    put("temperature", temp, -0x8000, round(temp * 0.005, 3))
    put("humidity", hum, 0xFFFF, round(hum * 0.0025, 4))
    put("pressure", pres, 0xFFFF, round((pres + 50_000) / 100, 2))
    put("acceleration_x", ax, -0x8000, ax / 1000)
    put("acceleration_y", ay, -0x8000, ay / 1000)
    put("acceleration_z", az, -0x8000, az / 1000)
    put("voltage", power >> 5, 0x7FF, ((power >> 5) + 1600) / 1000)
    put("tx_power", power & 0x1F, 0x1F, -40 + 2 * (power & 0x1F))
    put("movement_count", movement, 0xFF, float(movement))
    units = {
        "temperature": "°C",
        "humidity": "%",
        "pressure": "hPa",
        "acceleration_x": "g",
        "acceleration_y": "g",
        "acceleration_z": "g",
        "voltage": "V",
        "tx_power": "dBm",
    }
    if sequence == 0xFFFF:
        faults["sequence"] = NOT_AVAILABLE
    return sample(SOURCE, values, units, faults=faults, counter=None if sequence == 0xFFFF else sequence)
