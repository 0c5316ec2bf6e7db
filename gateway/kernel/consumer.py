"""Consumers: work with side effects outside the journal (writing a device, notifying a manager), run after
the commit, from a durable cursor.

Processors (:mod:`gateway.kernel.pipeline`) run inside the commit transaction and may do nothing but SQL on the
journal. Anything that talks to the world is a consumer: it reads committed events after its cursor, in seq
order, does its work, then moves its cursor, which is kept in the journal's ``meta`` table. A restart resumes
from the cursor, so nothing committed is skipped; a crash between the work and the cursor's move repeats that
work once (at-least-once): a consumer whose work must not repeat records it under a key of its own (the event's
seq) where the work lands. The uplink is the same shape with its own watermarks per outbox class.

A consumer new to a journal starts at the journal's last seq: it acts on what commits from then on, not on the
journal's history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.kernel.pipeline import Event
from gateway.kernel.supervise import Backoff

_LOGGER = logging.getLogger(__name__)

BATCH: Final = 200
"""Events handed to a consumer at once, at most."""
CURSOR_PREFIX: Final = "cursor:"
"""``meta`` key of a consumer's cursor: ``cursor:<name>``."""


STUCK_S: Final = 60.0
"""A consumer that has held the same events this long (a chat robot down, the store broker away) is reported
as behind in /health."""


@dataclass(slots=True)
class ConsumerState:
    """How a consumer is doing, for /health: where its cursor is, and since when it has held its events."""

    cursor: int = 0
    busy_since: float | None = None
    """Monotonic time it took the events it is working on (None: waiting for new ones)."""
    failures: int = 0
    """Failed attempts in a row at the events it holds."""
    error: str | None = None
    """The last failure's type (never its text: it may hold a URL, and a chat robot's URL is its token)."""

    def report(self, now: float, problem: str | None = None) -> dict[str, Any]:
        busy_s = 0.0 if self.busy_since is None else now - self.busy_since
        return {
            "cursor": self.cursor,
            "busy_s": round(busy_s, 1),
            "behind": busy_s >= STUCK_S or self.failures > 0,
            "failures": self.failures,
            "error": problem or self.error,
        }


class CommittedLog(Protocol):
    """What a consumer needs of the journal (:class:`gateway.kernel.journal.Journal` provides it)."""

    @property
    def last_seq(self) -> int: ...

    async def events_after(
        self, seq: int, kinds: frozenset[str] | None, limit: int
    ) -> tuple[list[Event], int]:
        """Committed events above ``seq`` (of ``kinds``, or all), in seq order, at most ``limit``; and the seq
        through which it looked (the last event's when it stopped at ``limit``, else the last committed seq
        when it read), so a cursor never moves past an event it did not see."""
        ...

    async def cursor(self, name: str) -> int | None:
        """The consumer's saved cursor, or None for a consumer new to this journal."""
        ...

    async def save_cursor(self, name: str, seq: int) -> None: ...

    def add_listener(self, listener: Callable[..., None]) -> None:
        """``listener`` is called on the event loop after each commit."""
        ...


class Consumer(Protocol):
    name: str
    """Stable and unique: the cursor's key."""
    kinds: frozenset[str] | None
    """The event kinds it handles (None: all). Its cursor still moves past the others."""

    async def handle(self, events: Sequence[Event]) -> None:
        """Do the work for these committed events. Raise to have them handed over again (after a backoff)."""
        ...


async def run_consumer(log: CommittedLog, consumer: Consumer, state: ConsumerState | None = None) -> None:
    """Hand ``consumer`` every event committed after its cursor, until cancelled. A failing ``handle`` is
    logged and retried with backoff, with the same events; it never holds back intake or other consumers.
    ``state`` (for /health) follows its progress."""
    state = state if state is not None else ConsumerState()
    woken = asyncio.Event()
    log.add_listener(lambda *_: woken.set())
    saved = await log.cursor(consumer.name)
    cursor = state.cursor = log.last_seq if saved is None else saved
    if saved is None:
        await log.save_cursor(consumer.name, cursor)
    backoff = Backoff(cap=60.0)
    while True:
        woken.clear()
        try:
            events, through = await log.events_after(cursor, consumer.kinds, BATCH)
        except Exception as err:  # a read that fails (a busy or failing disk): the same read again, later
            if state.busy_since is None:
                state.busy_since = time.monotonic()
            state.failures += 1
            state.error = type(err).__name__
            delay = backoff.next_delay()
            _LOGGER.exception(
                "consumer %s: reading events after seq %d failed; again in %.0f s",
                consumer.name,
                cursor,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        if events:
            if state.busy_since is None:
                state.busy_since = time.monotonic()
            try:
                await consumer.handle(events)
            except Exception as err:
                state.failures += 1
                state.error = type(err).__name__
                delay = backoff.next_delay()
                _LOGGER.exception(
                    "consumer %s failed on seqs %d-%d; trying again in %.0f s",
                    consumer.name,
                    events[0].seq,
                    events[-1].seq,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
        state.busy_since, state.failures, state.error = None, 0, None  # read, and handled if any
        if through > cursor:
            cursor = state.cursor = through
            await log.save_cursor(consumer.name, cursor)
        if len(events) < BATCH:
            await woken.wait()
