"""Consumers on a real journal file: after the commit, in seq order, from a cursor that survives a restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from gateway.kernel.consumer import run_consumer
from gateway.kernel.journal import Draft
from gateway.kernel.metrics import Metrics
from gateway.kernel.pipeline import Event
from tests.gateway.test_journal import flushed, new_journal, query, running, sample, status, until


class Recorder:
    """Keeps what it was handed; fails ``failures`` times first."""

    def __init__(
        self, name: str = "recorder", kinds: frozenset[str] | None = None, failures: int = 0
    ) -> None:
        self.name = name
        self.kinds = kinds
        self.failures = failures
        self.seen: list[tuple[int, str]] = []

    async def handle(self, events: Sequence[Event]) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the chat endpoint is down")
        self.seen += [(e.seq, e.kind) for e in events]


@contextlib.asynccontextmanager
async def consuming(journal: object, consumer: Recorder):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(run_consumer(journal, consumer))  # type: ignore[arg-type]
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_consumer_gets_what_commits_after_it_starts_and_resumes_from_its_cursor(
    tmp_path: Path,
) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        journal.submit(status(0))  # before the consumer's first start: history, not handed over
        await flushed(journal)
        first = Recorder()
        async with consuming(journal, first):
            await until(lambda: journal.pending_cursor("recorder") is not None, "the first cursor is taken")
            for i in range(1, 4):
                journal.submit(status(i))
            await until(lambda: len(first.seen) == 3, "three events handed over")
            await until(lambda: journal.pending_cursor("recorder") == 4, "the cursor moved")
        assert [seq for seq, _ in first.seen] == [2, 3, 4]
        assert all(kind == "device.status" for _, kind in first.seen)
        for i in range(4, 6):  # while no consumer runs; these commits carry the cursor
            journal.submit(status(i))
        await flushed(journal)
        assert query(journal, "SELECT value FROM meta WHERE key = 'cursor:recorder'") == [("4",)]
    reopened = new_journal(tmp_path)
    async with running(reopened):
        again = Recorder()
        async with consuming(reopened, again):
            await until(lambda: len(again.seen) == 2, "what committed while it was away")
        assert [seq for seq, _ in again.seen] == [5, 6]


async def test_a_failing_consumer_gets_the_same_events_again_and_holds_back_nothing_else(
    tmp_path: Path,
) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        flaky = Recorder("flaky", kinds=frozenset({"device.status"}), failures=2)
        async with consuming(journal, flaky):
            await until(lambda: journal.pending_cursor("flaky") is not None, "the first cursor is taken")
            for i in range(3):
                journal.submit(status(i))
            await flushed(journal)
            assert journal.last_seq == 3  # intake went on while the consumer failed
            await until(lambda: len(flaky.seen) == 3, "handed over once the consumer works")
        assert [seq for seq, _ in flaky.seen] == [1, 2, 3]


async def test_a_cursor_alone_makes_no_commit_per_batch_and_is_written_at_a_clean_stop(
    tmp_path: Path,
) -> None:
    """A consumer of kinds that never come moves its cursor past every commit, but its cursor rides the
    commits that happen anyway: no fsync of its own for each (SD wear); a clean stop writes it."""
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics)
    commits = "storegw_journal_commit_seconds_count"
    async with running(journal):
        idle = Recorder("idle", kinds=frozenset({"alert.raised"}))
        async with consuming(journal, idle):
            await until(lambda: journal.pending_cursor("idle") is not None, "the first cursor is taken")
            before = sample(metrics, commits)
            for i in range(5):
                journal.submit(status(i))
                await flushed(journal)
                await until(lambda i=i: journal.pending_cursor("idle") == i + 1, "the cursor moved past it")
            # One commit per event; at most one more if the cursors' own flush came due meanwhile.
            assert sample(metrics, commits) - before <= 6
        assert idle.seen == []
    assert query(journal, "SELECT value FROM meta WHERE key = 'cursor:idle'") == [("5",)]


async def test_cursors_of_consumers_no_longer_configured_are_forgotten(tmp_path: Path) -> None:
    """A chat channel removed from the config and added again later starts at the journal's end, not with every
    alert since it was removed."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for name in ("notify-ding", "notify-gone", "notify_gone", "actions-mqtt_publish"):
            await journal.save_cursor(name, 1)
        journal.submit(Draft("sensor.sample", "fridge-1", b'{"values":{"temperature":4.0}}', driver="modbus"))
        await flushed(journal)  # the cursors commit with it
        assert query(journal, "SELECT count(*) FROM meta WHERE key LIKE 'cursor:%'") == [(4,)]
        assert await journal.forget_cursors("notify-", {"notify-ding"}) == 1
        assert await journal.cursor("notify-gone") is None
        assert await journal.cursor("notify-ding") == 1
        assert await journal.cursor("notify_gone") == 1  # not a channel's: "_" is not a wildcard here
        assert await journal.cursor("actions-mqtt_publish") == 1
