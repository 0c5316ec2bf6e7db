"""Commits ``clock.synced`` anchors, so HQ can correct the time of events recorded before NTP synced.

A Raspberry Pi boots with a wrong wall clock. Every event carries ``mono_ns`` (monotonic, this boot) and
``clock_synced``; an anchor pairs a monotonic reading with true UTC, and HQ re-times the unsynchronised events
of the same boot as ``anchor.utc - (anchor.mono_ns - event.mono_ns) / 1e9`` (docs/OUTBOX.md, "Clock").

:class:`ClockWatcher` commits an anchor on the first synchronised reading of the boot, and again whenever
the wall clock steps by more than a second against the monotonic clock while synchronised (a manual
``date -s``, an NTP step after a long drift, a leap second is exactly 1 s and does not count). The decision
is the pure function :func:`decide`, over ``wall - mono`` offsets: NTP slewing moves both clocks alike, so
the offset only changes when the wall clock is stepped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

import orjson

from gateway.kernel.clock import BOOT_ID
from gateway.kernel.events import ClockSynced
from gateway.kernel.journal import Draft

_LOGGER = logging.getLogger(__name__)

STEP_THRESHOLD_NS: Final = 1_000_000_000
"""A change of the wall-minus-monotonic offset above this (strictly) is a clock step worth a new anchor."""


class SyncSource(Protocol):
    """What the watcher asks whether the wall clock is synchronised (:class:`gateway.kernel.clock.ClockState`)."""

    def synced(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class WatchState:
    """What the watcher remembers between readings."""

    boot_offset_ns: int | None = None
    """``wall - mono`` at the first reading, if it was not synchronised: the step at the first sync is
    measured against it, so it covers every step taken while unsynchronised."""
    synced_offset_ns: int | None = None
    """``wall - mono`` at the last anchor (None: no anchor yet this boot). Later readings are compared with
    it, not with each other, so small steps that add up to more than the threshold also call for an anchor."""


@dataclass(frozen=True, slots=True)
class Decision:
    state: WatchState
    """The state to keep if the anchor (when one is due) was committed; keep the old one otherwise, and the
    next reading decides again with the same references."""
    anchor: bool
    step_s: float | None
    """How far the wall clock stepped since the reference reading, if there was one."""


def decide(
    state: WatchState, synced: bool, offset_ns: int, threshold_ns: int = STEP_THRESHOLD_NS
) -> Decision:
    """Whether a reading (synchronised or not, and its ``wall - mono`` offset) calls for an anchor."""
    if not synced:
        if state.synced_offset_ns is None and state.boot_offset_ns is None:
            return Decision(WatchState(boot_offset_ns=offset_ns), False, None)
        return Decision(state, False, None)
    if state.synced_offset_ns is None:
        step = None if state.boot_offset_ns is None else (offset_ns - state.boot_offset_ns) / 1e9
        return Decision(WatchState(state.boot_offset_ns, offset_ns), True, step)
    moved = offset_ns - state.synced_offset_ns
    new_state = WatchState(state.boot_offset_ns, offset_ns)
    if abs(moved) > threshold_ns:
        return Decision(new_state, True, moved / 1e9)
    return Decision(state, False, None)


def anchor_draft(wall_ns: int, mono_ns: int, step_s: float | None) -> Draft:
    """The ``clock.synced`` event for one (wall, monotonic) reading, validated against ClockSynced."""
    utc = datetime.fromtimestamp(wall_ns // 1_000_000 / 1000, UTC)
    data = {
        "boot_id": BOOT_ID,
        "mono_ns": mono_ns,
        "utc": utc.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "step_s": step_s,
    }
    model = ClockSynced.model_validate(data)
    return Draft(kind="clock.synced", device_id=None, data_json=orjson.dumps(data), model=model)


class ClockWatcher:
    """Polls the clock every ``interval_s`` and submits anchors to the journal (``submit`` is
    :meth:`gateway.kernel.journal.Journal.submit`); a refused submit (journal full) is retried on the next poll.

    ``wall_ns`` and ``mono_ns`` are the clocks (``time.time_ns`` and ``time.monotonic_ns``; ``mono_ns`` must
    be the clock the journal stamps events with). Tests pass their own.
    """

    def __init__(
        self,
        clock: SyncSource,
        submit: Callable[[Draft], bool],
        interval_s: float = 5.0,
        *,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._clock = clock
        self._submit = submit
        self._interval_s = interval_s
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self._state = WatchState()
        self._refused = False
        self.anchors = 0
        """Anchors submitted so far."""

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            self.poll()
            await asyncio.sleep(self._interval_s)

    def poll(self) -> Draft | None:
        """Take one reading; returns the anchor it submitted, if any."""
        synced = self._clock.synced()
        wall = self._wall_ns()
        mono = self._mono_ns()
        decision = decide(self._state, synced, wall - mono)
        if not decision.anchor:
            self._state = decision.state
            return None
        try:
            draft = anchor_draft(wall, mono, decision.step_s)
        except (ValueError, OverflowError, OSError) as err:
            # A wall clock out of datetime's range while "synchronised": nothing to anchor to; keep watching.
            _LOGGER.warning("cannot make a clock anchor from wall time %d ns: %s", wall, err)
            return None
        if not self._submit(draft):
            if not self._refused:
                _LOGGER.warning("journal refused the clock anchor; retrying every %.0f s", self._interval_s)
            self._refused = True
            return None
        self._refused = False
        self._state = decision.state
        self.anchors += 1
        _LOGGER.info("wall clock synchronised: anchor submitted (step %s s)", decision.step_s)
        return draft
