"""Threat: a ``device.write`` replayed (HQ sending it again, a captured command within its validity, a broker's
redelivery) writes the controller twice (docs/OUTBOX.md, "device.write").

HQ's commands go over a real mosquitto to the downlink, the writes over Modbus TCP to a real pymodbus server (the
fridge simulator) that counts the write requests it receives, and the record into a real SQLite journal.
"""

# ruff: noqa: F811 - the rig and hq fixtures come from the downlink's tests

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from drivers.base import DriverContext
from drivers.devices import DeviceRegistry
from drivers.modbus.config import ModbusDriverConfig
from drivers.modbus.driver import ModbusDriver
from simulators.fridge import FridgeModel
from tests.cloud_bridge.test_downlink import Hq, Rig, error, hq, ok, rig, running  # noqa: F401 - fixtures
from tests.drivers.test_modbus_driver import server_port, tcp_config, until
from tests.harness.brokers import free_port
from tests.security.test_device_write import SLOW, CountingFridgeServer

SETPOINT = {"device_id": "fridge-1", "point": "setpoint", "value": -2.5}


@pytest.fixture
async def server() -> AsyncIterator[CountingFridgeServer]:
    server = CountingFridgeServer([1], speed=0.0, models={1: FridgeModel(setpoint=4.0)})
    await server.start_tcp("127.0.0.1", free_port())
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def modbus(rig: Rig, server: CountingFridgeServer) -> AsyncIterator[DriverContext]:
    ctx = DriverContext(rig.journal, rig.metrics, DeviceRegistry(rig.journal.submit), rig.config)
    device = {"id": "fridge-1", "unit": 1, "profile": "dixell-xr", "poll_intervals": SLOW}
    driver = ModbusDriver(ModbusDriverConfig.model_validate(tcp_config(server_port(server), [device])), ctx)
    task = asyncio.create_task(driver.run(), name="modbus-under-test")
    try:
        await until(lambda: bool(ctx.states.get("fridges") and ctx.states["fridges"].connected), "connected")
        yield ctx
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def records(rig: Rig) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        (kind, key, orjson.loads(body)["data"])
        for kind, key, body in rig.rows(
            "SELECT kind, dedup_key, body FROM events WHERE kind LIKE 'action.%' ORDER BY seq"
        )
    ]


async def test_a_replayed_device_write_is_answered_duplicate_and_writes_once(
    rig: Rig, hq: Hq, server: CountingFridgeServer
) -> None:
    async with modbus(rig, server) as ctx, running(rig.downlink(writers=ctx.device_writers)):
        assert ok(await hq.ask("device.write", SETPOINT, request_id="w-1")) == SETPOINT
        assert await server.read_point(1, "setpoint") == -2.5
        assert server.writes_received == 1
        replay = await hq.ask("device.write", SETPOINT, request_id="w-1")
        assert replay["status"] == "duplicate", replay
        assert server.writes_received == 1
    [(kind, key, data)] = records(rig)
    assert (kind, key) == ("action.done", "cmd:w-1")
    assert data == {
        **SETPOINT,
        "source": "hq",
        "action": "device.write",
        "type": "modbus_write",
        "request_id": "w-1",
        "alert_id": None,
        "level": None,
        "topic": None,
        "attempts": 1,
        "reason": None,
        "error": None,
    }


async def test_a_replay_after_the_command_ledger_was_lost_still_writes_nothing(
    rig: Rig, hq: Hq, server: CountingFridgeServer
) -> None:
    """The command ledger (hq-commands.db) is damaged and set aside, or deleted: the journal's record of the
    write, under the command's dedup key, still answers the replay."""
    async with modbus(rig, server) as ctx:
        first = rig.downlink(writers=ctx.device_writers)
        async with running(first):
            assert ok(await hq.ask("device.write", SETPOINT, request_id="w-7")) == SETPOINT
        first.close()
        (rig.config.data_dir / "hq-commands.db").unlink()
        async with running(rig.downlink(writers=ctx.device_writers)):
            # The broker may also redeliver w-7 itself (its PUBACK was cut off with the first downlink): every
            # answer to w-7 is "duplicate", and w-8, another request id, is another write.
            other = {**SETPOINT, "value": 1.5}
            await hq.send({"request_id": "w-7", "command": "device.write", "args": SETPOINT})
            await hq.send({"request_id": "w-8", "command": "device.write", "args": other})
            answers = [await hq.next()]
            while answers[-1]["request_id"] != "w-8":
                answers.append(await hq.next())
    replays = [(a["status"], a["result"]) for a in answers[:-1]]
    assert replays, answers
    assert all(r == ("duplicate", SETPOINT) for r in replays), answers
    assert ok(answers[-1]) == other
    assert server.writes_received == 2
    assert await server.read_point(1, "setpoint") == 1.5
    assert [(kind, key) for kind, key, _ in records(rig)] == [
        ("action.done", "cmd:w-7"),
        ("action.done", "cmd:w-8"),
    ]


async def test_a_write_that_failed_is_recorded_and_not_tried_again_by_a_replay(
    rig: Rig, hq: Hq, server: CountingFridgeServer
) -> None:
    """A write without an answer may still have reached the controller (here it did: the muted controller
    takes the write and drops its answer): failed, recorded, never repeated."""
    async with modbus(rig, server) as ctx:
        server.muted.add(1)
        first = rig.downlink(writers=ctx.device_writers)
        async with running(first):
            assert "no response" in error(await hq.ask("device.write", SETPOINT, request_id="w-9"), "failed")
        first.close()
        (rig.config.data_dir / "hq-commands.db").unlink()
        server.muted.discard(1)
        async with running(rig.downlink(writers=ctx.device_writers)):
            replay = await hq.ask("device.write", SETPOINT, request_id="w-9")
            assert replay["status"] == "duplicate", replay
    assert server.writes_received == 1
    [(kind, key, data)] = records(rig)
    assert (kind, key, data["reason"]) == ("action.failed", "cmd:w-9", "unreachable")
    assert "no response" in data["error"]


async def test_a_refused_write_is_not_recorded_and_refused_again(
    rig: Rig, hq: Hq, server: CountingFridgeServer
) -> None:
    async with modbus(rig, server) as ctx, running(rig.downlink(writers=ctx.device_writers)):
        too_warm = {**SETPOINT, "value": 40}
        assert "outside" in error(await hq.ask("device.write", too_warm, request_id="w-2"), "invalid_args")
    assert server.writes_received == 0
    assert records(rig) == []
