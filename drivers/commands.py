"""The drivers' HQ command: ``device.write`` (a fridge setpoint, a defrost start), through the device's driver.

A driver that can write registers a writer per device in ``DriverContext.device_writers``; the profile (and the
device's config) say which points are writable and their range, and the driver refuses anything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from cloud_bridge.commands import CommandError, DeviceWrite, Handler, Outcome, Request
from drivers.errors import DriverError

DeviceWriter = Callable[[str, str, float], Awaitable[None]]
DEVICE_WRITE_TIMEOUT_S: Final = 30.0
"""A ``device.write`` that has not finished by then (a bus busy with retries) is answered as failed."""


def device_handlers(writers: Mapping[str, DeviceWriter]) -> dict[str, Handler]:
    """``device.write`` over the drivers' writers (device id -> write function)."""

    async def write(request: Request) -> Outcome:
        assert isinstance(request.args, DeviceWrite)
        return await device_write(writers, request.args)

    # A write commits nothing to the journal: on the command record first (at most once: a crash after the
    # write answers a replay "duplicate").
    return {"device.write": Handler(write, record_first=True)}


async def device_write(writers: Mapping[str, DeviceWriter], args: DeviceWrite) -> Outcome:
    """Write a device point through its driver; a refused write (unknown point, out of range) is invalid_args, a
    device that cannot be reached is failed."""
    writer = writers.get(args.device_id)
    if writer is None:
        raise CommandError("invalid_args", f"no writable device {args.device_id!r} on this gateway")
    try:
        async with asyncio.timeout(DEVICE_WRITE_TIMEOUT_S):
            await writer(args.device_id, args.point, args.value)
    except TimeoutError as err:
        raise CommandError("failed", f"the write did not finish within {DEVICE_WRITE_TIMEOUT_S:g} s") from err
    except ValueError as err:  # the driver's refusal of an invalid write
        raise CommandError("invalid_args", str(err)[:300]) from err
    except DriverError as err:
        raise CommandError("failed", str(err)[:300]) from err
    return "ok", {"device_id": args.device_id, "point": args.point, "value": args.value}
