"""BLE sensors as advertisement bytes: pure encoders for every format the BLE driver decodes, and a simulator.

``store-gateway simulate ble`` prints one JSON line per advertisement (address, RSSI, service data and
manufacturer data in hex, the shape bleak's ``AdvertisementData`` carries) for N fridge sensors: temperature
drifting around a setpoint, doors opening and closing, batteries slowly draining. There is no radio to
transmit on here; the lines feed tests, the demo, or a BLE peripheral tool on real hardware.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble.bthome import MIC_BYTES, UUID16
from drivers.ble.formats import BTHOME_UUID, ENVIRONMENTAL_SENSING_UUID, FORMATS, RUUVI_COMPANY_ID, BleFormat
from drivers.ble.xiaomi import AAD as PVVX_AAD
from drivers.ble.xiaomi import pvvx_nonce

BTHOME_INFO_PLAIN: Final = 0x40
BTHOME_INFO_ENCRYPTED: Final = 0x41


def bthome_objects(
    *,
    packet_id: int | None = None,
    battery_pct: int | None = None,
    temperature: float | None = None,
    humidity: float | None = None,
    door_open: bool | None = None,
) -> bytes:
    """BTHome v2 objects in ascending id order (0x00 packet id, 0x01 battery, 0x02 temperature, 0x03 humidity,
    0x1A door)."""
    out = bytearray()
    if packet_id is not None:
        out += bytes((0x00, packet_id & 0xFF))
    if battery_pct is not None:
        out += bytes((0x01, battery_pct))
    if temperature is not None:
        out += b"\x02" + struct.pack("<h", round(temperature * 100))
    if humidity is not None:
        out += b"\x03" + struct.pack("<H", round(humidity * 100))
    if door_open is not None:
        out += bytes((0x1A, int(door_open)))
    return bytes(out)


def bthome_plain(objects: bytes) -> bytes:
    """BTHome v2 service data, unencrypted."""
    return bytes((BTHOME_INFO_PLAIN,)) + objects


def bthome_encrypted(objects: bytes, mac: bytes, key: bytes, counter: int) -> bytes:
    """BTHome v2 service data encrypted with ``key`` (https://bthome.io/encryption/)."""
    info = bytes((BTHOME_INFO_ENCRYPTED,))
    count = struct.pack("<I", counter & 0xFFFFFFFF)
    sealed = AESCCM(key, tag_length=MIC_BYTES).encrypt(mac + UUID16 + info + count, objects, None)
    return info + sealed[:-MIC_BYTES] + count + sealed[-MIC_BYTES:]


def ruuvi_rawv2(
    mac: bytes,
    *,
    temperature: float,
    humidity: float,
    pressure_hpa: float,
    voltage: float,
    sequence: int,
    acceleration: tuple[float, float, float] = (0.0, 0.0, 1.0),
    tx_power_dbm: int = 4,
    movement: int = 0,
) -> bytes:
    """Ruuvi data format 5 manufacturer data (after the company id 0x0499)."""
    power = (round(voltage * 1000) - 1600) << 5 | ((tx_power_dbm + 40) // 2)
    ax, ay, az = (round(a * 1000) for a in acceleration)
    return struct.pack(
        ">BhHHhhhHBH6s",
        5,
        round(temperature / 0.005),
        round(humidity / 0.0025),
        round(pressure_hpa * 100) - 50_000,
        ax,
        ay,
        az,
        power,
        movement % 0xFF,  # 0xFF and 0xFFFF mean 'not available'
        sequence % 0xFFFF,
        mac,
    )


def atc1441(
    mac: bytes, *, temperature: float, humidity: int, battery_pct: int, millivolts: int, counter: int
) -> bytes:
    """ATC1441-format service data (after UUID 0x181A)."""
    return struct.pack(
        ">6shBBHB", mac, round(temperature * 10), humidity, battery_pct, millivolts, counter & 0xFF
    )


def pvvx_plain(
    mac: bytes,
    *,
    temperature: float,
    humidity: float,
    millivolts: int,
    battery_pct: int,
    counter: int,
    door_open: bool = False,
) -> bytes:
    """pvvx custom-format service data (after UUID 0x181A); flags bit 0 (the reed input) set while the door is
    open, as the firmware sends it (src/custom_beacon.c ``p->flags = trg.flg_byte``)."""
    return struct.pack(
        "<6shHHBBB",
        mac[::-1],
        round(temperature * 100),
        round(humidity * 100),
        millivolts,
        battery_pct,
        counter & 0xFF,
        int(door_open),
    )


def pvvx_encrypted(
    mac: bytes,
    key: bytes,
    *,
    temperature: float,
    humidity: float,
    battery_pct: int,
    counter: int,
    door_open: bool = False,
) -> bytes:
    """pvvx encrypted custom-format service data (11 bytes)."""
    plain = struct.pack("<hHBB", round(temperature * 100), round(humidity * 100), battery_pct, int(door_open))
    count = counter & 0xFF
    sealed = AESCCM(key, tag_length=4).encrypt(pvvx_nonce(mac, 11, count), plain, PVVX_AAD)
    return bytes((count,)) + sealed


@dataclass
class Advert:
    """One advertisement as bleak reports it."""

    address: str
    rssi: int
    service_data: dict[str, bytes] = field(default_factory=dict)
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)

    def to_bleak(self) -> tuple[BLEDevice, AdvertisementData]:
        """What bleak's BlueZ backend hands a detection callback for this advertisement."""
        data = AdvertisementData(
            local_name=None,
            manufacturer_data=dict(self.manufacturer_data),
            service_data=dict(self.service_data),
            service_uuids=list(self.service_data),
            tx_power=None,
            rssi=self.rssi,
            platform_data=(),
        )
        return BLEDevice(self.address, None, None), data

    def as_json(self) -> str:
        return json.dumps(
            {
                "address": self.address,
                "rssi": self.rssi,
                "service_data": {k: v.hex() for k, v in self.service_data.items()},
                "manufacturer_data": {str(k): v.hex() for k, v in self.manufacturer_data.items()},
            }
        )


DOOR_MODEL_MAX_DT_S: Final = 60.0
"""Above this step (simulated seconds per reading), a sensor's door is sampled rather than simulated."""


class SimulatedRadio:
    """A Bluetooth scanner with no radio behind it: the BLE driver's scanner factory for simulated stores.

    Starting and stopping always succeed; the advertisements come from the simulator, which hands their bytes
    to the driver's detection callback (the path bleak's scanner would use)."""

    def __init__(self, detection_callback: object = None, **_: object) -> None:
        self.detection_callback = detection_callback

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass
class SimulatedSensor:
    """A fridge sensor: temperature drifts around its setpoint (and climbs while the door is open)."""

    mac: bytes
    fmt: BleFormat
    key: bytes | None
    rng: random.Random
    setpoint: float = 4.0
    temperature: float = 4.0
    humidity: float = 60.0
    millivolts: float = 3000.0
    door_open: bool = False
    counter: int = 0

    @property
    def address(self) -> str:
        return self.mac.hex(":").upper()

    def follow(self, air: float, door_open: bool) -> None:
        """A logger inside a simulated cabinet: it reads the cabinet's air (with its own small noise)."""
        self.temperature = air + self.rng.gauss(0, 0.1)
        self.door_open = door_open
        self.humidity = min(99.0, max(20.0, self.humidity + self.rng.gauss(0, 0.2)))
        self.counter += 1

    def step(self, dt: float) -> None:
        """Advance the sensor's physics by ``dt`` seconds."""
        if dt > DOOR_MODEL_MAX_DT_S:
            # Compressed time: one reading stands for many minutes, so the door's minute-by-minute physics does
            # not apply. A reading catches the door open 5 % of the time, half a minute into the opening.
            self.door_open = self.rng.random() < 0.05
            bump = 0.1 * (18.0 - self.setpoint) if self.door_open else 0.0
            self.temperature = self.setpoint + bump + self.rng.gauss(0, 0.1)
            self.humidity = min(99.0, max(20.0, self.humidity + self.rng.gauss(0, 0.2)))
            self.millivolts = max(2000.0, self.millivolts - 0.0005 * dt)
            self.counter += 1
            return
        # Relaxation towards the room (door open) or the setpoint, stable for any dt (scenarios compress time).
        if self.door_open:
            self.temperature += min(1.0, 0.05 * dt / 14.0) * (18.0 - self.temperature)
            if self.rng.random() < dt / 30:
                self.door_open = False
        else:
            self.temperature += min(1.0, 0.02 * dt) * (self.setpoint - self.temperature) + self.rng.gauss(
                0, 0.02
            )
            if self.rng.random() < dt / 600:
                self.door_open = True
        self.humidity = min(99.0, max(20.0, self.humidity + self.rng.gauss(0, 0.2)))
        self.millivolts = max(2000.0, self.millivolts - 0.0005 * dt)
        self.counter += 1

    @property
    def battery_pct(self) -> int:
        return max(0, min(100, round((self.millivolts - 2200) / 8)))

    def advert(self) -> Advert:
        rssi = round(-60 + self.rng.gauss(0, 4))
        rssi = max(-100, min(-30, rssi))
        temp = round(self.temperature, 2)
        hum = round(self.humidity, 2)
        if self.fmt == "bthome.v2":
            objects = bthome_objects(
                packet_id=self.counter,
                battery_pct=self.battery_pct,
                temperature=temp,
                humidity=hum,
                door_open=self.door_open,
            )
            data = (
                bthome_plain(objects)
                if self.key is None
                else bthome_encrypted(objects, self.mac, self.key, self.counter)
            )
            return Advert(self.address, rssi, service_data={BTHOME_UUID: data})
        if self.fmt == "ruuvi.rawv2":
            data = ruuvi_rawv2(
                self.mac,
                temperature=temp,
                humidity=hum,
                pressure_hpa=1013.25,
                voltage=round(self.millivolts) / 1000,
                sequence=self.counter,
            )
            return Advert(self.address, rssi, manufacturer_data={RUUVI_COMPANY_ID: data})
        if self.fmt == "atc1441":
            data = atc1441(
                self.mac,
                temperature=temp,
                humidity=round(hum),
                battery_pct=self.battery_pct,
                millivolts=round(self.millivolts),
                counter=self.counter,
            )
        elif self.key is None:
            data = pvvx_plain(
                self.mac,
                temperature=temp,
                humidity=hum,
                millivolts=round(self.millivolts),
                battery_pct=self.battery_pct,
                counter=self.counter,
                door_open=self.door_open,
            )
        else:
            data = pvvx_encrypted(
                self.mac,
                self.key,
                temperature=temp,
                humidity=hum,
                battery_pct=self.battery_pct,
                counter=self.counter,
                door_open=self.door_open,
            )
        return Advert(self.address, rssi, service_data={ENVIRONMENTAL_SENSING_UUID: data})


def sensors(count: int, fmt: BleFormat, key: bytes | None, seed: int) -> list[SimulatedSensor]:
    """``count`` sensors with MACs A4:C1:38:00:00:01.. and setpoints between 2 and 6 °C."""
    rng = random.Random(seed)
    out = []
    for n in range(1, count + 1):
        setpoint = round(rng.uniform(2.0, 6.0), 1)
        mac = bytes.fromhex("A4C138") + n.to_bytes(3, "big")
        out.append(SimulatedSensor(mac, fmt, key, random.Random(seed + n), setpoint, setpoint))
    return out


def adverts(group: Sequence[SimulatedSensor], interval_s: float) -> Iterator[Advert]:
    """Round after round: each sensor steps ``interval_s`` and advertises once."""
    for _ in itertools.count():
        for sensor in group:
            sensor.step(interval_s)
            yield sensor.advert()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="store-gateway simulate ble", description=__doc__)
    parser.add_argument("--sensors", type=int, default=3, help="How many sensors (default 3).")
    parser.add_argument("--format", choices=FORMATS, default="bthome.v2", dest="fmt")
    parser.add_argument("--bindkey", help="32 hex digits: encrypt (bthome.v2 and pvvx only).")
    parser.add_argument("--interval", type=float, default=10.0, help="Seconds between rounds (default 10).")
    parser.add_argument("--count", type=int, default=0, help="Stop after this many adverts (0: run forever).")
    parser.add_argument("--fast", action="store_true", help="Do not sleep between rounds (simulated time).")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(list(argv))
    key = None
    if args.bindkey is not None:
        try:
            key = bytes.fromhex(args.bindkey)
        except ValueError:
            key = b""
        if len(key) != 16:
            parser.error("--bindkey must be 32 hex digits")
        if args.fmt not in ("bthome.v2", "pvvx"):
            parser.error("--bindkey works with --format bthome.v2 or pvvx")
    group = sensors(args.sensors, args.fmt, key, args.seed)
    sent = 0
    try:
        for advert in adverts(group, args.interval):
            print(advert.as_json(), flush=True)
            sent += 1
            if args.count and sent >= args.count:
                break
            if not args.fast and sent % len(group) == 0:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        sys.stderr.close()
    return 0
