"""The BLE driver on a real SQLite journal: real advertisement bytes through bleak's detection-callback path
(real ``BLEDevice`` and ``AdvertisementData`` objects), and the real scanner failing on a machine without D-Bus
or an adapter while the gateway runs on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import pytest
from bleak.args.bluez import BlueZScannerArgs
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback
from bleak.exc import BleakError
from ruamel.yaml import YAML

from drivers.base import DriverContext
from drivers.ble.config import BleDriverConfig
from drivers.ble.driver import RESYNC_AFTER_S, BleDriver, Scanner, ScannerFactory
from drivers.ble.formats import BTHOME_UUID, ENVIRONMENTAL_SENSING_UUID, RUUVI_COMPANY_ID
from drivers.devices import DeviceRegistry
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from simulators import ble as enc
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.driver_harness import query, running_journal
from tests.harness.e2e_helpers import load, poll_until, running_gateway, write_config

BTHOME_MAC = "54:48:E6:8F:80:A5"
BTHOME_KEY = "231d39c1d7cc1ab1aee224cd096db932"
# bthome-ble tests/test_parser_v2.py test_bindkey_correct: 25.06 °C, 50.55 %.
BTHOME_FRAME = bytes.fromhex("41a47266c95f730011223378237214")
RUUVI_MAC = "CB:B8:33:4C:88:4F"
# docs.ruuvi.com data format 5 "valid data" vector: 24.3 °C, sequence 205.
RUUVI_FRAME = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
ATC_MAC = "A4:C1:38:02:83:F4"
# custom-components/ble_monitor tests/test_atc_parser.py test_atc_atc1441: 16.2 °C, battery 95 %, packet 25.
ATC_FRAME = bytes.fromhex("a4c1380283f400a22f5f0bf819")
PVVX_MAC = "A4:C1:38:8D:18:B2"
PVVX_KEY = "b9ea895fac7eea6d30532432a516f3a3"
# ble_monitor tests/test_atc_parser.py test_atc_custom_encrypted: 23.45 °C, battery 61 %, packet 17.
PVVX_FRAME = bytes.fromhex("11d603fbfa7b6dfb1e26fd")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def advert(
    address: str,
    *,
    service: dict[str, bytes] | None = None,
    maker: dict[int, bytes] | None = None,
    rssi: int = -67,
) -> tuple[BLEDevice, AdvertisementData]:
    """What bleak's BlueZ backend hands the detection callback for one advertisement."""
    service = service or {}
    data = AdvertisementData(
        local_name=None,
        manufacturer_data=maker or {},
        service_data=service,
        service_uuids=list(service),
        tx_power=None,
        rssi=rssi,
        platform_data=(),
    )
    return BLEDevice(address, None, None), data


class StandInScanner:
    """Our own scanner seam (BleDriver's scanner_factory), for start failures no real adapter produces on cue."""

    def __init__(self, error: type[Exception] | None) -> None:
        self._error = error

    async def start(self) -> None:
        if self._error is not None:
            raise self._error("raised by the stand-in scanner")

    async def stop(self) -> None:
        return None


@dataclass
class Scanners:
    """A scanner factory: what each new scanner's start raises, by mode; the modes asked for, in order."""

    passive_error: type[Exception] | None = None
    active_error: type[Exception] | None = None
    made: list[str] = field(default_factory=list)

    def __call__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        *,
        scanning_mode: Literal["active", "passive"],
        bluez: BlueZScannerArgs,
    ) -> Scanner:
        self.made.append(scanning_mode)
        return StandInScanner(self.passive_error if scanning_mode == "passive" else self.active_error)


@dataclass
class Harness:
    driver: BleDriver
    ctx: DriverContext
    journal: Journal
    registry: DeviceRegistry
    metrics: Metrics
    clock: FakeClock
    db: Path

    def hear(self, address: str, **kwargs: Any) -> None:
        self.driver.on_advertisement(*advert(address, **kwargs))

    async def flush(self) -> None:
        """Quarantine the held garbage now (not in a second) and wait for the journal to write everything."""
        self.driver.flush_garbage()
        async with asyncio.timeout(20):
            await self.journal.flush()

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return query(self.db, sql, *params)

    def samples(self, device_id: str) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT body FROM events WHERE kind='sensor.sample' AND device_id=? ORDER BY seq", device_id
        )
        return [orjson.loads(body)["data"] for (body,) in rows]

    def statuses(self, device_id: str) -> list[str]:
        rows = self.rows(
            "SELECT body FROM events WHERE kind='device.status' AND device_id=? ORDER BY seq", device_id
        )
        return [orjson.loads(body)["data"]["status"] for (body,) in rows]

    def quarantine(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT device_id, reason, detail FROM quarantine ORDER BY qid")

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


DEVICES: list[dict[str, Any]] = [
    {"id": "fridge-bthome", "mac": BTHOME_MAC, "profile": "bthome-v2", "bindkey": BTHOME_KEY},
    {"id": "fridge-ruuvi", "mac": RUUVI_MAC, "profile": "ruuvi-rawv2"},
    {"id": "fridge-atc", "mac": ATC_MAC.lower(), "profile": "atc1441-lywsd03mmc"},
    {"id": "fridge-pvvx", "mac": PVVX_MAC, "profile": "pvvx-lywsd03mmc", "bindkey": PVVX_KEY},
]


@contextlib.asynccontextmanager
async def make_harness(
    tmp_path: Path,
    devices: list[dict[str, Any]],
    factory: dict[str, ScannerFactory] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Harness]:
    factory = factory or {}
    metrics = Metrics()
    db = tmp_path / "journal.db"
    config = load(write_config(tmp_path / "store.yaml", store_port=1, hq_port=1, data_dir=tmp_path / "data"))
    async with running_journal(db, metrics) as journal:
        clock = FakeClock()
        registry = DeviceRegistry(journal.submit, monotonic=clock)
        ctx = DriverContext(journal, metrics, registry, config)
        driver = BleDriver(BleDriverConfig(devices=devices, **kwargs), ctx, **factory)
        try:
            yield Harness(driver, ctx, journal, registry, metrics, clock, db)
        finally:
            driver.pause()


@pytest.fixture
async def ble(tmp_path: Path) -> AsyncIterator[Harness]:
    async with make_harness(tmp_path, DEVICES) as harness:
        yield harness


async def test_every_format_lands_in_the_journal_with_rssi_and_battery(ble: Harness) -> None:
    ble.hear(BTHOME_MAC, service={BTHOME_UUID: BTHOME_FRAME}, rssi=-71)
    ble.hear(RUUVI_MAC, maker={RUUVI_COMPANY_ID: RUUVI_FRAME})
    ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: ATC_FRAME})
    ble.hear(PVVX_MAC.lower(), service={ENVIRONMENTAL_SENSING_UUID: PVVX_FRAME}, rssi=-30)
    await ble.flush()
    [bthome] = ble.samples("fridge-bthome")
    assert bthome["values"] == {"temperature": 25.06, "humidity": 50.55}
    assert bthome["source"] == "bthome.v2"
    assert bthome["rssi_dbm"] == -71
    [ruuvi] = ble.samples("fridge-ruuvi")
    assert ruuvi["values"]["temperature"] == 24.3
    assert ruuvi["values"]["voltage"] == 2.977
    assert ruuvi["counter"] == 205
    [atc] = ble.samples("fridge-atc")
    assert atc["battery_pct"] == 95
    assert atc["counter"] == 25
    [pvvx] = ble.samples("fridge-pvvx")
    assert pvvx["values"]["temperature"] == 23.45
    assert pvvx["battery_pct"] == 61
    assert pvvx["rssi_dbm"] == -30
    for device_id in ("fridge-bthome", "fridge-ruuvi", "fridge-atc", "fridge-pvvx"):
        assert ble.statuses(device_id) == ["online"]
    assert ble.quarantine() == []


async def test_wrong_key_and_garbage_from_a_known_mac_are_quarantined_with_a_reason(tmp_path: Path) -> None:
    devices = [
        {"id": "wrong-key", "mac": BTHOME_MAC, "profile": "bthome-v2", "bindkey": "00" * 16},
        {"id": "garbage", "mac": RUUVI_MAC, "profile": "ruuvi-rawv2"},
        {"id": "downgrade", "mac": PVVX_MAC, "profile": "pvvx-lywsd03mmc", "bindkey": PVVX_KEY},
    ]
    async with make_harness(tmp_path, devices) as ble:
        ble.hear(BTHOME_MAC, service={BTHOME_UUID: BTHOME_FRAME})
        ble.hear(RUUVI_MAC, maker={RUUVI_COMPANY_ID: b"\x05\xde\xad\xbe\xef"})
        ble.hear(RUUVI_MAC, maker={RUUVI_COMPANY_ID: b"\x05\xde\xad\xbe\xef"})  # a repeat: skipped
        ble.hear(
            PVVX_MAC,
            service={
                ENVIRONMENTAL_SENSING_UUID: enc.pvvx_plain(
                    bytes.fromhex(PVVX_MAC.replace(":", "")),
                    temperature=4.0,
                    humidity=50.0,
                    millivolts=3000,
                    battery_pct=90,
                    counter=1,
                )
            },
        )
        await ble.flush()
        rows = ble.quarantine()
        assert [(device_id, reason) for device_id, reason, _ in rows] == [
            ("wrong-key", "decrypt_failed"),
            ("garbage", "bad_length"),
            ("downgrade", "not_encrypted"),
        ]
        assert "24 bytes" in rows[1][2]
        assert ble.rows("SELECT count(*) FROM events WHERE kind='sensor.sample'") == [(0,)]
        assert ble.registry.get("garbage") is not None
        garbage = ble.registry.get("garbage")
        assert garbage is not None
        assert garbage.health.quarantined == 1
        assert ble.metric("storegw_messages_duplicate_total", driver="ble") == 1


async def test_unknown_macs_are_counted_not_quarantined(ble: Harness) -> None:
    for n in range(50):
        ble.hear(f"11:22:33:44:55:{n:02X}", service={BTHOME_UUID: BTHOME_FRAME})
    ble.hear("4C:57:CA:00:00:01", maker={0x004C: b"\x10\x05\x01\x18"})  # a phone
    await ble.flush()
    assert ble.driver.unknown_heard == 51
    assert ble.metric("storegw_messages_dropped_total", driver="ble", reason="unknown_device") == 51
    assert ble.quarantine() == []
    assert ble.rows("SELECT count(*) FROM events") == [(0,)]


async def test_repeated_advertisements_make_one_event(ble: Harness) -> None:
    mac = bytes.fromhex(ATC_MAC.replace(":", ""))
    for rssi in range(-80, -70):  # BlueZ reports the same bytes again with each new RSSI
        ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: ATC_FRAME}, rssi=rssi)
    frame = enc.atc1441(mac, temperature=16.3, humidity=47, battery_pct=95, millivolts=3064, counter=26)
    ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: frame})
    await ble.flush()
    assert [s["counter"] for s in ble.samples("fridge-atc")] == [25, 26]
    assert ble.metric("storegw_messages_duplicate_total", driver="ble") == 9


async def test_min_interval_keeps_one_reading_per_interval(tmp_path: Path) -> None:
    devices = [{"id": "slow", "mac": ATC_MAC, "profile": "atc1441-lywsd03mmc", "min_interval_s": 60}]
    mac = bytes.fromhex(ATC_MAC.replace(":", ""))
    async with make_harness(tmp_path, devices) as ble:
        for n in range(30):  # a new measurement every 10 s for 5 minutes
            frame = enc.atc1441(mac, temperature=4.0, humidity=50, battery_pct=90, millivolts=3000, counter=n)
            ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: frame})
            ble.clock.now += 10
        await ble.flush()
        assert [s["counter"] for s in ble.samples("slow")] == [0, 6, 12, 18, 24]
        assert ble.metric("storegw_messages_dropped_total", driver="ble", reason="min_interval") == 25


async def test_a_flood_of_ten_times_the_rate_is_limited_counted_and_others_unaffected(tmp_path: Path) -> None:
    limits = {"rate_limit_per_s": 2, "rate_burst": 2}
    devices = [
        {"id": "noisy", "mac": ATC_MAC, "profile": "atc1441-lywsd03mmc", **limits},
        {"id": "calm", "mac": RUUVI_MAC, "profile": "ruuvi-rawv2", **limits},
    ]
    atc_mac = bytes.fromhex(ATC_MAC.replace(":", ""))
    ruuvi_mac = bytes.fromhex(RUUVI_MAC.replace(":", ""))
    async with make_harness(tmp_path, devices) as ble:
        # 20 new frames/s (10x the limit) for 3 s from one sensor, 1/s from the other.
        for step in range(60):
            frame = enc.atc1441(
                atc_mac, temperature=4.0, humidity=50, battery_pct=90, millivolts=3000, counter=step
            )
            ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: frame})
            if step % 20 == 0:
                calm = enc.ruuvi_rawv2(
                    ruuvi_mac, temperature=4.0, humidity=50.0, pressure_hpa=1013.0, voltage=3.0, sequence=step
                )
                ble.hear(RUUVI_MAC, maker={RUUVI_COMPANY_ID: calm})
            ble.clock.now += 0.05
        await ble.flush()
        noisy = ble.registry.get("noisy")
        assert noisy is not None
        taken = len(ble.samples("noisy"))
        assert 6 <= taken <= 9  # burst 2 + 2/s over 3 s
        assert noisy.health.rate_limited == 60 - taken
        assert ble.metric("storegw_messages_dropped_total", driver="ble", reason="rate_limited") == 60 - taken
        assert ble.statuses("noisy") == ["online", "rate_limited"]
        assert len(ble.samples("calm")) == 3
        assert ble.statuses("calm") == ["online"]


async def test_garbage_is_one_quarantine_row_per_device_per_second(tmp_path: Path) -> None:
    devices = [
        {"id": "broken", "mac": ATC_MAC, "profile": "atc1441-lywsd03mmc"},
        {"id": "mis-keyed", "mac": BTHOME_MAC, "profile": "bthome-v2", "bindkey": "00" * 16},
        {"id": "fine", "mac": RUUVI_MAC, "profile": "ruuvi-rawv2"},
    ]
    async with make_harness(tmp_path, devices) as ble:
        for n in range(100):
            ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: bytes([n]) * 5})
            ble.hear(BTHOME_MAC, service={BTHOME_UUID: BTHOME_FRAME[:-1] + bytes([n])})
        ble.hear(RUUVI_MAC, maker={RUUVI_COMPANY_ID: RUUVI_FRAME})
        # No explicit flush: the driver's own timer writes each device's row about a second later.
        await poll_until(
            lambda: len(ble.quarantine()) == 2, "one row per device", within=20, state=ble.quarantine
        )
        rows = {device_id: (reason, detail) for device_id, reason, detail in ble.quarantine()}
        assert rows["broken"][0] == "bad_length"
        assert rows["broken"][1].startswith("100 advertisement(s) that did not decode (100 bad_length)")
        assert "13 bytes, got 5" in rows["broken"][1]
        assert rows["mis-keyed"][0] == "decrypt_failed"
        assert ble.rows("SELECT size FROM quarantine WHERE device_id='broken'") == [(500,)]
        broken = ble.registry.get("broken")
        assert broken is not None
        assert broken.health.quarantined == 1
        # The next second's garbage is the next row; the good sensor was never held up.
        ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: b"\x01\x02"})
        await poll_until(lambda: len(ble.quarantine()) == 3, "a second row", within=20, state=ble.quarantine)
        assert len(ble.samples("fine")) == 1


async def test_replayed_encrypted_frames_are_dropped_and_counted(ble: Harness) -> None:
    mac = bytes.fromhex(BTHOME_MAC.replace(":", ""))
    key = bytes.fromhex(BTHOME_KEY)

    def bthome(counter: int, temperature: float) -> None:
        frame = enc.bthome_encrypted(enc.bthome_objects(temperature=temperature), mac, key, counter)
        ble.hear(BTHOME_MAC, service={BTHOME_UUID: frame})
        ble.clock.now += 10

    bthome(1000, 4.0)
    bthome(1001, 4.1)
    bthome(1000, 4.0)  # a recorded frame sent again
    bthome(1002, 4.2)
    await ble.flush()
    assert [s["counter"] for s in ble.samples("fridge-bthome")] == [1000, 1001, 1002]
    assert ble.metric("storegw_messages_dropped_total", driver="ble", reason="replayed") == 1
    assert ble.quarantine() == []
    # The sensor restarts (counter from 0): refused until its frames have been behind for RESYNC_AFTER_S.
    for counter in range(round(RESYNC_AFTER_S / 10) + 1):
        bthome(counter, 5.0 + counter / 100)
    await ble.flush()
    counters = [s["counter"] for s in ble.samples("fridge-bthome")]
    assert counters == [1000, 1001, 1002, round(RESYNC_AFTER_S / 10)]

    pvvx_mac = bytes.fromhex(PVVX_MAC.replace(":", ""))
    pvvx_key = bytes.fromhex(PVVX_KEY)

    def pvvx(counter: int) -> None:
        frame = enc.pvvx_encrypted(
            pvvx_mac, pvvx_key, temperature=4.0, humidity=50.0, battery_pct=90, counter=counter
        )
        ble.hear(PVVX_MAC, service={ENVIRONMENTAL_SENSING_UUID: frame})
        ble.clock.now += 10

    for counter in (250, 251, 4, 200, 3, 5):  # 4 and 5 are after the 8-bit wrap; 200 and 3 are behind
        pvvx(counter)
    await ble.flush()
    assert [s["counter"] for s in ble.samples("fridge-pvvx")] == [250, 251, 4, 5]
    assert ble.metric("storegw_messages_dropped_total", driver="ble", reason="replayed") == 1 + 12 + 2


async def test_a_silent_sensor_goes_offline(tmp_path: Path) -> None:
    devices = [
        {"id": "quiet", "mac": ATC_MAC, "profile": "atc1441-lywsd03mmc", "offline_after_s": 120},
        {"id": "chatty", "mac": RUUVI_MAC, "profile": "ruuvi-rawv2", "offline_after_s": 120},
    ]
    ruuvi_mac = bytes.fromhex(RUUVI_MAC.replace(":", ""))
    async with make_harness(tmp_path, devices) as ble:
        ble.hear(ATC_MAC, service={ENVIRONMENTAL_SENSING_UUID: ATC_FRAME})
        for n in range(14):  # chatty keeps talking every 10 s, quiet says nothing more
            ble.clock.now += 10
            frame = enc.ruuvi_rawv2(
                ruuvi_mac, temperature=4.0, humidity=50.0, pressure_hpa=1013.0, voltage=3.0, sequence=n
            )
            ble.hear(RUUVI_MAC, maker={RUUVI_COMPANY_ID: frame})
            for device in ble.registry:
                device.watch(ble.clock.now)
        await ble.flush()
        assert ble.statuses("quiet") == ["online", "offline"]
        assert ble.statuses("chatty") == ["online"]


async def test_no_adapter_is_one_clear_driver_error_and_the_gateway_runs(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    # This machine has no D-Bus system bus and no adapter: the real bleak scanner fails to start.
    api_port = free_port()
    path = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=tmp_path / "data",
        api_port=api_port,
    )
    yaml = YAML(typ="safe", pure=True)
    doc = yaml.load(path.read_text(encoding="utf-8"))
    doc["drivers"].append({"type": "ble", "name": "ble", "devices": DEVICES[:2]})
    with path.open("w", encoding="utf-8") as fh:
        yaml.dump(doc, fh)
    caplog.set_level(logging.WARNING, logger="drivers.ble.driver")
    async with running_gateway(load(path), wait_drivers=False) as gateway:
        await poll_until(
            lambda: "no Bluetooth adapter" in (gateway.health()["driver_errors"].get("ble") or ""),
            "the BLE driver to report the missing adapter",
            within=30,
            state=gateway.health,
        )
        await poll_until(
            lambda: gateway.health()["drivers"].get("store-mqtt") is True,
            "the MQTT intake to run beside it",
            within=30,
            state=gateway.health,
        )
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{api_port}/health", timeout=5)
        health = response.json()
        assert health["drivers"] == {"store-mqtt": True, "ble": False}
        assert "D-Bus" in health["driver_errors"]["ble"]
        # A device driver's trouble is reported, but the gateway itself is healthy (200, Docker keeps it).
        assert response.status_code == 200
        assert health["status"] == "ok"
        assert health["device_drivers_ok"] is False
    warnings = [r for r in caplog.records if "no Bluetooth adapter" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


@contextlib.asynccontextmanager
async def running(driver: BleDriver) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(driver.run(), name="ble-driver-under-test")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_unexpected_scanner_error_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scanners = Scanners(passive_error=AssertionError)  # what a bleak or dbus_fast bug would raise
    caplog.set_level(logging.DEBUG, logger="drivers.ble.driver")
    async with (
        make_harness(tmp_path, DEVICES[:1], {"scanner_factory": scanners}, retry_max_s=1) as ble,
        running(ble.driver) as task,
    ):
        await poll_until(lambda: len(scanners.made) >= 3, "three attempts to start", within=30)
        assert not task.done()
        state = ble.ctx.state("ble")
        assert not state.connected
        assert "AssertionError" in (state.error or "")
        scanners.passive_error = None
        await poll_until(lambda: ble.ctx.state("ble").connected, "the scanner to start", within=30)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert tracebacks[0].levelno == logging.ERROR
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == tracebacks
    assert any("is back" in r.getMessage() for r in caplog.records)


async def test_a_silent_restart_is_quiet_and_keeps_the_driver_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scanners = Scanners(passive_error=BleakError)  # BlueZ without the advertisement monitor
    caplog.set_level(logging.DEBUG, logger="drivers.ble.driver")
    async with make_harness(tmp_path, DEVICES[:1], {"scanner_factory": scanners}) as ble:
        ble.driver.silent_restart_s = 0.5
        seen: list[bool] = []
        async with running(ble.driver):
            await poll_until(lambda: ble.ctx.state("ble").connected, "the scanner to start", within=30)
            while scanners.made.count("active") < 4:  # dead sensors: nothing heard, restart after restart
                ble.clock.now += 1
                seen.append(ble.ctx.state("ble").connected)
                await asyncio.sleep(0.02)
            ble.hear(BTHOME_MAC, service={BTHOME_UUID: BTHOME_FRAME})
        assert all(seen)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert "passive scanning is not available" in warnings[0]
    assert "advertisements unavailable" in warnings[1]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum("scanning (active)" in m for m in infos) == 1
    assert any("advertisements is back" in m for m in infos)


async def test_opening_only_from_a_pvvx_with_a_reed_switch(tmp_path: Path) -> None:
    other_mac = "A4:C1:38:00:00:09"
    devices: list[dict[str, Any]] = [
        {"id": "door-fitted", "mac": ATC_MAC, "profile": "pvvx-lywsd03mmc", "reed_switch": True},
        {"id": "no-switch", "mac": other_mac, "profile": "pvvx-lywsd03mmc"},
    ]
    async with make_harness(tmp_path, devices) as ble:
        for address in (ATC_MAC, other_mac):
            frame = enc.pvvx_plain(
                bytes.fromhex(address.replace(":", "")),
                temperature=4.0,
                humidity=50.0,
                millivolts=3000,
                battery_pct=90,
                counter=1,
                door_open=True,
            )
            ble.hear(address, service={ENVIRONMENTAL_SENSING_UUID: frame})
        await ble.flush()
        assert ble.samples("door-fitted")[0]["values"]["opening"] == 1
        assert "opening" not in ble.samples("no-switch")[0]["values"]
    with pytest.raises(ValueError, match="reed_switch"):
        BleDriverConfig(devices=[{"id": "x", "mac": BTHOME_MAC, "profile": "bthome-v2", "reed_switch": True}])
