"""The event pipeline on a real SQLite file: processors chained in order, a failing one isolated, ticks, and
rollback apart from reload."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from prometheus_client import generate_latest

from gateway.kernel.events import AlertRaised, StockLevel
from gateway.kernel.metrics import Metrics
from gateway.kernel.pipeline import FAILED_RULE, Derived, Emit, Event, Pipeline, Processor
from tests.gateway.test_journal import new_journal, query, running, status, until


class Writer:
    """The journal's side of the pipeline: seqs for what processors emit, in the same transaction."""

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self.emitted: list[Event] = []

    def append(self, derived: Sequence[Derived]) -> list[Event]:
        events = []
        for emit in derived:
            self.last_seq += 1
            events.append(Event(self.last_seq, emit.kind, emit.device_id, emit.data_json, emit.model))
        self.emitted += events
        return events


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.db", isolation_level=None)) as db:
        yield db


def level(seq: int, sku: str = "A") -> Event:
    model = StockLevel(sku=sku, on_hand=Decimal(5), delta=Decimal(-1), cause_seqs=(seq, seq))
    return Event(seq, "stock.level", None, model.model_dump_json().encode())


class Counter(Processor):
    """Counts stock.level events per SKU in a table; emits an alert for each SKU it counted."""

    def __init__(self, name: str, fail_on: int | None = None, fail_flush: bool = False) -> None:
        self.name = name
        self.fail_on = fail_on
        self.fail_flush = fail_flush
        self.seen: list[tuple[int, str]] = []
        self.pending: dict[str, int] = {}
        self.reloads = 0
        self.rollbacks = 0

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {self.name}(sku TEXT PRIMARY KEY, n INTEGER)")

    def apply(self, event: Event) -> None:
        if event.seq == self.fail_on:
            raise RuntimeError(f"cannot take {event.seq}")
        self.seen.append((event.seq, event.kind))
        if isinstance(event.model, StockLevel):
            self.pending[event.model.sku] = self.pending.get(event.model.sku, 0) + 1

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        rows = list(self.pending.items())
        conn.executemany(
            f"INSERT INTO {self.name} VALUES (?, ?) ON CONFLICT(sku) DO UPDATE SET n = n + excluded.n", rows
        )
        if self.fail_flush:
            raise RuntimeError("flush broke")
        self.pending.clear()
        return [
            Emit(AlertRaised(rule="count", severity="info", subject=sku, message=f"{n}")) for sku, n in rows
        ]

    def reload(self, conn: sqlite3.Connection) -> None:
        self.reloads += 1
        self.pending.clear()

    def rollback(self, conn: sqlite3.Connection) -> None:
        self.rollbacks += 1
        self.pending.clear()

    def table(self, conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute(f"SELECT sku, n FROM {self.name}").fetchall())


def run(conn: sqlite3.Connection, pipeline: Pipeline, events: list[Event]) -> Writer:
    writer = Writer(events[-1].seq)
    conn.execute("BEGIN IMMEDIATE")
    pipeline.run(conn, events, writer.append)
    conn.execute("COMMIT")
    pipeline.committed()
    return writer


def test_each_processor_sees_the_events_and_what_the_processors_before_it_emitted(
    conn: sqlite3.Connection,
) -> None:
    first, second = Counter("first"), Counter("second")
    pipeline = Pipeline([first, second])
    pipeline.setup(conn)
    writer = run(conn, pipeline, [level(1), level(2, "B")])
    assert first.seen == [(1, "stock.level"), (2, "stock.level")]
    # The alerts the first emitted got seqs 3 and 4 in the same transaction, and the second saw them.
    assert second.seen == [(1, "stock.level"), (2, "stock.level"), (3, "alert.raised"), (4, "alert.raised")]
    assert [e.seq for e in writer.emitted] == [3, 4, 5, 6]
    assert first.table(conn) == second.table(conn) == {"A": 1, "B": 1}


def test_a_processor_failing_on_an_event_skips_that_event_and_the_others_go_on(
    conn: sqlite3.Connection,
) -> None:
    metrics = Metrics()
    broken, after = Counter("broken", fail_on=2), Counter("after")
    pipeline = Pipeline([broken, after], metrics)
    pipeline.setup(conn)
    writer = run(conn, pipeline, [level(1), level(2), level(3, "B")])
    # Failed on 2 only; reloaded once, then took the others again (two passes, however many failures).
    assert broken.reloads == 1
    assert broken.seen == [(1, "stock.level"), (3, "stock.level"), (1, "stock.level"), (3, "stock.level")]
    assert broken.table(conn) == {"A": 1, "B": 1}
    assert after.table(conn) == {"A": 2, "B": 1}
    alerts = [
        e.model for e in writer.emitted if isinstance(e.model, AlertRaised) and e.model.rule == FAILED_RULE
    ]
    assert len(alerts) == 1
    assert alerts[0].subject == "broken"
    assert alerts[0].details["seqs"] == [2]
    text = generate_latest(metrics.registry).decode()
    assert 'storegw_processor_errors_total{processor="broken"} 1.0' in text


def test_a_failing_flush_is_undone_and_reported_at_most_once_per_period(conn: sqlite3.Connection) -> None:
    broken, after = Counter("broken", fail_flush=True), Counter("after")
    pipeline = Pipeline([broken, after], Metrics())
    pipeline.setup(conn)
    writer = run(conn, pipeline, [level(1)])
    assert broken.table(conn) == {}  # its writes were rolled back to the savepoint
    assert after.table(conn) == {"A": 1}
    assert broken.reloads == 1
    assert [e.model.rule for e in writer.emitted if isinstance(e.model, AlertRaised)] == [
        FAILED_RULE,
        "count",
    ]
    again = run(conn, pipeline, [level(7)])
    assert [e.model.rule for e in again.emitted if isinstance(e.model, AlertRaised)] == ["count"]


class Locked(Counter):
    """Its flush hits a SQLite error while ``locked``: the database, not the processor, is in trouble."""

    locked = True

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        if self.locked:
            raise sqlite3.OperationalError("database is locked")
        return super().flush(conn)


def test_a_sqlite_error_fails_the_whole_commit_and_a_report_it_held_is_made_again(
    conn: sqlite3.Connection,
) -> None:
    broken, locked = Counter("broken", fail_on=1), Locked("locked")
    pipeline = Pipeline([broken, locked], Metrics())
    pipeline.setup(conn)
    writer = Writer(1)
    conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError):
        pipeline.run(conn, [level(1)], writer.append)
    conn.execute("ROLLBACK")
    pipeline.rollback(conn)
    assert (broken.rollbacks, locked.rollbacks) == (1, 1)
    # The failure report of the rolled-back attempt was never committed: the retry reports it.
    locked.locked = False
    again = run(conn, pipeline, [level(1)])
    rules = [e.model.rule for e in again.emitted if isinstance(e.model, AlertRaised)]
    assert rules[:1] == [FAILED_RULE]
    assert broken.table(conn) == {}
    assert locked.table(conn) == {"A": 1}


class Timer(Processor):
    wants_ticks = True
    name = "timer"

    def __init__(self) -> None:
        self.ticks: list[float] = []

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        self.ticks.append(now)
        return [Emit(AlertRaised(rule="timer", severity="info", subject="t", message="tick"))]


def test_ticks_reach_the_processors_that_want_them_and_what_they_emit_goes_down_the_chain(
    conn: sqlite3.Connection,
) -> None:
    timer, counter = Timer(), Counter("counter")
    pipeline = Pipeline([timer, counter])
    pipeline.setup(conn)
    assert pipeline.wants_ticks
    assert not Pipeline([counter]).wants_ticks
    writer = Writer(10)
    conn.execute("BEGIN IMMEDIATE")
    pipeline.tick(conn, 1234.5, writer.append)
    conn.execute("COMMIT")
    assert timer.ticks == [1234.5]
    assert counter.seen == [(11, "alert.raised")]


def test_rollback_and_reload_are_separate(conn: sqlite3.Connection) -> None:
    counter = Counter("counter")
    pipeline = Pipeline([counter])
    pipeline.setup(conn)
    pipeline.rollback(conn)
    assert (counter.rollbacks, counter.reloads) == (1, 0)
    pipeline.reload(conn)
    assert (counter.rollbacks, counter.reloads) == (1, 1)


def test_an_event_without_a_model_is_parsed_once_when_a_processor_asks() -> None:
    event = level(4)
    assert event.model is event.model
    assert isinstance(event.model, StockLevel)
    assert Emit(event.model).kind == "stock.level"


# --- in the journal --------------------------------------------------------------------------------


class Sweeper(Processor):
    """Time-driven: on its first tick, one alert; counts what it is fed."""

    wants_ticks = True
    name = "sweeper"

    def __init__(self) -> None:
        self.ticks = 0
        self.fed: list[str] = []

    def apply(self, event: Event) -> None:
        self.fed.append(event.kind)

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        self.ticks += 1
        if self.ticks > 1:
            return ()
        return [Emit(AlertRaised(rule="sweep", severity="info", subject="s", message=f"at {now:.0f}"))]


async def test_the_journal_ticks_a_time_driven_processor_and_commits_what_it_emits_down_the_chain(
    tmp_path: Path,
) -> None:
    sweeper, counter = Sweeper(), Counter("after")
    journal = new_journal(tmp_path, processors=[sweeper, counter])
    async with running(journal):
        await until(lambda: journal.last_seq >= 1, "the first tick's alert is committed")
        journal.submit(status(1))
        await until(lambda: journal.last_seq >= 2, "a device event after it")
        await until(lambda: sweeper.ticks >= 2, "ticks go on")
    rows = query(journal, "SELECT seq, kind, body FROM events ORDER BY seq")
    assert [(seq, kind) for seq, kind, _ in rows] == [(1, "alert.raised"), (2, "device.status")]
    assert orjson.loads(rows[0][2])["data"]["rule"] == "sweep"
    # The processor after it saw the alert; the ticking one saw the device event (not its own alert).
    assert counter.seen == [(1, "alert.raised"), (2, "device.status")]
    assert sweeper.fed == ["device.status"]


class NotAnEvent(Processor):
    """Emits what is not an event payload: from its flush, or from its tick."""

    name = "not-an-event"

    def __init__(self, ticking: bool = False) -> None:
        self.wants_ticks = ticking
        self.reloads = 0

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS scratch(n INTEGER)")

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        conn.execute("INSERT INTO scratch VALUES (1)")
        return [Emit(Metrics())]  # type: ignore[arg-type]

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        return ["not an Emit"]  # type: ignore[list-item]

    def reload(self, conn: sqlite3.Connection) -> None:
        self.reloads += 1


def test_a_bad_emit_is_the_processors_failure_not_the_commits(conn: sqlite3.Connection) -> None:
    bad, after = NotAnEvent(), Counter("after")
    pipeline = Pipeline([bad, after], Metrics())
    pipeline.setup(conn)
    writer = run(conn, pipeline, [level(1), level(2)])
    assert conn.execute("SELECT COUNT(*) FROM scratch").fetchone() == (0,)  # its write was undone
    assert bad.reloads == 1
    alerts = [
        e.model for e in writer.emitted if isinstance(e.model, AlertRaised) and e.model.rule == FAILED_RULE
    ]
    assert [(a.subject, a.details["seqs"]) for a in alerts] == [("not-an-event", [1, 2])]
    assert pipeline.skipped_by(1) == pipeline.skipped_by(2) == "not-an-event"
    assert after.table(conn) == {"A": 2}


def test_a_bad_emit_from_a_tick_is_reported_and_the_tick_commits(conn: sqlite3.Connection) -> None:
    bad = NotAnEvent(ticking=True)
    pipeline = Pipeline([bad], Metrics())
    pipeline.setup(conn)
    writer = Writer(0)
    conn.execute("BEGIN IMMEDIATE")
    pipeline.tick(conn, 1.0, writer.append)
    conn.execute("COMMIT")
    assert [e.model.rule for e in writer.emitted if isinstance(e.model, AlertRaised)] == [FAILED_RULE]


def test_many_failures_in_one_commit_cost_two_passes_not_one_per_failure(conn: sqlite3.Connection) -> None:
    class Odd(Counter):
        def apply(self, event: Event) -> None:
            if event.seq % 2:
                raise RuntimeError("odd")
            super().apply(event)

    odd = Odd("odd")
    pipeline = Pipeline([odd], Metrics())
    pipeline.setup(conn)
    run(conn, pipeline, [level(seq, sku=f"S{seq}") for seq in range(1, 201)])
    assert odd.reloads == 1
    assert len(odd.seen) == 200  # 100 in the first pass, the same 100 again after the one reload
    assert len(odd.table(conn)) == 100
    assert pipeline.skipped_by(1) == "odd"
    assert pipeline.skipped_by(2) is None


def test_processor_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Pipeline([Counter("same"), Counter("same")])
