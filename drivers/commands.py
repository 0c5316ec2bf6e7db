"""The drivers' HQ command: ``device.write`` (a fridge setpoint, a defrost start), through the device's driver.

A driver that can write registers a writer per device in ``DriverContext.device_writers``; the profile (and the
device's config) say which points are writable and their range, and the driver refuses anything else.

Once per request id: the downlink puts the request id on its command ledger before the write (a replay is
answered ``duplicate``), and every write that reached the driver is recorded in the journal as ``action.done``
or ``action.failed`` under the command's dedup key (``cmd:<request_id>``), as the other state-changing commands
are; a request id found there is answered ``duplicate`` without writing again, also when the command ledger was
lost (``hq-commands.db`` damaged and set aside).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from cloud_bridge.commands import CommandError, DeviceWrite, Handler, Outcome, Request, command_key
from drivers.errors import DriverError
from gateway.kernel.events import ActionDone, ActionFailed
from gateway.kernel.journal import Journal

DeviceWriter = Callable[[str, str, float], Awaitable[None]]
DEVICE_WRITE_TIMEOUT_S: Final = 30.0
"""A ``device.write`` that has not finished by then (a bus busy with retries) is answered as failed."""


def device_handlers(writers: Mapping[str, DeviceWriter], journal: Journal) -> dict[str, Handler]:
    """``device.write`` over the drivers' writers (device id -> write function), recorded in ``journal``."""

    async def write(request: Request) -> Outcome:
        args = request.args
        assert isinstance(args, DeviceWrite)
        key = command_key(request.request_id)
        if await journal.key_known(key):
            return "duplicate", _result(args)
        record = {
            "source": "hq",
            "action": "device.write",
            "type": "modbus_write",
            "request_id": request.request_id,
            "device_id": args.device_id,
            "point": args.point,
            "value": args.value,
        }
        try:
            outcome = await device_write(writers, args)
        except CommandError as err:
            if err.code == "failed":  # it reached the driver, and may have reached the device: not again
                await _record(
                    journal, ActionFailed(**record, reason="unreachable", error=str(err)[:500]), key
                )
            raise
        seq = await _record(journal, ActionDone(**record), key)
        return outcome if seq is not None else ("duplicate", _result(args))

    # The downlink also puts the request id on its command ledger before the write (at most once: a crash after
    # the write answers a replay "duplicate"), since the journal's record follows the write.
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
    return "ok", _result(args)


def _result(args: DeviceWrite) -> dict[str, object]:
    return {"device_id": args.device_id, "point": args.point, "value": args.value}


async def _record(journal: Journal, outcome: ActionDone, key: str) -> int | None:
    """Commit the write's record under the command's key; its seq, or None when that key was committed before."""
    kind = "action.failed" if isinstance(outcome, ActionFailed) else "action.done"
    return await journal.record(kind, outcome, key, driver="downlink")
