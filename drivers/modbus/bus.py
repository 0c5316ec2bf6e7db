"""One lock and one inter-frame gap per RTU bus, shared by every device on that bus.

RS-485 is half duplex with one master: a request may go out only after the previous exchange ended and the
line stayed silent for 3.5 character times (Modbus over Serial Line v1.02, 2.5.1.1). One driver per serial
port: pymodbus opens the port exclusively, so a second driver naming it could never open it. A TCP link is
keyed too (one lock per host:port), which serialises the requests of one driver's devices.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

_BUSES: Final[weakref.WeakValueDictionary[str, BusLock]] = weakref.WeakValueDictionary()


class BusLock:
    """Serialises requests on one bus and keeps at least ``gap_s`` of silence between frames."""

    def __init__(self, gap_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.gap_s = gap_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last_end = -float("inf")
        self.turns = 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the bus for one request and its response."""
        async with self._lock:
            wait = self._last_end + self.gap_s - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self.turns += 1
            try:
                yield
            finally:
                self._last_end = self._clock()


def bus_for(key: str, gap_s: float) -> BusLock:
    """The bus lock of ``key`` (a serial port path), created on first use; the larger gap wins."""
    bus = _BUSES.get(key)
    if bus is None:
        bus = BusLock(gap_s)
        _BUSES[key] = bus
    else:
        bus.gap_s = max(bus.gap_s, gap_s)
    return bus
