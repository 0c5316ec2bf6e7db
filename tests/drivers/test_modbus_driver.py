"""The Modbus driver against real pymodbus servers: the fridge simulator over TCP on a free loopback port
and over RTU on a pseudo-terminal pair, with a real SQLite journal behind the driver.

Covered: values match the server's registers (negative temperatures, a not-fitted probe's sentinel as a
fault), the server stopped and restarted on the same port (error, then online, without restarting the
driver), a unit that does not answer and a link where nothing answers, garbage on the RTU line, a device
polled 10x faster than its rate limit, writes landing in the server's datastore, the bytes on the RTU
wire, and the simulator's dynamics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from drivers.base import DriverContext, DriverError
from drivers.devices import DeviceRegistry
from drivers.modbus.config import ModbusDriverConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.registers import WriteRefusedError
from drivers.profiles import PROFILES_ENV
from gateway.config import GatewayConfig
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from simulators.fridge import FridgeModel, FridgeServer, PtyLine
from tests.harness.brokers import free_port
from tests.harness.driver_harness import running_journal

FAST = {"temperatures": 0.1, "alarms": 0.1, "parameters": 0.2}
WITHIN_S = 20.0


def gateway_config() -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway_id": "gw-1",
            "store": {"id": "hk-0042", "name": "Modbus test store", "timezone": "Asia/Hong_Kong"},
            "store_broker": {"host": "127.0.0.1", "port": 1883},
            "hq": {"host": "127.0.0.1", "port": 1883},
            "api": {"enabled": False},
        }
    )


@dataclass
class Rig:
    ctx: DriverContext
    journal: Journal
    db: Path
    tasks: list[asyncio.Task[None]]

    def start(self, config: dict[str, Any]) -> ModbusDriver:
        driver = ModbusDriver(ModbusDriverConfig.model_validate(config), self.ctx)
        self.tasks.append(asyncio.create_task(driver.run(), name=f"driver-{driver.name}"))
        return driver

    async def stop_drivers(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    def status(self, device_id: str) -> str:
        device = self.ctx.devices.get(device_id)
        assert device is not None
        return device.health.status

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        async with asyncio.timeout(WITHIN_S):
            await self.journal.flush()
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            return db.execute(sql, params).fetchall()

    async def samples(self, device_id: str) -> list[dict[str, Any]]:
        rows = await self.rows(
            "SELECT body FROM events WHERE kind='sensor.sample' AND device_id=? ORDER BY seq", device_id
        )
        return [orjson.loads(body)["data"] for (body,) in rows]

    async def statuses(self, device_id: str) -> list[str]:
        rows = await self.rows(
            "SELECT body FROM events WHERE kind='device.status' AND device_id=? ORDER BY seq", device_id
        )
        return [orjson.loads(body)["data"]["status"] for (body,) in rows]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    metrics = Metrics()
    db = tmp_path / "journal.db"
    async with running_journal(db, metrics) as journal:
        ctx = DriverContext(journal, metrics, DeviceRegistry(journal.submit), gateway_config())
        rig = Rig(ctx, journal, db, [])
        try:
            yield rig
        finally:
            await rig.stop_drivers()


async def until(condition: Callable[[], bool], what: str, within: float = WITHIN_S) -> None:
    """Poll for a condition (never a timed assert)."""
    try:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 - polling a condition under a deadline
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not within {within} s: {what}")


async def until_async(condition: Callable[[], Any], what: str, within: float = WITHIN_S) -> None:
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110 - polling a condition under a deadline
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {within} s: {what}")


def tcp_config(port: int, devices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "modbus",
        "name": "fridges",
        "transport": "tcp",
        "host": "127.0.0.1",
        "port": port,
        "timeout_s": 0.3,
        "retries": 1,
        "retry_backoff_s": 0.01,
        "reconnect_max_s": 0.5,
        "devices": devices,
        **extra,
    }


def fridge(device_id: str, unit: int, **extra: Any) -> dict[str, Any]:
    """A fast-polled fridge; its rate limit is far above FAST's ~25 samples/s (the flood test sets its own)."""
    limits = {"rate_limit_per_s": 10_000, "rate_burst": 10_000}
    return {"id": device_id, "unit": unit, "profile": "dixell-xr", "poll_intervals": FAST, **limits, **extra}


@pytest.fixture
async def tcp_server() -> AsyncIterator[FridgeServer]:
    models = {
        1: FridgeModel(air=3.7, evaporator_fitted=False),
        2: FridgeModel(air=-18.5, evaporator=-25.3, setpoint=-20.0),
    }
    server = FridgeServer([1, 2], speed=0.0, models=models)
    await server.start_tcp("127.0.0.1", free_port())
    try:
        yield server
    finally:
        await server.stop()


def server_port(server: FridgeServer) -> int:
    assert server.server is not None
    address = server.server.comm_params.source_address
    assert address is not None
    return int(address[1])


async def test_polled_values_match_the_server_registers(rig: Rig, tcp_server: FridgeServer) -> None:
    driver = rig.start(tcp_config(server_port(tcp_server), [fridge("fridge-1", 1), fridge("freezer-1", 2)]))

    async def both_polled() -> bool:
        done = []
        for device_id in ("fridge-1", "freezer-1"):
            metrics = set().union(*(s["values"].keys() for s in await rig.samples(device_id)))
            done.append({"air_temperature", "setpoint", "door_open"} <= metrics)
        return all(done)

    await until_async(both_polled, "a sample of every group from both devices")
    freezer = next(s for s in await rig.samples("freezer-1") if "air_temperature" in s["values"])
    assert freezer["values"]["air_temperature"] == -18.5  # int16 0xFF47 x 0.1
    assert freezer["values"]["evaporator_temperature"] == -25.3
    assert freezer["units"]["air_temperature"] == "°C"
    assert freezer["source"] == "dixell-xr"
    fridge_sample = next(s for s in await rig.samples("fridge-1") if "air_temperature" in s["values"])
    assert fridge_sample["values"]["air_temperature"] == 3.7
    assert "evaporator_temperature" not in fridge_sample["values"]
    assert fridge_sample["faults"]["evaporator_temperature"].startswith("probe fault or not fitted")
    alarms = next(s for s in await rig.samples("fridge-1") if "probe2_fault" in s["values"])
    assert alarms["values"]["probe2_fault"] == 1.0
    params = next(s for s in await rig.samples("freezer-1") if "setpoint" in s["values"])
    assert params["values"]["setpoint"] == -20.0
    assert rig.status("fridge-1") == "online"
    assert rig.ctx.states["fridges"].connected
    assert driver.stats.timeouts == 0


async def test_server_stopped_and_restarted_on_the_same_port(rig: Rig) -> None:
    port = free_port()
    server = FridgeServer([1], speed=0.0)
    await server.start_tcp("127.0.0.1", port)
    driver = rig.start(tcp_config(port, [fridge("fridge-1", 1)]))
    try:
        await until(lambda: rig.status("fridge-1") == "online", "online")
        await server.stop()
        await until(lambda: rig.status("fridge-1") == "error", "error while the server is down")
        await until(lambda: not rig.ctx.states["fridges"].connected, "driver state disconnected")
        before = len(await rig.samples("fridge-1"))
        server = FridgeServer([1], speed=0.0)
        await server.start_tcp("127.0.0.1", port)
        await until(lambda: rig.status("fridge-1") == "online", "online again after the restart")

        async def new_samples() -> bool:
            return len(await rig.samples("fridge-1")) > before

        await until_async(new_samples, "samples after the restart")
    finally:
        await server.stop()
    statuses = await rig.statuses("fridge-1")
    assert statuses[:3] == ["online", "error", "online"]
    assert driver.stats.reconnects >= 1
    assert rig.ctx.states["fridges"].connected


async def test_a_silent_unit_times_out_and_the_other_is_unaffected(
    rig: Rig, tcp_server: FridgeServer
) -> None:
    driver = rig.start(tcp_config(server_port(tcp_server), [fridge("fridge-1", 1), fridge("freezer-1", 2)]))
    await until(lambda: rig.status("freezer-1") == "online", "freezer online")
    tcp_server.muted.add(2)
    await until(lambda: rig.status("freezer-1") == "error", "freezer error while it does not answer")
    device = rig.ctx.devices.get("freezer-1")
    assert device is not None
    assert "no response from unit 2" in (device.health.last_error or "")
    before = len(await rig.samples("fridge-1"))

    async def fridge_goes_on() -> bool:
        return len(await rig.samples("fridge-1")) > before + 5

    await until_async(fridge_goes_on, "the other device keeps being polled")
    assert rig.status("fridge-1") == "online"
    tcp_server.muted.discard(2)
    await until(lambda: rig.status("freezer-1") == "online", "freezer online once it answers again")
    assert driver.stats.timeouts > 0
    assert driver.stats.retries > 0


async def test_a_link_where_nothing_answers_is_rebuilt(rig: Rig, tcp_server: FridgeServer) -> None:
    driver = rig.start(tcp_config(server_port(tcp_server), [fridge("fridge-1", 1), fridge("freezer-1", 2)]))
    await until(lambda: rig.status("fridge-1") == "online", "online")
    tcp_server.muted.update({1, 2})  # a hung TCP gateway: connected, silent
    await until(lambda: driver.stats.reconnects >= 1, "the client is closed and rebuilt")
    await until(lambda: rig.status("fridge-1") == "error", "error")
    tcp_server.muted.clear()
    await until(lambda: rig.status("fridge-1") == "online", "online again")
    await until(lambda: rig.status("freezer-1") == "online", "freezer online again")


async def test_a_device_polled_ten_times_its_rate_is_limited_and_counted(
    rig: Rig, tcp_server: FridgeServer
) -> None:
    # Misconfigured: three groups every 20 ms (150 samples/s) against a limit of 15 samples/s.
    flood = fridge(
        "fridge-1",
        1,
        poll_intervals={"temperatures": 0.02, "alarms": 0.02, "parameters": 0.02},
        rate_limit_per_s=15,
        rate_burst=5,
    )
    rig.start(tcp_config(server_port(tcp_server), [flood, fridge("freezer-1", 2)]))
    await until(lambda: rig.status("fridge-1") == "rate_limited", "the flooding device is rate-limited")
    flooded = rig.ctx.devices.get("fridge-1")
    assert flooded is not None
    await until(lambda: flooded.health.rate_limited > 20, "drops counted")
    dropped = rig.ctx.metrics.dropped.labels("fridges", "rate_limited")._value.get()
    assert dropped >= flooded.health.rate_limited
    before = len(await rig.samples("freezer-1"))

    async def freezer_goes_on() -> bool:
        return len(await rig.samples("freezer-1")) > before + 5

    await until_async(freezer_goes_on, "the other device is unaffected")
    assert rig.status("freezer-1") == "online"


async def test_writes_land_in_the_server_datastore(rig: Rig, tcp_server: FridgeServer) -> None:
    rig.start(tcp_config(server_port(tcp_server), [fridge("fridge-1", 1), fridge("freezer-1", 2)]))
    await until(lambda: rig.status("fridge-1") == "online", "online")
    write = rig.ctx.device_writers["freezer-1"]
    await write("freezer-1", "setpoint", -22.5)
    assert await tcp_server.read_point(2, "setpoint") == -22.5
    await until(lambda: tcp_server.models[2].setpoint == -22.5, "the controller takes the new setpoint")
    await rig.ctx.device_writers["fridge-1"]("fridge-1", "defrost_start", True)
    await until(lambda: tcp_server.models[1].defrosting, "the write starts a defrost")
    with pytest.raises(WriteRefusedError, match="outside"):
        await write("freezer-1", "setpoint", 40)
    with pytest.raises(WriteRefusedError, match="no point"):
        await write("freezer-1", "nonsense", 1)
    with pytest.raises(WriteRefusedError, match="not writable"):
        await write("freezer-1", "air_temperature", 1)
    with pytest.raises(WriteRefusedError, match="resolution"):
        await write("freezer-1", "setpoint", -22.55)
    assert tcp_server.models[2].setpoint == -22.5


async def test_a_write_to_a_silent_device_fails_clearly(rig: Rig, tcp_server: FridgeServer) -> None:
    driver = rig.start(tcp_config(server_port(tcp_server), [fridge("fridge-1", 1), fridge("freezer-1", 2)]))
    await until(lambda: rig.status("freezer-1") == "online", "online")
    tcp_server.muted.add(2)
    # Not sent again after the timeout: a write (defrost start) may have been carried out.
    with pytest.raises(DriverError, match=r"outcome unknown.* after 0 retries"):
        await rig.ctx.device_writers["freezer-1"]("freezer-1", "setpoint", -21)
    assert driver.stats.timeouts > 0


def rtu_config(path: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "modbus",
        "name": "rs485",
        "transport": "rtu",
        "serial_port": path,
        "baudrate": 19200,
        "timeout_s": 0.3,
        "retries": 2,
        "retry_backoff_s": 0.01,
        "reconnect_max_s": 0.5,
        "devices": devices,
    }


async def test_rtu_bus_polling_survives_garbage_and_a_cut_cable(rig: Rig) -> None:
    server = FridgeServer([1, 2], speed=0.0, models={1: FridgeModel(air=-4.2), 2: FridgeModel(air=5.1)})
    line = await server.start_rtu(19200)
    try:
        driver = rig.start(rtu_config(line.driver_path, [fridge("fridge-1", 1), fridge("fridge-2", 2)]))
        await until(lambda: rig.status("fridge-1") == "online", "fridge-1 online")
        await until(lambda: rig.status("fridge-2") == "online", "fridge-2 online")
        sample = next(s for s in await rig.samples("fridge-1") if "air_temperature" in s["values"])
        assert sample["values"]["air_temperature"] == -4.2
        # Noise on the line: pymodbus's RTU framer skips what is not a frame; the driver counts those bytes.
        assert driver.stats.noise_bytes == 0
        for n in range(100):
            line.inject(bytes([0xFF, 0x00, 0x55, n & 0xFF]) * 4)
            await asyncio.sleep(0.005)
        await until(lambda: driver.stats.noise_bytes >= 800, "the noise is counted")
        # 100 bursts of 16 bytes; an answer the noise ran into is garbled and counted with it (a few frames of at
        # most 256 bytes at most), so the count is what was sent plus at most that, never the whole stream.
        assert driver.stats.noise_bytes <= 1600 + 2 * 256
        assert rig.ctx.metrics.dropped.labels("rs485", "line_noise")._value.get() > 0
        before = len(await rig.samples("fridge-2"))

        async def polling_goes_on() -> bool:
            return len(await rig.samples("fridge-2")) > before + 3

        await until_async(polling_goes_on, "polling goes on after the noise")
        # The cable is pulled: nothing answers, devices go to error; plugged back: online.
        line.cut = True
        await until(lambda: rig.status("fridge-1") == "error", "error with the cable cut")
        line.cut = False
        await until(lambda: rig.status("fridge-1") == "online", "online with the cable back")
        await until(lambda: rig.status("fridge-2") == "online", "fridge-2 online with the cable back")
        assert driver._bus.turns > 0
    finally:
        await rig.stop_drivers()
        await server.stop()


def crc16_modbus(data: bytes) -> bytes:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), low byte first (/work/shared/vectors/README.md)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def test_crc_vector() -> None:
    # shared/vectors/README.md: the check value of ASCII "123456789" is 0x4B37 (sent 37 4B).
    assert crc16_modbus(b"123456789") == bytes.fromhex("374B")


ONE_REGISTER_PROFILE = """\
profile: test-one-register
family: modbus
vendor: test
model: one holding register at address 0
source: tests/drivers/test_modbus_driver.py
confidence: "third-party map: verify"
groups:
  temperatures: {interval_s: 0.2}
points:
  - {name: air_temperature, address: 0, type: int16, scale: 0.1, unit: "°C", group: temperatures}
"""


async def test_rtu_request_on_the_wire_is_the_spec_vector(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "test-one-register.yaml").write_text(ONE_REGISTER_PROFILE, encoding="utf-8")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "profiles"))
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        device = {"id": "probe-1", "unit": 1, "profile": "test-one-register"}
        rig.start(rtu_config(os.ttyname(slave), [device]))
        loop = asyncio.get_running_loop()
        request = bytearray()
        enough = asyncio.Event()

        def readable() -> None:
            request.extend(os.read(master, 64))
            if len(request) >= 8:
                enough.set()

        loop.add_reader(master, readable)
        try:
            async with asyncio.timeout(WITHIN_S):
                await enough.wait()
        finally:
            loop.remove_reader(master)
        # shared/vectors/README.md: read one holding register at address 0 of unit 1.
        assert request[:8] == bytes.fromhex("010300000001840A")
        # A response of -20.0 degC: 01 03 02 FF 38 + CRC (int16 -200 x 0.1).
        body = bytes.fromhex("010302FF38")
        os.write(master, body + crc16_modbus(body))
        await until(lambda: rig.status("probe-1") == "online", "the response is decoded")
        samples = await rig.samples("probe-1")
        assert samples[0]["values"] == {"air_temperature": -20.0}
    finally:
        await rig.stop_drivers()
        os.close(master)
        os.close(slave)


def test_simulator_dynamics_at_a_sped_up_time_scale() -> None:
    model = FridgeModel(setpoint=3.0, air=4.0)
    for _ in range(3600):  # one simulated hour in 1 s steps: the thermostat holds the band
        model.step(1.0)
    assert 2.5 <= model.air <= 5.5
    steady = model.air
    model.start_defrost()
    for _ in range(600):
        model.step(1.0)
    assert model.defrosting
    assert not model.compressor_on
    assert model.air > steady + 1.0  # defrost warms the cabinet
    for _ in range(3600):
        model.step(1.0)
    assert not model.defrosting
    assert model.air < 6.0  # and it recovers
    model.door_open = True
    warm_start = model.air
    for _ in range(300):
        model.step(1.0)
    assert model.air > warm_start + 2.0  # an open door warms it up
    model.door_open = False
    model.failed = True
    for _ in range(3 * 3600):
        model.step(1.0)
    assert model.air > 15.0  # a failed compressor: the temperature climbs towards the room
    assert model.metrics()["high_temp_alarm"] == 1.0


async def test_served_failure_raises_the_alarm_bit(rig: Rig) -> None:
    server = FridgeServer([1], speed=2000.0, models={1: FridgeModel(failed=True)})
    port = free_port()
    await server.start_tcp("127.0.0.1", port)
    try:
        rig.start(tcp_config(port, [fridge("fridge-1", 1)]))

        async def alarm() -> bool:
            return any(s["values"].get("high_temp_alarm") == 1.0 for s in await rig.samples("fridge-1"))

        await until_async(alarm, "high temperature alarm from a failed compressor")
        temps = [
            s["values"]["air_temperature"]
            for s in await rig.samples("fridge-1")
            if "air_temperature" in s["values"]
        ]
        assert temps[-1] > temps[0]
    finally:
        await rig.stop_drivers()
        await server.stop()


def test_line_closes_its_descriptors() -> None:
    line = PtyLine()
    line.close()
    line.close()


async def test_one_device_bus_with_the_cable_cut_goes_to_error(rig: Rig) -> None:
    server = FridgeServer([1], speed=0.0)
    line = await server.start_rtu(19200)
    try:
        slow = {"temperatures": 2.0, "alarms": 2.0, "parameters": 2.0}
        config = rtu_config(line.driver_path, [fridge("fridge-1", 1, poll_intervals=slow)])
        config |= {"timeout_s": 0.5, "retries": 1, "reconnect_max_s": 2}
        driver = rig.start(config)
        await until(lambda: rig.status("fridge-1") == "online", "fridge-1 online")
        line.cut = True
        await until(lambda: rig.status("fridge-1") == "error", f"error with the cable cut ({driver.stats})")
        line.cut = False
        await until(lambda: rig.status("fridge-1") == "online", "online with the cable back")
    finally:
        await rig.stop_drivers()
        await server.stop()


async def test_two_muted_units_behind_one_tcp_gateway_do_not_cut_off_the_third(rig: Rig) -> None:
    """pymodbus alone would close the connection after retries + 3 unanswered requests across all units."""
    tcp_server = FridgeServer([1, 2, 3], speed=0.0)
    await tcp_server.start_tcp("127.0.0.1", free_port())
    try:
        devices = [fridge("fridge-1", 1), fridge("fridge-2", 2), fridge("fridge-3", 3)]
        driver = rig.start(tcp_config(server_port(tcp_server), devices, retries=2))
        await until(lambda: rig.status("fridge-1") == "online", "fridge-1 online")
        tcp_server.muted.update({2, 3})
        await until(lambda: driver.stats.timeouts >= 30, "many timeouts on the muted units")
        before = len(await rig.samples("fridge-1"))

        async def healthy_goes_on() -> bool:
            return len(await rig.samples("fridge-1")) > before + 5

        await until_async(healthy_goes_on, "the healthy unit keeps being polled")
        assert driver.stats.reconnects == 0
        assert "error" not in await rig.statuses("fridge-1")
    finally:
        await rig.stop_drivers()
        await tcp_server.stop()


ONE_BAD_GROUP_PROFILE = """\
profile: test-one-bad-group
family: modbus
vendor: test
model: a map with one group the controller does not have
source: tests/drivers/test_modbus_driver.py
confidence: "third-party map: verify"
groups:
  temperatures: {interval_s: 0.1}
  missing: {interval_s: 0.1}
points:
  - {name: air_temperature, address: 0x0100, type: int16, scale: 0.1, unit: "°C", group: temperatures}
  - {name: nowhere, address: 0x7000, type: int16, group: missing}
"""


async def test_an_illegal_address_in_one_group_is_reported_once_and_the_device_stays_online(
    rig: Rig, tcp_server: FridgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "test-one-bad-group.yaml").write_text(ONE_BAD_GROUP_PROFILE, encoding="utf-8")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "profiles"))
    device = {"id": "fridge-1", "unit": 1, "profile": "test-one-bad-group", "rate_limit_per_s": 10_000}
    driver = rig.start(tcp_config(server_port(tcp_server), [device]))
    await until(lambda: driver.stats.exceptions >= 20, "the missing group is polled many times")
    statuses = await rig.statuses("fridge-1")
    assert "error" not in statuses
    assert statuses[-1] == "online"
    assert len(await rig.samples("fridge-1")) > 5
    rows = await rig.rows("SELECT reason, detail FROM quarantine WHERE device_id='fridge-1'")
    assert len(rows) == 1
    assert rows[0][0] == "modbus_exception"
    assert "exception 2" in rows[0][1]
