"""Clock anchors: the pure step decision, the watcher on scripted clocks (a Pi that boots in 1970 and syncs
later), a journal that refuses, and the watcher running against a real journal."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from gateway.kernel.clock import BOOT_ID, ClockState
from gateway.kernel.clock_watch import ClockWatcher, Decision, WatchState, anchor_draft, decide
from gateway.kernel.events import ClockSynced, Envelope
from gateway.kernel.journal import Draft
from tests.gateway.test_journal import new_journal, running

S = 1_000_000_000
REAL_UTC_NS = int(datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()) * S + 123_456_789
"""2026-11-22T10:00:00.123456789Z"""


class ScriptedClock:
    """The kernel's view of the clocks, driven by the test: a sync flag, a monotonic and a wall clock."""

    def __init__(self, wall_ns: int, synced: bool) -> None:
        self.mono = 7 * S
        self.offset = wall_ns - self.mono
        self.is_synced = synced

    def synced(self) -> bool:
        return self.is_synced

    def wall_ns(self) -> int:
        return self.mono + self.offset

    def mono_ns(self) -> int:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks move alike."""
        self.mono += int(seconds * S)

    def step(self, seconds: float) -> None:
        """Someone sets the wall clock."""
        self.offset += int(seconds * S)


class Journal:
    """Collects what the watcher submits; refuses while ``full``."""

    def __init__(self) -> None:
        self.drafts: list[Draft] = []
        self.full = False

    def submit(self, draft: Draft) -> bool:
        if self.full:
            return False
        self.drafts.append(draft)
        return True

    def payloads(self) -> list[ClockSynced]:
        return [ClockSynced.model_validate_json(d.data_json) for d in self.drafts]


def watcher(clock: ScriptedClock, journal: Journal) -> ClockWatcher:
    return ClockWatcher(clock, journal.submit, wall_ns=clock.wall_ns, mono_ns=clock.mono_ns)


# --- the pure decision ---------------------------------------------------------------------------------


def test_decide_anchors_once_at_the_first_synchronised_reading() -> None:
    first = decide(WatchState(), True, 5 * S)
    assert first == Decision(WatchState(None, 5 * S), True, None)
    assert not decide(first.state, True, 5 * S + S // 2).anchor


def test_decide_measures_the_step_at_sync_from_the_first_reading_of_the_boot() -> None:
    boot = decide(WatchState(), False, 100 * S)
    assert boot == Decision(WatchState(100 * S, None), False, None)
    later = decide(boot.state, False, 130 * S)  # stepped while unsynchronised: still measured from boot
    assert later.state == boot.state
    synced = decide(later.state, True, 160 * S)
    assert synced == Decision(WatchState(100 * S, 160 * S), True, 60.0)


@pytest.mark.parametrize(
    ("moves", "anchors"),
    [
        ([S], [None]),  # exactly one second (a leap second) is not a step
        ([S + 1], [1.000000001]),
        ([-2 * S], [-2.0]),
        ([S // 2, S // 2, S // 10], [None, None, 1.1]),  # small steps add up against the last anchor
        ([3 * S, 3 * S], [3.0, 3.0]),
    ],
)
def test_decide_anchors_when_the_wall_clock_steps_while_synchronised(
    moves: list[int], anchors: list[float | None]
) -> None:
    state = decide(WatchState(), True, 0).state
    offset = 0
    for move, expected in zip(moves, anchors, strict=True):
        offset += move
        decision = decide(state, True, offset)
        assert decision.anchor is (expected is not None)
        assert decision.step_s == (pytest.approx(expected) if expected is not None else None)
        state = decision.state


def test_decide_catches_a_step_taken_while_the_sync_was_lost() -> None:
    state = decide(WatchState(), True, 0).state
    assert decide(state, False, 9 * S) == Decision(state, False, None)
    assert decide(state, True, 9 * S) == Decision(WatchState(None, 9 * S), True, 9.0)
    assert not decide(state, True, S // 3).anchor


# --- the watcher ------------------------------------------------------------------------------------------


def test_a_gateway_that_boots_in_1970_anchors_when_ntp_syncs() -> None:
    clock = ScriptedClock(wall_ns=0, synced=False)
    journal = Journal()
    watch = watcher(clock, journal)
    for _ in range(3):
        assert watch.poll() is None
        clock.advance(5)
    clock.step(REAL_UTC_NS / S - 15)  # NTP sets the clock...
    clock.advance(0.25)
    assert watch.poll() is None  # ...but the kernel flag is not up yet
    clock.is_synced = True
    draft = watch.poll()
    assert draft is not None
    assert (draft.kind, draft.device_id) == ("clock.synced", None)
    [anchor] = journal.payloads()
    assert anchor.boot_id == BOOT_ID
    assert anchor.mono_ns == clock.mono
    assert anchor.utc == datetime(2026, 11, 22, 10, 0, 0, 373_000, tzinfo=UTC)
    assert orjson.loads(draft.data_json)["utc"] == "2026-11-22T10:00:00.373Z"
    assert anchor.step_s == pytest.approx(REAL_UTC_NS / S - 15)
    for _ in range(5):
        clock.advance(5)
        assert watch.poll() is None
    clock.step(-3)
    assert watch.poll() is not None
    assert [a.step_s for a in journal.payloads()] == [pytest.approx(REAL_UTC_NS / S - 15), -3.0]
    assert watch.anchors == 2


def test_a_gateway_synced_at_start_anchors_at_once_without_a_step() -> None:
    clock = ScriptedClock(wall_ns=REAL_UTC_NS, synced=True)
    journal = Journal()
    watch = watcher(clock, journal)
    assert watch.poll() is not None
    assert journal.payloads()[0].step_s is None
    clock.advance(60)
    assert watch.poll() is None
    assert len(journal.drafts) == 1


def test_a_refused_anchor_is_retried_on_the_next_poll(caplog: pytest.LogCaptureFixture) -> None:
    clock = ScriptedClock(wall_ns=0, synced=False)
    journal = Journal()
    watch = watcher(clock, journal)
    watch.poll()
    clock.step(REAL_UTC_NS / S)
    clock.is_synced = True
    journal.full = True
    for _ in range(3):
        clock.advance(5)
        assert watch.poll() is None
    assert caplog.text.count("journal refused the clock anchor") == 1
    journal.full = False
    clock.advance(5)
    draft = watch.poll()
    assert draft is not None
    [anchor] = journal.payloads()
    assert anchor.mono_ns == clock.mono  # a fresh reading: any synchronised moment makes a true anchor
    assert anchor.step_s == pytest.approx(REAL_UTC_NS / S)
    assert watch.poll() is None


def test_anchor_draft_is_a_valid_clock_synced_payload() -> None:
    draft = anchor_draft(REAL_UTC_NS, 42, 1.5)
    assert orjson.loads(draft.data_json) == {
        "boot_id": BOOT_ID,
        "mono_ns": 42,
        "utc": "2026-11-22T10:00:00.123Z",
        "step_s": 1.5,
    }
    assert draft.model == ClockSynced.model_validate_json(draft.data_json)


async def test_the_watcher_commits_an_anchor_into_a_real_journal(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        watch = ClockWatcher(ClockState(override=True), journal.submit, interval_s=0.01)
        task = asyncio.create_task(watch.run(), name="clock-watch-under-test")
        try:
            async with asyncio.timeout(20):
                while journal.last_seq < 1:  # noqa: ASYNC110 - committed on the writer thread
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        [(body,)] = await journal.query("SELECT body FROM events")
    event = Envelope.model_validate_json(body)
    assert event.kind == "clock.synced"
    assert event.device_id is None
    assert isinstance(event.data, ClockSynced)
    assert event.data.boot_id == event.boot_id == BOOT_ID
    assert event.data.mono_ns <= event.mono_ns
    assert watch.anchors == 1


def test_the_kernel_clock_check_forks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock is checked every 10 s for months: asking must not search for libc (``find_library`` forks
    ``ldconfig -p``) nor start any process, and adjtimex is looked up once."""
    import ctypes.util
    import subprocess

    from gateway.kernel import clock

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the clock check started a process")

    monkeypatch.setattr(ctypes.util, "find_library", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    state = clock.ClockState(refresh_s=0)
    answers = {state.synced() for _ in range(5)}
    assert answers <= {True, False}
    assert clock._adjtimex.cache_info().currsize == 1
