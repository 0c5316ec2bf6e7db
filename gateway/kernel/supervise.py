"""Supervision of long-lived connections: reconnect with capped exponential backoff and full jitter, and
"log when unavailable" (the first failure at WARNING, then DEBUG until it recovers, then INFO once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final


class Backoff:
    """Full-jitter exponential backoff (AWS architecture blog): sleep = uniform(0, min(cap, base * 2**n))."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self._base = base
        self._cap = cap
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._cap, self._base * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class QuietLog:
    """Logs a failing dependency once at WARNING, stays quiet (DEBUG) while it keeps failing."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self.down = False

    def failed(self, error: object) -> None:
        if self.down:
            self._logger.debug("%s still unavailable: %s", self._what, error)
        else:
            self._logger.warning("%s unavailable: %s (retrying quietly)", self._what, error)
            self.down = True

    def recovered(self) -> None:
        if self.down:
            self._logger.info("%s is back", self._what)
            self.down = False


PROBE_INTERVAL_S: Final = 0.5


async def tcp_reachable(host: str, port: int, within_s: float = 0.5) -> bool:
    """Whether a TCP connection to host:port opens (closed at once): a probe that costs the peer nothing."""
    try:
        async with asyncio.timeout(within_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def sleep_or_probe(
    delay: float, probe: Callable[[], Awaitable[bool]] | None, rng: random.Random | None = None
) -> None:
    """Sleep ``delay`` seconds; with a ``probe``, end early when the peer answers again after an outage.

    If the peer answers right away, the failure was above TCP (refused login, black hole, protocol error): sleep
    the whole backoff. If it does not, it is down: probe every ~0.5 s (jittered) and return as soon as it
    answers, so a reconnect follows within about a second of the peer coming back."""
    if probe is None or await probe():
        await asyncio.sleep(delay)
        return
    rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    deadline = asyncio.get_running_loop().time() + delay
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        await asyncio.sleep(min(left, PROBE_INTERVAL_S * rng.uniform(0.6, 1.0)))
        if await probe():
            return


async def reconnect_forever(
    what: str,
    session: Callable[[Callable[[], None]], Awaitable[str]],
    logger: logging.Logger,
    errors: tuple[type[BaseException], ...],
    backoff: Backoff | None = None,
    probe: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Run ``session(up)`` again and again until cancelled.

    ``session`` connects, calls ``up()`` once it is working (which resets the backoff), and returns the reason when
    the connection ends; failures it raises (of ``errors``) are logged quietly. Either way we wait (see
    :func:`sleep_or_probe`), then retry.
    """
    backoff = backoff or Backoff()
    quiet = QuietLog(logger, what)

    def up() -> None:
        backoff.reset()
        quiet.recovered()

    while True:
        try:
            reason = await session(up)
        except errors as err:
            quiet.failed(err)
        else:
            quiet.failed(reason)
        await sleep_or_probe(backoff.next_delay(), probe)
