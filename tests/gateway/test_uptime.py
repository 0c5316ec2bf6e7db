"""``--uptime`` really moves the clocks the code reads: time.monotonic, time.monotonic_ns, an asyncio loop's time,
and a default argument bound at import (DeviceRegistry's). CI runs it in every ``-m clock`` pass."""

from __future__ import annotations

import asyncio
import time

import pytest

from drivers.devices import DeviceRegistry
from tests.harness import uptime


def test_the_clocks_read_the_uptime_asked_for(request: pytest.FixtureRequest) -> None:
    asked = request.config.getoption("uptime")
    now = time.monotonic()
    real_now_ns = uptime._real_monotonic_ns()
    if asked is None:
        assert uptime.shifted_at_ns is None
        assert abs(now - real_now_ns / 1e9) < 1
        return
    assert uptime.shifted_at_ns is not None
    since_shift = (real_now_ns - uptime.shifted_at_ns) / 1e9
    assert asked <= now <= asked + since_shift + 1
    assert abs(time.monotonic_ns() / 1e9 - now) < 1
    registry = DeviceRegistry(lambda _draft: None)
    assert abs(registry.monotonic() - now) < 1  # the default argument took the shifted clock at import


async def test_the_event_loop_reads_the_same_clock() -> None:
    assert abs(asyncio.get_running_loop().time() - time.monotonic()) < 1
