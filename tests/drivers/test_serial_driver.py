"""The serial driver against real pseudo-terminals (os.openpty): a simulated Chafon reader and scales on the
master side, the driver on the slave side through a symlink standing in for /dev/serial/by-id/..., a real
SQLite journal. Covers normal operation, unplug/replug without restart, timeouts, garbage and a flood."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from drivers.base import DriverContext
from drivers.devices import DeviceRegistry
from drivers.epc import encode_sgtin96
from drivers.serial.config import SerialDriverConfig
from drivers.serial.driver import GARBAGE_REPORT_S, NOT_ANSWERING, SerialDriver
from gateway.config import GatewayConfig
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from simulators.rfid_reader import PtyReader, TagField
from tests.harness.driver_harness import query, running_journal
from tests.harness.e2e_helpers import poll_until

GTIN = "80614141123458"  # GS1 TDS worked example (company prefix 0614141)
EPCS = [encode_sgtin96(GTIN, serial, 7, 3) for serial in (6789, 6790, 6791)]


@dataclass
class Harness:
    journal: Journal
    ctx: DriverContext
    db: Path
    tmp: Path

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return query(self.db, sql, *params)

    def events(self, kind: str, device_id: str) -> list[dict[str, Any]]:
        rows = self.rows("SELECT body FROM events WHERE kind=? AND device_id=? ORDER BY seq", kind, device_id)
        return [orjson.loads(body)["data"] for (body,) in rows]

    def quarantine(self, device_id: str) -> list[tuple[str, str, int]]:
        return [
            (str(r), str(d), int(s))
            for r, d, s in self.rows(
                "SELECT reason, detail, size FROM quarantine WHERE device_id=? ORDER BY qid", device_id
            )
        ]

    def driver(self, devices: list[dict[str, Any]], **extra: Any) -> SerialDriver:
        config = SerialDriverConfig.model_validate(
            {"type": "serial", "name": "serial", "reopen_backoff_cap_s": 0.5, "devices": devices, **extra}
        )
        return SerialDriver(config, self.ctx)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    metrics = Metrics()
    db = tmp_path / "journal.db"
    config = GatewayConfig.model_validate(
        {
            "gateway_id": "gw-1",
            "store": {"id": "hk-0042", "name": "Test store", "timezone": "Asia/Hong_Kong"},
            "hq": {"host": "127.0.0.1", "port": 1},
            "api": {"enabled": False},
            "data_dir": str(tmp_path),
        }
    )
    async with running_journal(db, metrics) as journal:
        ctx = DriverContext(journal, metrics, DeviceRegistry(journal.submit), config)
        yield Harness(journal, ctx, db, tmp_path)


@contextlib.asynccontextmanager
async def running(driver: SerialDriver) -> AsyncIterator[SerialDriver]:
    task = asyncio.create_task(driver.run(), name="serial-driver-under-test")
    try:
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def reader(link: Path, epcs: list[bytes]) -> Iterator[PtyReader]:
    field = TagField(epcs, present_ratio=1.0)
    sim = PtyReader(field, link=link)
    sim.open()
    try:
        yield sim
    finally:
        sim.close()


class LinePeer:
    """A line device (scale, scanner) on the master side of a pty, reached through a symlink."""

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        link.symlink_to(os.ttyname(self.slave))
        self.link = link

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)
        self.link.unlink()


def rfid_device(link: Path, **extra: Any) -> dict[str, Any]:
    return {
        "id": "rfid-1",
        "port": str(link),
        "profile": "chafon-cf-ru5102",
        "poll_interval_s": 0.05,
        "response_timeout_s": 0.3,
        "window_s": 0.3,
        "depart_after_s": 0.6,
        **extra,
    }


async def flushed(harness: Harness) -> None:
    async with asyncio.timeout(20):
        await harness.journal.flush()


async def test_reader_inventories_with_gtins_and_departures(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon_CF-RU5102-if00-port0"
    with reader(link, EPCS) as sim:
        async with running(harness.driver([rfid_device(link)])):

            async def inventories() -> list[dict[str, Any]]:
                await flushed(harness)
                return harness.events("rfid.inventory", "rfid-1")

            await poll_until(lambda: _any(inventories(), lambda i: bool(i.get("tags"))), "a first inventory")
            first = next(i for i in await inventories() if i.get("tags"))
            assert sorted(t["epc"] for t in first["tags"]) == sorted(e.hex().upper() for e in EPCS)
            assert {t["gtin"] for t in first["tags"]} == {GTIN}
            assert {t["serial"] for t in first["tags"]} == {"6789", "6790", "6791"}
            assert sorted(first["appeared"]) == sorted(e.hex().upper() for e in EPCS)
            sim.field.present.discard(EPCS[0])
            gone = EPCS[0].hex().upper()
            await poll_until(
                lambda: _any(inventories(), lambda i: gone in i.get("departed", [])), "the tag departs"
            )
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    # The reader answered throughout: no error was ever counted, and it ends online.
    assert device.health.errors == 0
    assert device.health.last_error is None
    assert device.health.status == "online"


async def _any(rows: Any, predicate: Any) -> bool:
    return any(predicate(r) for r in await rows)


async def test_unplug_and_replug_reopens_without_restart(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    driver = harness.driver([rfid_device(link)])
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    state = harness.ctx.state("serial")
    with reader(link, EPCS) as sim:
        async with running(driver):
            await poll_until(lambda: device.health.status == "online", "the reader online")
            assert state.connected
            sim.close()  # the USB adapter is pulled: the pty and its by-id link vanish
            await poll_until(lambda: device.health.status == "error", "the device reported failing")
            assert not state.connected
            assert state.error is not None
            assert "rfid-1" in state.error
            assert device.health.errors >= 1
            before = len(harness.events("rfid.inventory", "rfid-1"))
            sim.open()  # plugged back: a new pty behind the same link
            await poll_until(lambda: state.connected, "the port reopened", within=20)
            await poll_until(lambda: device.health.status == "online", "the reader back online", within=20)

            async def more() -> bool:
                await flushed(harness)
                return len(harness.events("rfid.inventory", "rfid-1")) > before

            await poll_until(more, "inventories after the replug")
    await flushed(harness)
    statuses = [s["status"] for s in harness.events("device.status", "rfid-1")]
    assert statuses[:3] == ["online", "error", "online"]


async def test_a_reader_that_stops_answering_is_an_error_after_n_timeouts(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    driver = harness.driver([rfid_device(link, error_after_timeouts=3, response_timeout_s=0.1)])
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    with reader(link, EPCS) as sim:
        async with running(driver):
            await poll_until(lambda: device.health.status == "online", "the reader online")
            sim.answering = False
            await poll_until(lambda: device.health.status == "error", "the reader reported silent")
            port = driver.ports[0]
            assert port.timeouts >= 3
            assert device.health.last_error == NOT_ANSWERING
            assert harness.ctx.state("serial").connected  # the port itself is fine
            sim.answering = True
            await poll_until(lambda: device.health.status == "online", "the reader answering again")


async def test_a_silent_reader_is_reported_once_however_long_it_stays_silent(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    # depart_after_s long: this test is about status events, not departures.
    device_config = rfid_device(link, error_after_timeouts=2, response_timeout_s=0.1, depart_after_s=60)
    driver = harness.driver([device_config])
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    port = driver.ports[0]
    with reader(link, EPCS) as sim:
        async with running(driver):
            await poll_until(lambda: device.health.status == "online", "the reader online")
            await flushed(harness)
            # A busy machine may have made an answer late before: count from the silence on.
            before = len(harness.events("device.status", "rfid-1"))
            sim.answering = False
            await poll_until(lambda: port.consecutive_timeouts >= 8, "eight polls unanswered")
            assert device.health.status == "error"
            assert device.health.errors >= 8 - 2 + 1  # the running count: one per poll from the limit on
            assert device.health.last_error == NOT_ANSWERING
    await flushed(harness)
    statuses = [s["status"] for s in harness.events("device.status", "rfid-1")][before:]
    assert statuses == ["error"]


async def test_garbage_is_quarantined_aggregated_and_reads_go_on(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    driver = harness.driver([rfid_device(link)])
    with reader(link, EPCS) as sim:
        sim.garbage = bytes(range(0xF0, 0x100)) * 4 + b"\x05\x00\x01\xfb\x00\x00"  # noise and a bad CRC
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with running(driver):

            async def quarantined() -> bool:
                await flushed(harness)
                return len(harness.quarantine("rfid-1")) >= 2

            await poll_until(quarantined, "garbage quarantined")

            async def inventories() -> bool:
                await flushed(harness)
                return any(i.get("tags") for i in harness.events("rfid.inventory", "rfid-1"))

            await poll_until(inventories, "inventories despite the garbage")
            commands = sim.commands
        elapsed = loop.time() - started  # the driver is stopped: its last entry is flushed
    await flushed(harness)
    rows = harness.quarantine("rfid-1")
    # At most one entry per GARBAGE_REPORT_S (plus the one flushed when the port closes), however many
    # garbage runs came (one per answer), each entry counting several of them.
    assert len(rows) <= elapsed // GARBAGE_REPORT_S + 1
    assert commands > 2 * len(rows)
    assert all("bytes that did not decode" in detail for _, detail, _ in rows)
    assert sum(size for _, _, size in rows) >= len(rows) * len(sim.garbage)


async def test_a_flood_is_rate_limited_counted_and_other_devices_unaffected(harness: Harness) -> None:
    noisy = LinePeer(harness.tmp / "usb-scale-noisy")
    quiet = LinePeer(harness.tmp / "usb-scale-quiet")
    # A pty refuses 7E1 (termios EINVAL): the line settings of the profile are overridden to 8N1.
    limits = {"rate_limit_per_s": 10, "rate_burst": 10, "bytesize": 8, "parity": "N"}
    devices = [
        {"id": "scale-noisy", "port": str(noisy.link), "profile": "scale-line", **limits},
        {"id": "scale-quiet", "port": str(quiet.link), "profile": "scale-line", **limits},
    ]
    driver = harness.driver(devices)
    registry = harness.ctx.devices
    sent = 0
    try:
        async with running(driver):
            await poll_until(lambda: harness.ctx.state("serial").connected, "both ports open")
            for step in range(10):  # 100 lines/s for about a second: 10x the limit
                noisy.write(b"".join(b"ST,GS,+0001.%03d kg\r\n" % (step * 10 + n) for n in range(10)))
                sent += 10
                if step % 2 == 0:
                    quiet.write(b"ST,GS,+0002.%03d kg\r\n" % step)
                await asyncio.sleep(0.1)
            noisy.write(b"US,GS,+0009.000 kg\r\n")  # unstable: not emitted

            def counted() -> bool:
                loud = registry.get("scale-noisy")
                calm = registry.get("scale-quiet")
                assert loud is not None
                assert calm is not None
                return loud.health.messages + loud.health.rate_limited == sent and calm.health.messages == 5

            await poll_until(counted, "every line counted")
    finally:
        noisy.close()
        quiet.close()
    loud, calm = registry.get("scale-noisy"), registry.get("scale-quiet")
    assert loud is not None
    assert calm is not None
    assert loud.health.rate_limited > 0
    assert loud.health.status == "rate_limited"
    assert calm.health.rate_limited == 0
    assert calm.health.status == "online"
    await flushed(harness)
    samples = harness.events("sensor.sample", "scale-quiet")
    assert [s["values"]["weight"] for s in samples] == [2.0, 2.002, 2.004, 2.006, 2.008]
    assert samples[0]["units"] == {"weight": "kg"}
    assert "rate_limited" in [s["status"] for s in harness.events("device.status", "scale-noisy")]


async def test_barcode_scans_become_barcode_scanned_events(harness: Harness) -> None:
    scanner = LinePeer(harness.tmp / "usb-scanner")
    driver = harness.driver(
        [{"id": "scanner-1", "port": str(scanner.link), "profile": "barcode-scanner-line"}]
    )
    try:
        async with running(driver):
            await poll_until(lambda: harness.ctx.state("serial").connected, "the port open")
            # ]E0: AIM symbology identifier of EAN-13 (ISO/IEC 15424); 4899999000018 has a valid GS1 check digit.
            scanner.write(b"]E04899999000018\r\nABC-123\r\n\x01\x02\r\n")

            async def scanned() -> bool:
                await flushed(harness)
                return len(harness.events("barcode.scanned", "scanner-1")) == 2

            await poll_until(scanned, "both scans committed")

            async def quarantined() -> bool:
                await flushed(harness)
                return len(harness.quarantine("scanner-1")) == 1

            await poll_until(quarantined, "the non-printable line quarantined")
    finally:
        scanner.close()
    scans = harness.events("barcode.scanned", "scanner-1")
    assert scans == [{"code": "4899999000018", "gtin": "04899999000018"}, {"code": "ABC-123"}]
    assert harness.quarantine("scanner-1")[0][0] == "bad_barcode"


def _departed(inventories: list[dict[str, Any]]) -> set[str]:
    return {epc for i in inventories for epc in i.get("departed", [])}


async def test_a_silent_reader_departs_no_tags_and_is_not_flipped_online(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    device_config = rfid_device(
        link, error_after_timeouts=2, response_timeout_s=0.25, window_s=0.2, depart_after_s=0.3
    )
    driver = harness.driver([device_config])
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    port = driver.ports[0]

    async def inventories() -> list[dict[str, Any]]:
        await flushed(harness)
        return harness.events("rfid.inventory", "rfid-1")

    with reader(link, EPCS) as sim:
        async with running(driver):
            await poll_until(lambda: _any(inventories(), lambda i: bool(i.get("tags"))), "a first inventory")
            sim.answering = False
            await poll_until(lambda: device.health.status == "error", "the reader reported silent")
            silent_since = len(await inventories())
            # Silent for many times depart_after_s: every tag is unread for that long.
            await poll_until(lambda: port.consecutive_timeouts >= 20, "twenty polls unanswered")
            assert len(await inventories()) == silent_since
            assert device.health.status == "error"
            sim.answering = True
            commands = sim.commands

            async def answered_for_a_while() -> bool:
                return len(await inventories()) >= silent_since + 4 and sim.commands >= commands + 20

            await poll_until(answered_for_a_while, "inventories after the reader answers again")
    rows = await inventories()
    assert _departed(rows) == set()
    statuses = [s["status"] for s in harness.events("device.status", "rfid-1")]
    assert statuses == ["online", "error", "online"]


async def test_after_a_reopen_only_tags_really_gone_depart(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    device_config = rfid_device(link, response_timeout_s=0.05, window_s=0.2, depart_after_s=0.4)
    driver = harness.driver([device_config])
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    port = driver.ports[0]
    stays, leaves = EPCS[0].hex().upper(), EPCS[1].hex().upper()

    async def inventories() -> list[dict[str, Any]]:
        await flushed(harness)
        return harness.events("rfid.inventory", "rfid-1")

    with reader(link, EPCS) as sim:
        async with running(driver):
            await poll_until(lambda: _any(inventories(), lambda i: bool(i.get("tags"))), "a first inventory")
            sim.close()
            await poll_until(lambda: not port.open, "the port lost")
            await asyncio.sleep(0.5)  # unplugged longer than depart_after_s
            sim.field.present.discard(EPCS[1])
            sim.answering = False  # a reader that takes a few polls to answer after power-up
            timeouts = port.timeouts
            sim.open()
            await poll_until(lambda: port.timeouts >= timeouts + 5, "five polls unanswered after the replug")
            sim.answering = True
            await poll_until(
                lambda: _any(inventories(), lambda i: leaves in i.get("departed", [])), "departs"
            )
    assert _departed(await inventories()) == {leaves}
    assert stays not in _departed(await inventories())


@contextlib.asynccontextmanager
async def watchdog(registry: DeviceRegistry) -> AsyncIterator[None]:
    task = asyncio.create_task(registry.run(), name="device-watchdog-under-test")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_idle_scanner_on_an_open_port_and_a_reader_with_no_tags_stay_online(
    harness: Harness,
) -> None:
    scanner = LinePeer(harness.tmp / "usb-scanner")
    link = harness.tmp / "usb-Chafon-if00"
    quick = {"offline_after_s": 0.3}
    driver = harness.driver(
        [
            {"id": "scanner-1", "port": str(scanner.link), "profile": "barcode-scanner-line", **quick},
            rfid_device(link, **quick),
        ]
    )
    registry = harness.ctx.devices
    idle, empty = registry.get("scanner-1"), registry.get("rfid-1")
    assert idle is not None
    assert empty is not None
    try:
        with reader(link, []) as sim:
            async with watchdog(registry), running(driver):
                await poll_until(lambda: sim.commands >= 3, "the empty field polled")
                await asyncio.sleep(1.2)  # four times offline_after_s without a scan or a tag
                assert idle.health.status == "online"
                assert empty.health.status == "online"
                assert idle.health.messages == 0
    finally:
        scanner.close()
    await flushed(harness)
    assert [s["status"] for s in harness.events("device.status", "scanner-1")] == ["online"]
    assert [s["status"] for s in harness.events("device.status", "rfid-1")] == ["online"]


async def test_windows_not_taken_are_merged_so_a_departure_is_not_lost(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    # Windows every 0.1 s, one inventory per second taken: most windows are rate-limited.
    device_config = rfid_device(link, window_s=0.1, depart_after_s=0.3, rate_limit_per_s=1, rate_burst=1)
    driver = harness.driver([device_config])
    gone = EPCS[2].hex().upper()

    async def inventories() -> list[dict[str, Any]]:
        await flushed(harness)
        return harness.events("rfid.inventory", "rfid-1")

    with reader(link, EPCS) as sim:
        async with running(driver):
            await poll_until(lambda: _any(inventories(), lambda i: bool(i.get("appeared"))), "tags appear")
            sim.field.present.discard(EPCS[2])
            await poll_until(lambda: _any(inventories(), lambda i: gone in i.get("departed", [])), "departs")
    device = harness.ctx.devices.get("rfid-1")
    assert device is not None
    assert device.health.rate_limited > 0
    rows = await inventories()
    assert sorted({e for i in rows for e in i.get("appeared", [])}) == sorted(e.hex().upper() for e in EPCS)


async def test_a_streaming_scale_sends_a_reading_once_until_it_changes(harness: Harness) -> None:
    scale = LinePeer(harness.tmp / "usb-scale")
    line = {"bytesize": 8, "parity": "N"}  # a pty refuses 7E1
    driver = harness.driver([{"id": "scale-1", "port": str(scale.link), "profile": "scale-line", **line}])
    device = harness.ctx.devices.get("scale-1")
    assert device is not None
    try:
        async with running(driver):
            await poll_until(lambda: harness.ctx.state("serial").connected, "the port open")
            # Stream mode, A&D standard format (no GS/NT field): the same weight over and over, a wobble, a
            # new weight, then overload.
            scale.write(b"ST,+00123.45  g\r\n" * 20)
            scale.write(b"US,+00130.00  g\r\nST,+00123.45  g\r\nST,+00500.00  g\r\n" * 3)
            scale.write(b"OL,+9999999E+19\r\n")

            async def done() -> bool:
                await flushed(harness)
                return len(harness.events("sensor.sample", "scale-1")) >= 2 and bool(
                    harness.quarantine("scale-1")
                )

            await poll_until(done, "the readings and the overload")
    finally:
        scale.close()
    await flushed(harness)
    weights = [s["values"]["weight"] for s in harness.events("sensor.sample", "scale-1")]
    # 20 identical lines: one sample; unstable lines are skipped; each change of weight is one sample.
    assert weights == [0.12345, 0.5] * 3
    assert harness.quarantine("scale-1")[0][0] == "overload"


async def test_a_large_inventory_arrives_whole(harness: Harness) -> None:
    link = harness.tmp / "usb-Chafon-if00"
    many = [encode_sgtin96(GTIN, serial, 7, 3) for serial in range(1, 1201)]  # ~19 kB of answers per poll
    driver = harness.driver([rfid_device(link, poll_interval_s=0.2, response_timeout_s=2, window_s=0.5)])
    expected = {e.hex().upper() for e in many}

    async def appeared() -> set[str]:
        await flushed(harness)
        return {e for i in harness.events("rfid.inventory", "rfid-1") for e in i.get("appeared", [])}

    with reader(link, many):
        async with running(driver):

            async def whole() -> bool:
                return await appeared() == expected

            await poll_until(whole, "every tag of the field", within=20)
    assert harness.quarantine("rfid-1") == []
