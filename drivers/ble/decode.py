"""One entry point for every BLE format: pick the right part of an advertisement and decode it.

bleak hands over an advertisement as service data (keyed by 128-bit UUID strings) and manufacturer data (keyed
by company id); a format names which entry it reads.
"""

from __future__ import annotations

from collections.abc import Mapping

from drivers.ble import ruuvi
from drivers.ble.bthome import decode_bthome
from drivers.ble.formats import BTHOME_UUID, ENVIRONMENTAL_SENSING_UUID, RUUVI_COMPANY_ID, BleFormat
from drivers.ble.xiaomi import decode_atc1441, decode_pvvx
from drivers.errors import DecodeError
from gateway.kernel.events import SensorSample


def decode_advertisement(
    fmt: BleFormat,
    mac: bytes,
    service_data: Mapping[str, bytes],
    manufacturer_data: Mapping[int, bytes],
    bindkey: bytes | None = None,
    *,
    reed_switch: bool = False,
) -> SensorSample:
    """Decode the part of one advertisement that ``fmt`` reads; DecodeError when it is missing or bad.
    ``reed_switch``: the sensor has one fitted (pvvx reports it as ``opening``)."""
    if fmt == "ruuvi.rawv2":
        data = manufacturer_data.get(RUUVI_COMPANY_ID)
        if data is None:
            raise DecodeError(
                "no_payload", "no Ruuvi manufacturer data (company 0x0499) in the advertisement"
            )
        return ruuvi.decode_ruuvi(data, mac)
    key = BTHOME_UUID if fmt == "bthome.v2" else ENVIRONMENTAL_SENSING_UUID
    data = service_data.get(key)
    if data is None:
        raise DecodeError("no_payload", f"no service data under {key} in the advertisement")
    if fmt == "bthome.v2":
        return decode_bthome(data, mac, bindkey)
    if fmt == "atc1441":
        return decode_atc1441(data, mac)
    return decode_pvvx(data, mac, bindkey, reed_switch=reed_switch)


def payload_of(
    fmt: BleFormat, service_data: Mapping[str, bytes], manufacturer_data: Mapping[int, bytes]
) -> bytes:
    """The bytes ``fmt`` reads from an advertisement (empty if absent): what repeats are compared on."""
    if fmt == "ruuvi.rawv2":
        return manufacturer_data.get(RUUVI_COMPANY_ID, b"")
    return service_data.get(BTHOME_UUID if fmt == "bthome.v2" else ENVIRONMENTAL_SENSING_UUID, b"")
