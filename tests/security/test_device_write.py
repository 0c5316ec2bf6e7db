"""Threat: a ``device.write`` that changes a controller in a way nobody meant (docs/SECURITY.md).

HQ's JSON reaches :meth:`drivers.modbus.driver.ModbusDriver.write`, which checks it strictly before anything
goes on the wire: a numeric point takes a JSON number only (not "5", not true), a boolean point true or false
only (not 1), and a device's config may narrow a point's range below the profile's (never widen it). Each
test runs the driver against a real pymodbus server (the fridge simulator over TCP on a free loopback port)
and counts the write requests the server received, so a refusal is proven not to reach the register.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverContext
from drivers.devices import DeviceRegistry
from drivers.modbus.config import ModbusDeviceConfig, ModbusDriverConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.registers import WriteRefusedError
from gateway.config_loader import ConfigError, check_config, load_config
from gateway.kernel.metrics import Metrics
from simulators.fridge import FridgeModel, FridgeServer
from tests.drivers.test_modbus_driver import Rig, gateway_config, server_port, tcp_config, until
from tests.harness.brokers import free_port
from tests.harness.driver_harness import running_journal

Writer = Callable[[str, str, Any], Awaitable[None]]

WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
SLOW = {"temperatures": 3600, "alarms": 3600, "parameters": 3600}
"""One poll of each group at start, then none: the test's own writes are what the server sees."""


class CountingFridgeServer(FridgeServer):
    """The fridge simulator, counting the write requests that reach it (Modbus TCP: the function code follows
    the 7-byte MBAP header)."""

    writes_received = 0

    def _trace(self, sending: bool, packet: bytes) -> bytes:
        if not sending and len(packet) > 7 and packet[7] in WRITE_FUNCTIONS:
            self.writes_received += 1
        return super()._trace(sending, packet)


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


@pytest.fixture
async def server() -> AsyncIterator[CountingFridgeServer]:
    models = {1: FridgeModel(setpoint=4.0), 2: FridgeModel(setpoint=4.0)}
    server = CountingFridgeServer([1, 2], speed=0.0, models=models)
    await server.start_tcp("127.0.0.1", free_port())
    try:
        yield server
    finally:
        await server.stop()


def narrowed(device_id: str, unit: int, **extra: Any) -> dict[str, Any]:
    return {"id": device_id, "unit": unit, "profile": "dixell-xr", "poll_intervals": SLOW, **extra}


async def started(rig: Rig, server: CountingFridgeServer, *devices: dict[str, Any]) -> ModbusDriver:
    driver = rig.start(tcp_config(server_port(server), list(devices)))
    for device in devices:
        await until(lambda d=device: rig.status(d["id"]) == "online", f"{device['id']} online")
    return driver


async def refused(reason: str, write: Writer, device_id: str, point: str, value: Any) -> WriteRefusedError:
    """A write that must be refused with ``reason``; the refusal, for its message."""
    with pytest.raises(WriteRefusedError) as info:
        await write(device_id, point, value)
    assert info.value.reason == reason, (point, value, info.value.detail)
    return info.value


async def test_a_numeric_point_takes_a_json_number_only(rig: Rig, server: CountingFridgeServer) -> None:
    await started(rig, server, narrowed("fridge-1", 1))
    write = rig.ctx.device_writers["fridge-1"]
    for value in ("5", "5.0", "", True, False, None, [5], {"value": 5}, math.nan, math.inf, -math.inf):
        err = await refused("invalid_value", write, "fridge-1", "setpoint", value)
        assert "setpoint" in str(err)
    # A string is described, never echoed back to HQ.
    err = await refused("invalid_value", write, "fridge-1", "setpoint", "<script>")
    assert "<script>" not in str(err)
    assert "a string" in str(err)
    # An integer no float can hold (JSON allows it) is out of range, not a crash.
    err = await refused("out_of_range", write, "fridge-1", "setpoint", 10**400)
    assert "integer of 1329 bits" in str(err)
    assert server.writes_received == 0
    assert await server.read_point(1, "setpoint") == 4.0

    await write("fridge-1", "setpoint", 5)  # a JSON integer is a number
    assert await server.read_point(1, "setpoint") == 5.0
    await write("fridge-1", "setpoint", -2.5)
    assert await server.read_point(1, "setpoint") == -2.5
    assert server.writes_received == 2


async def test_a_boolean_point_takes_true_or_false_only(rig: Rig, server: CountingFridgeServer) -> None:
    await started(rig, server, narrowed("fridge-1", 1))
    write = rig.ctx.device_writers["fridge-1"]
    for value in (1, 0, 1.0, "true", "1", None, [True]):
        err = await refused("invalid_value", write, "fridge-1", "defrost_start", value)
        assert "write true or false" in str(err)
    assert server.writes_received == 0
    assert not server.models[1].defrosting

    await write("fridge-1", "defrost_start", True)
    await until(lambda: server.models[1].defrosting, "the write starts a defrost")
    assert server.writes_received == 1


async def test_a_device_range_narrower_than_the_profile_is_enforced(
    rig: Rig, server: CountingFridgeServer
) -> None:
    """fridge-1 narrows the profile's setpoint range (-30..15) to 2..6; freezer-2 on the same link does not."""
    await started(
        rig,
        server,
        narrowed("fridge-1", 1, writable={"setpoint": {"min": 2, "max": 6}}),
        narrowed("freezer-2", 2),
    )
    write = rig.ctx.device_writers["fridge-1"]
    for value in (7, 6.1, 1.9, -20, 15):
        err = await refused("out_of_range", write, "fridge-1", "setpoint", value)
        assert "outside 2..6 (this device's range; the profile's is -30..15)" in str(err)
    assert server.writes_received == 0
    assert await server.read_point(1, "setpoint") == 4.0

    await write("fridge-1", "setpoint", 6)
    assert await server.read_point(1, "setpoint") == 6.0
    await write("fridge-1", "setpoint", 2)
    assert await server.read_point(1, "setpoint") == 2.0
    await write("freezer-2", "setpoint", -20)  # the other device keeps the profile's range
    assert await server.read_point(2, "setpoint") == -20.0
    err = await refused("out_of_range", write, "freezer-2", "setpoint", 16)
    assert "outside -30..15" in str(err)
    assert "this device" not in str(err)
    assert server.writes_received == 3


def test_a_device_range_gives_the_profile_bound_it_leaves_out() -> None:
    device = ModbusDeviceConfig.model_validate(
        {"id": "f", "unit": 1, "profile": "dixell-xr", "writable": {"setpoint": {"max": 5}}}
    )
    limits = device.write_limits()["setpoint"]
    assert (limits.min, limits.max) == (-30, 5)


CONFIG = """\
gateway_id: gw-01
store:
  id: hk-001
  name: Test Store
hq:
  host: hq.example.com
api:
  enabled: false
drivers:
  - type: modbus
    transport: tcp
    host: 127.0.0.1
    devices:
      - id: fridge-1
        unit: 1
        profile: dixell-xr
        writable:
          setpoint: {min: -40, max: 6}         # wider: the profile's min is -30
          defrost_start: {max: 2}              # wider: a coil is 0..1
          air_temperature: {max: 1}            # read-only
          sepoint: {min: 1}                    # no such point
      - id: fridge-2
        unit: 2
        profile: dixell-xr
        writable:
          setpoint: {min: 5, max: 3}           # min above max
          defrost_start: {}                    # nothing
      - id: fridge-3
        unit: 3
        profile: dixell-xr
        writable:
          setpoint: {min: "2", max: true}      # not numbers
"""


def test_a_range_wider_than_the_profile_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "store.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    lines = CONFIG.splitlines()

    def line_of(marker: str) -> int:
        return next(n for n, text in enumerate(lines, start=1) if marker in text)

    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    found = {issue.key_path: issue for issue in info.value.issues}
    device = "drivers[0].devices[{}].writable."
    expected = {
        device.format(0) + "setpoint.min": ("min: -40", "outside -30..15, the range profile dixell-xr gives"),
        device.format(0) + "defrost_start.max": ("{max: 2}", "outside 0..1"),
        device.format(0) + "air_temperature": ("air_temperature:", "no writable point air_temperature"),
        device.format(0) + "sepoint": ("sepoint:", "no point sepoint in profile dixell-xr"),
        device.format(1) + "setpoint": ("{min: 5, max: 3}", "min is above max"),
        device.format(1) + "defrost_start": ("{}", "give min, max or both"),
        device.format(2) + "setpoint.min": ('min: "2"', "valid number"),
        device.format(2) + "setpoint.max": ("max: true", "valid number"),
    }
    assert set(found) == set(expected), info.value
    for key, (marker, message) in expected.items():
        issue = found[key]
        assert issue.line == line_of(marker), issue
        assert message in issue.message, issue
    assert "a device may only narrow it" in found[device.format(0) + "setpoint.min"].message
    assert found[device.format(0) + "setpoint.min"].value_repr == "-40.0"
    assert "writable: setpoint, defrost_start" in found[device.format(0) + "sepoint"].message

    code, text = check_config(path, no_secrets=True, env={})
    assert code == 1
    assert f"{path}:{line_of('min: -40')}:" in text
    assert text.splitlines()[-1].startswith("8 problem(s)")


async def test_the_driver_writes_within_a_range_loaded_from_yaml(
    rig: Rig, server: CountingFridgeServer, tmp_path: Path
) -> None:
    """The range in a real config file is the one the running driver enforces."""
    text = (
        CONFIG.split("    devices:\n")[0]
        + "    devices:\n"
        + "      - {id: fridge-1, unit: 1, profile: dixell-xr, writable: {setpoint: {max: 5}}}\n"
    )
    text = text.replace("host: 127.0.0.1\n", f"host: 127.0.0.1\n    port: {server_port(server)}\n")
    path = tmp_path / "store.yaml"
    path.write_text(text, encoding="utf-8")
    (driver_config,) = load_config(path, env={}).drivers
    assert isinstance(driver_config, ModbusDriverConfig)
    driver = ModbusDriver(driver_config, rig.ctx)
    rig.tasks.append(asyncio.create_task(driver.run(), name="driver-from-yaml"))
    await until(lambda: rig.status("fridge-1") == "online", "online")
    write = rig.ctx.device_writers["fridge-1"]
    await refused("out_of_range", write, "fridge-1", "setpoint", 5.1)
    await write("fridge-1", "setpoint", -30)
    assert await server.read_point(1, "setpoint") == -30.0
    assert server.writes_received == 1
