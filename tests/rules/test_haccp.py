"""The HACCP temperature log: readings folded per interval in the store's timezone, gaps, excursions with their
corrective action, DST days, retention apart from the outbox, idempotence and bad input; on real SQLite files
(the rule engine and the log in the journal's pipeline), the real journal, real HTTP and the real CLI."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import sqlite3
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from gateway.api import create_app
from gateway.config_loader import ConfigError, load_config
from gateway.kernel.events import AlertAcknowledged, AlertCleared, AlertRaised, SensorSample
from gateway.kernel.journal import Draft
from gateway.kernel.metrics import Metrics
from gateway.kernel.model import StrictModel
from gateway.kernel.mqtt_client import MqttClient
from gateway.kernel.pipeline import KIND_OF, Derived, Event, Pipeline
from gateway.kernel.rule_config import RuleDefinition
from rules.engine import RuleEngine
from rules.haccp import HaccpConfig, HaccpLog
from rules.haccp_api import haccp_router
from rules.haccp_report import NO_RULE, SEVERAL, as_csv, build_report, day_bounds
from tests.gateway.test_api import AUTH, TOKEN
from tests.gateway.test_api import running as api_running
from tests.gateway.test_cli import cli
from tests.gateway.test_journal import flushed, new_journal, query, running
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import API_TOKEN as E2E_TOKEN
from tests.harness.e2e_helpers import broker_config, load, poll_until, running_gateway, write_config
from tests.rules.conftest import Time

RULES = TypeAdapter(list[RuleDefinition])
WARM = {"id": "dairy-warm", "type": "temperature", "max_c": 8, "for_s": 600, "clear_for_s": 300}
HK = "Asia/Hong_Kong"
LONDON = "Europe/London"
DAY = date(2026, 11, 2)


def at(day: date, hhmm: str, timezone: str = HK) -> float:
    """The Unix time of a store-local wall-clock time (the first one, on a day a time happens twice)."""
    hour, minute = map(int, hhmm.split(":"))
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(timezone)).timestamp()


class Store:
    """A journal file with the rule engine and the HACCP log in its pipeline, as the journal's writer runs them
    (one transaction per call; each event stamped with the test's wall clock, as the writer stamps it)."""

    def __init__(self, path: Path, time: Time, rules: list[dict[str, Any]], config: HaccpConfig) -> None:
        self.path = path
        self.time = time
        time.wall = 1_700_000_000.0  # before every day the tests log: their clocks only move forward
        self.seq = 0
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.start(rules, config)

    def start(self, rules: list[dict[str, Any]], config: HaccpConfig | None = None) -> None:
        """(Re)start: a fresh engine and log over the same file."""
        self.rules = RULES.validate_python(rules)
        self.engine = RuleEngine(self.rules, self.time.clock(), wall=lambda: self.time.wall)
        self.log = HaccpLog(config or HaccpConfig(), lambda: self.engine.rules)
        self.pipeline = Pipeline([self.engine, self.log])
        self.pipeline.setup(self.conn)

    def move_to(self, wall: float) -> None:
        self.time.advance(wall - self.time.wall)

    def event(self, model: StrictModel, device: str | None, seq: int | None = None) -> Event:
        if seq is None:
            self.seq += 1
            seq = self.seq
        data = model.model_dump_json(by_alias=True).encode()
        return Event(seq, KIND_OF[type(model)], device, data, model, self.time.wall, self.time.synced)

    def _append(self, derived: list[Derived]) -> list[Event]:
        return [self.event(d.model, d.device_id) for d in derived]

    def commit(self, events: list[Event], tick: bool = False) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.pipeline.run(self.conn, events, self._append)  # type: ignore[arg-type]
        if tick:
            self.pipeline.tick(self.conn, self.time.wall, self._append)  # type: ignore[arg-type]
        self.conn.execute("COMMIT")
        self.pipeline.committed()

    def sample(
        self, wall: float, temperature: float | None, device: str = "fridge-1", **values: float
    ) -> None:
        self.move_to(wall)
        if temperature is not None:
            values["temperature"] = temperature
        faults = {} if temperature is not None else {"temperature": "probe open circuit"}
        model = SensorSample(values=values, faults=faults, source="dixell-xr")
        self.commit([self.event(model, device)], tick=True)

    def ack(self, wall: float, alert_id: str, note: str, role: str) -> None:
        self.move_to(wall)
        self.commit([self.event(AlertAcknowledged(alert_id=alert_id, note=note, role=role, via="api"), None)])

    def report(
        self,
        day: date,
        device: str = "fridge-1",
        timezone: str = HK,
        rules: list[RuleDefinition] | None = None,
        now: float = math.inf,
        config: HaccpConfig | None = None,
    ) -> dict[str, Any] | None:
        with contextlib.closing(
            sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True)
        ) as conn:
            return build_report(
                conn,
                device,
                day,
                store_id="hk-001",
                store_name="Test Store",
                timezone=timezone,
                config=config or HaccpConfig(),
                rules=self.rules if rules is None else rules,
                now=now,
            )

    def rows(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT device_id, start, min_c, max_c, last_c, readings, defrost, faults FROM haccp_interval"
            " ORDER BY device_id, start"
        ).fetchall()


@pytest.fixture
def store(tmp_path: Path, time: Time) -> Iterator[Store]:
    made = Store(tmp_path / "journal.db", time, [WARM], HaccpConfig())
    yield made
    made.conn.close()


def test_readings_are_summarised_per_interval_in_the_stores_day_with_gaps_and_defrost_shown(
    store: Store,
) -> None:
    for hhmm, value in (("00:00", 4.0), ("00:05", 4.6), ("00:10", 4.2)):
        store.sample(at(DAY, hhmm) + 10, value)
    store.sample(at(DAY, "01:00") + 10, 12.5, defrost_active=1)  # a defrost: logged and flagged
    store.sample(at(DAY, "01:20") + 10, None)  # a faulty probe: no reading
    store.sample(at(DAY, "23:50"), 3.9)
    store.sample(at(DAY, "23:50"), 3.9, device="freezer-2")  # another fridge keeps its own log
    report = store.report(DAY)
    assert report is not None
    intervals = report["intervals"]
    assert (len(intervals), report["hours"], report["interval_s"]) == (96, 24, 900)
    assert (report["day_start"], report["day_end"]) == (
        "2026-11-02T00:00:00+08:00",
        "2026-11-03T00:00:00+08:00",
    )
    assert intervals[0] == {
        "start": "2026-11-02T00:00:00+08:00",
        "end": "2026-11-02T00:15:00+08:00",
        "readings": 3,
        "min_c": 4.0,
        "max_c": 4.6,
        "last_c": 4.2,
        "defrost": 0,
        "faults": 0,
        "clock_unsynced": 0,
        "above_limit": False,
        "gap": False,
    }
    assert [i["gap"] for i in intervals[1:4]] == [True, True, True]
    defrost = intervals[4]
    assert (defrost["start"], defrost["max_c"], defrost["defrost"], defrost["above_limit"]) == (
        "2026-11-02T01:00:00+08:00",
        12.5,
        1,
        True,
    )
    fault = intervals[5]
    assert (fault["readings"], fault["faults"], fault["gap"]) == (0, 1, True)
    assert report["gaps"] == [
        {"start": "2026-11-02T00:15:00+08:00", "end": "2026-11-02T01:00:00+08:00", "minutes": 45},
        {"start": "2026-11-02T01:15:00+08:00", "end": "2026-11-02T23:45:00+08:00", "minutes": 1350},
    ]
    assert report["readings"] == 5
    assert (report["limit_c"], report["limit_rules"], report["limit_note"]) == (
        8,
        [{"rule_id": "dairy-warm", "max_c": 8}],
        None,
    )
    # Bounded storage: one row per device and interval, whatever the reading rate.
    assert len(store.rows()) == 5
    # Today's log ends at the current interval: the rest of the day is not a gap yet.
    today = store.report(DAY, now=at(DAY, "01:10"))
    assert today is not None
    assert [i["start"][11:16] for i in today["intervals"]] == ["00:00", "00:15", "00:30", "00:45", "01:00"]

    table = list(csv.reader(io.StringIO(as_csv(report))))
    assert table[0] == ["HACCP temperature log"]
    assert ["limit_c", "8", ""] in table
    assert ["device", "fridge-1"] in table
    header = table.index(["interval_start", "interval_end", "readings", "min_c", "max_c", "last_c", "flags"])
    assert table[header + 1] == [
        "2026-11-02T00:00:00+08:00",
        "2026-11-02T00:15:00+08:00",
        "3",
        "4",
        "4.6",
        "4.2",
        "",
    ]
    assert table[header + 2][2:] == ["0", "", "", "", "gap"]
    assert table[header + 5][6] == "above_limit defrost"
    assert table[header + 6][6] == "gap probe_fault"


def test_the_limit_says_when_several_rules_or_none_watch_the_fridge(store: Store) -> None:
    store.sample(at(DAY, "08:00"), 4.0)
    several = RULES.validate_python(
        [WARM, {"id": "strict", "type": "temperature", "max_c": 5, "select": {"sources": ["dixell-xr"]}}]
    )
    report = store.report(DAY, rules=several)
    assert report is not None
    assert (report["limit_c"], report["limit_note"]) == (5, SEVERAL)
    assert [r["rule_id"] for r in report["limit_rules"]] == ["dairy-warm", "strict"]
    report = store.report(DAY, rules=[])
    assert report is not None
    assert (report["limit_c"], report["limit_rules"], report["limit_note"]) == (None, [], NO_RULE)
    assert {i["above_limit"] for i in report["intervals"]} == {None}
    assert ["limit_c", "none", NO_RULE] in list(csv.reader(io.StringIO(as_csv(report))))
    # A device the log never saw, that no rule names: none; one a rule names: a day of gaps.
    assert store.report(DAY, device="fridge-9") is None
    named = RULES.validate_python([{**WARM, "select": {"devices": ["fridge-9"]}}])
    report = store.report(DAY, device="fridge-9", rules=named)
    assert report is not None
    assert (report["readings"], len(report["gaps"]), report["limit_c"]) == (0, 1, 8)


def test_an_excursion_has_its_duration_its_corrective_action_and_who_acknowledged_it(store: Store) -> None:
    store.sample(at(DAY, "10:00"), 4.0)
    store.sample(at(DAY, "10:05"), 9.0)  # too warm: the rule waits for_s (10 min)
    store.sample(at(DAY, "10:10"), 9.5)
    store.sample(at(DAY, "10:15"), 10.0)  # raises
    store.ack(at(DAY, "10:20"), "dairy-warm/fridge-1/1", "moved the milk to the walk-in", "manager")
    store.sample(at(DAY, "10:25"), 5.0)  # recovering: clears after clear_for_s (5 min)
    store.sample(at(DAY, "10:30"), 5.0)  # clears
    store.sample(at(DAY, "10:35"), 9.0)
    store.sample(at(DAY, "10:45"), 9.0)  # a second excursion, open, not acknowledged
    report = store.report(DAY, now=at(DAY, "11:00"))
    assert report is not None
    first, second = report["excursions"]
    assert first == {
        "alert_id": "dairy-warm/fridge-1/1",
        "rule_id": "dairy-warm",
        "limit_c": 8,
        "start": "2026-11-02T10:05:00+08:00",
        "raised_at": "2026-11-02T10:15:00+08:00",
        "end": "2026-11-02T10:30:00+08:00",
        "open": False,
        "duration_min": 25,
        "max_c": 10,
        "ended_by": "recovered",
        "corrective_action": "moved the milk to the walk-in",
        "acknowledged_by": "manager",
        "acknowledged_at": "2026-11-02T10:20:00+08:00",
        "acknowledgements": [
            {
                "at": "2026-11-02T10:20:00+08:00",
                "note": "moved the milk to the walk-in",
                "role": "manager",
                "by": None,
                "via": "api",
            }
        ],
        "clock_synced": True,
    }
    assert (second["alert_id"], second["open"], second["end"], second["duration_min"]) == (
        "dairy-warm/fridge-1/2",
        True,
        None,
        25,
    )
    assert second["corrective_action"] is None
    table = list(csv.reader(io.StringIO(as_csv(report))))
    row = table[table.index(next(c for c in table if c[:1] == ["excursion_start"])) + 1]
    assert row == [
        "2026-11-02T10:05:00+08:00",
        "2026-11-02T10:30:00+08:00",
        "25.0",
        "10",
        "8",
        "dairy-warm/fridge-1/1",
        "moved the milk to the walk-in",
        "manager",
        "2026-11-02T10:20:00+08:00",
    ]
    # An excursion that runs past midnight is in both days' logs.
    assert store.report(date(2026, 11, 3)) is not None
    assert [e["alert_id"] for e in store.report(date(2026, 11, 3))["excursions"]] == ["dairy-warm/fridge-1/2"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("day", "hours"),
    [(date(2026, 3, 29), 23), (date(2026, 10, 25), 25), (date(2026, 6, 1), 24)],
)
def test_a_dst_day_has_23_or_25_hours_of_intervals(store: Store, day: date, hours: int) -> None:
    start, end = day_bounds(day, LONDON)
    store.sample(start + 60, 4.0)
    store.sample(end - 60, 4.5)
    report = store.report(day, timezone=LONDON)
    assert report is not None
    assert (report["hours"], len(report["intervals"])) == (hours, hours * 4)
    assert report["intervals"][0]["readings"] == 1
    assert report["intervals"][-1]["readings"] == 1
    assert report["intervals"][-1]["end"] == report["day_end"]


def test_the_repeated_hour_of_the_autumn_change_is_two_hours_of_the_log(store: Store) -> None:
    day = date(2026, 10, 25)
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC).timestamp()  # 01:30 BST
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC).timestamp()  # 01:30 GMT
    store.sample(first, 4.0)
    store.sample(second, 6.0)
    report = store.report(day, timezone=LONDON)
    assert report is not None
    logged = [(i["start"], i["last_c"]) for i in report["intervals"] if i["readings"]]
    assert logged == [("2026-10-25T01:30:00+01:00", 4.0), ("2026-10-25T01:30:00+00:00", 6.0)]


def test_a_day_keeps_the_intervals_it_was_logged_with(store: Store) -> None:
    store.sample(at(DAY, "06:01"), 4.0)
    store.sample(at(DAY, "06:06"), 5.0)
    report = store.report(DAY, config=HaccpConfig(interval_s=300))
    assert report is not None
    assert (len(report["intervals"]), report["interval_s"], report["intervals"][24]["readings"]) == (
        96,
        900,
        2,
    )
    store.start([WARM], HaccpConfig(interval_s=300))
    after = date(2026, 11, 3)
    for hhmm, value in (("06:01", 4.0), ("06:06", 5.0), ("06:11", 3.0)):
        store.sample(at(after, hhmm), value)
    fine = store.report(after, config=HaccpConfig(interval_s=300))
    assert fine is not None
    assert [i["readings"] for i in fine["intervals"][72:75]] == [1, 1, 1]
    coarse = store.report(after)
    assert coarse is not None
    quarter = coarse["intervals"][24]
    assert (quarter["readings"], quarter["min_c"], quarter["max_c"], quarter["last_c"]) == (3, 3.0, 5.0, 3.0)


def test_events_fed_again_after_a_restart_are_not_counted_twice(store: Store) -> None:
    events = []
    for minute, value in ((0, 4.0), (5, 5.0), (20, 6.0)):
        store.move_to(at(DAY, "09:00") + minute * 60)
        events.append(store.event(SensorSample(values={"temperature": value}), "fridge-1"))
    store.commit(events[:2])
    store.commit(events[2:])
    before = store.rows()
    assert [(r[5], r[2], r[3]) for r in before] == [(2, 4.0, 5.0), (1, 6.0, 6.0)]
    store.start([WARM])  # a restart: a new log over the same file
    store.commit(events)  # the same seqs again
    store.commit(events[1:2])
    assert store.rows() == before


def test_rows_past_the_retention_are_pruned_and_the_retention_is_at_least_400_days(store: Store) -> None:
    old = at(DAY, "08:00")
    store.sample(old, 4.0)
    store.sample(old + 300, 9.0)
    store.sample(old + 900, 9.0)  # raises
    store.sample(old + 1200, 5.0)
    store.sample(old + 1500, 5.0)  # clears
    store.sample(old + 2 * 86400, 4.0)
    assert len(store.conn.execute("SELECT 1 FROM haccp_excursion").fetchall()) == 1
    store.sample(old + 399 * 86400, 4.0)  # everything still there
    assert len(store.rows()) == 4
    # A reading stamped by an unsynchronised clock years ahead is logged there, and prunes nothing.
    store.seq += 1
    ahead = SensorSample(values={"temperature": 4.0})
    store.commit([Event(store.seq, "sensor.sample", "fridge-1", b"{}", ahead, old + 900 * 86400, False)])
    assert len(store.rows()) == 5
    store.start([WARM])  # the prune is due again at start
    store.sample(old + 401 * 86400, 4.0)
    days = [datetime.fromtimestamp(r[1], ZoneInfo(HK)).date() for r in store.rows()]
    assert days == [DAY + timedelta(days=n) for n in (2, 399, 401, 900)]
    assert store.conn.execute("SELECT 1 FROM haccp_excursion").fetchall() == []
    for bad in ({"retention_days": 399}, {"interval_s": 700}, {"interval_s": 30}):
        with pytest.raises(ValidationError):
            HaccpConfig.model_validate(bad)
    assert HaccpConfig.model_validate({"interval_s": 300, "retention_days": 730}).retention_days == 730


def test_bad_input_never_crashes_the_log(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    store.move_to(at(DAY, "12:00"))
    garbage = [
        Event(
            store.seq + 1,
            "sensor.sample",
            "fridge-1",
            b'{"values":{"temperature":"hot"}}',
            None,
            store.time.wall,
        ),
        Event(store.seq + 2, "sensor.sample", None, b'{"values":{"temperature":4}}', None, store.time.wall),
        Event(store.seq + 3, "sensor.sample", "fridge-1", b'{"values":{"temperature":4}}', None, None),
        Event(
            store.seq + 4, "sensor.sample", "fridge-1", b'{"values":{"humidity":40}}', None, store.time.wall
        ),
        Event(store.seq + 5, "sensor.sample", "fridge-1", b"not json", None, store.time.wall),
    ]
    store.seq += len(garbage)
    nonsense = AlertRaised(
        rule="temperature",
        severity="critical",
        subject="fridge-1",
        message="made up",
        details={"alert_id": "x/fridge-1/1", "due_at": "yesterday", "for_s": "long", "limit_c": True},
    )
    huge = AlertRaised(
        rule="temperature",
        severity="critical",
        subject="fridge-1",
        message="made up",
        details={
            "alert_id": "y/fridge-1/1",
            "due_at": "9999-12-31T23:59:59-23:59",
            "for_s": 10**400,
            "max_c": 10**400,
        },
    )
    unnamed = AlertRaised(rule="temperature", severity="critical", subject="fridge-1", message="no id")
    failed = AlertRaised(rule="gateway.processor_failed", severity="critical", subject="rules", message="m")
    stray = [
        store.event(nonsense, "fridge-1"),
        store.event(nonsense, "fridge-1"),  # the same alert id again
        store.event(unnamed, "fridge-1"),
        store.event(huge, "fridge-1"),
        store.event(failed, None),
        store.event(
            AlertCleared(
                rule="temperature", subject="f", alert_id="nope/f/1", reason="recovered", message="m"
            ),
            "f",
        ),
        store.event(AlertAcknowledged(alert_id="nope/f/1", note="=cmd()", role="x", via="hq"), None),
        store.event(
            AlertAcknowledged(alert_id="x/fridge-1/1", note='=HYPERLINK("evil")', role="+chef", via="api"),
            None,
        ),
    ]
    store.commit([*garbage, *stray])
    store.time.synced = False  # placed by the clock it has, and flagged
    store.sample(at(DAY, "12:05"), 4.0)
    store.time.synced = True
    # (The rule engine skips the payloads that do not validate; the log passes over them.)
    assert "haccp" not in {store.pipeline.skipped_by(e.seq) for e in [*garbage, *stray]}
    assert not [r for r in caplog.records if "processor haccp" in r.getMessage()]
    assert [r[5] for r in store.rows()] == [1]  # none of the garbage, the one good reading
    report = store.report(DAY)
    assert report is not None
    unsynced = report["intervals"][48]
    assert (unsynced["readings"], unsynced["clock_unsynced"]) == (1, 1)
    assert [
        (e["alert_id"], e["start"], e["limit_c"], e["max_c"], e["open"]) for e in report["excursions"]
    ] == [
        ("x/fridge-1/1", "2026-11-02T12:00:00+08:00", None, None, True),
        ("y/fridge-1/1", "2026-11-02T12:00:00+08:00", None, None, True),
    ]
    text = as_csv(report)
    assert "2026-11-02T12:00:00+08:00,2026-11-02T12:15:00+08:00,1,4,4,4,clock_unsynced" in text
    assert "'=HYPERLINK" in text
    assert "'+chef" in text


async def test_the_log_outlives_its_events_in_the_journal_and_a_restart_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    def sample(value: float) -> Draft:
        body = orjson.dumps({"values": {"temperature": value}, "source": "dixell-xr"})
        return Draft("sensor.sample", "fridge-1", body, driver="modbus")

    journal = new_journal(tmp_path, processors=[HaccpLog()])
    async with running(journal):
        for value in (4.0, 4.5, 5.0):
            journal.submit(sample(value))
        await flushed(journal)
    reopened = new_journal(tmp_path, processors=[HaccpLog()])
    async with running(reopened):
        reopened.submit(sample(3.5))
        await flushed(reopened)
    # The outbox's TTL and disk budget delete events rows, and nothing else: here, all of them.
    with contextlib.closing(sqlite3.connect(reopened.path)) as conn, conn:
        conn.execute("DELETE FROM events")
    assert query(reopened, "SELECT COUNT(*) FROM events") == [(0,)]
    rows = query(reopened, "SELECT start, min_c, max_c, readings FROM haccp_interval")
    assert sum(r[3] for r in rows) == 4
    assert (min(r[1] for r in rows), max(r[2] for r in rows)) == (3.5, 5.0)
    days = {datetime.fromtimestamp(r[0], UTC).date() for r in rows}
    with contextlib.closing(sqlite3.connect(reopened.path)) as conn:
        reports = [
            build_report(
                conn,
                "fridge-1",
                day,
                store_id="s",
                store_name="S",
                timezone="UTC",
                config=HaccpConfig(),
                rules=[],
                now=math.inf,
            )
            for day in days
        ]
    assert sum(r["readings"] for r in reports if r is not None) == 4


async def test_the_api_serves_the_log_as_json_and_csv_over_http(store: Store) -> None:
    store.sample(at(DAY, "10:00"), 4.0)
    store.sample(at(DAY, "10:05"), 9.0)
    store.sample(at(DAY, "10:15"), 9.5)
    store.ack(at(DAY, "10:20"), "dairy-warm/fridge-1/1", "door fixed", "staff")
    router = haccp_router(
        store.path,
        store_id="hk-001",
        store_name="Test Store",
        timezone=HK,
        config=HaccpConfig(),
        rules=lambda: store.rules,
        clock=lambda: at(DAY, "11:00"),
    )
    app = create_app(store.path, TOKEN, Metrics(), lambda: {"status": "ok"}, routers=[router])
    async with api_running(app) as (base, _), httpx.AsyncClient(base_url=base, timeout=10) as client:
        url = "/api/haccp?device=fridge-1&date=2026-11-02"
        assert (await client.get(url)).status_code == 401
        answer = await client.get(url, headers=AUTH)
        assert answer.status_code == 200, answer.text
        log = answer.json()
        assert (log["device_id"], log["limit_c"], len(log["intervals"]), log["readings"]) == (
            "fridge-1",
            8,
            44,
            3,
        )
        [excursion] = log["excursions"]
        assert (excursion["corrective_action"], excursion["acknowledged_by"], excursion["open"]) == (
            "door fixed",
            "staff",
            True,
        )
        answer = await client.get(url + "&format=csv", headers=AUTH)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/csv")
        assert 'filename="haccp-fridge-1-2026-11-02.csv"' in answer.headers["content-disposition"]
        table = list(csv.reader(io.StringIO(answer.text)))
        assert [
            "2026-11-02T10:00:00+08:00",
            "2026-11-02T10:15:00+08:00",
            "2",
            "4",
            "9",
            "9",
            "above_limit",
        ] in table
        assert next(c for c in table if c[:1] == ["2026-11-02T10:05:00+08:00"])[6:8] == [
            "door fixed",
            "staff",
        ]
        for bad in (
            "/api/haccp?device=fridge-1&date=2026-02-30",
            "/api/haccp?device=fridge-1&date=02.11.2026",
            "/api/haccp?device=fridge%201&date=2026-11-02",
            "/api/haccp?date=2026-11-02",
            url + "&format=xml",
            "/api/haccp?device=fridge-1&date=9999-12-31",
            "/api/haccp?device=fridge-1&date=0001-01-01",
            "/api/haccp?device=fridge-1&date=1969-12-31",
            "/api/haccp?device=fridge-1&date=3000-01-01",
        ):
            assert (await client.get(bad, headers=AUTH)).status_code == 422, bad
        missing = await client.get("/api/haccp?device=fridge-9&date=2026-11-02", headers=AUTH)
        assert missing.status_code == 404


STORE_YAML = """\
gateway_id: gw-01
store:
  id: hk-001
  name: Test Store
  timezone: Asia/Hong_Kong
data_dir: data
hq:
  host: hq.example.com
api:
  token: {env: API_TOKEN}
rules:
  - {id: dairy-warm, type: temperature, max_c: 8}
haccp:
  interval_s: 900
"""


def test_the_cli_writes_the_log_read_only_as_csv_and_json(tmp_path: Path, time: Time) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(STORE_YAML)
    (tmp_path / "data").mkdir()
    made = Store(tmp_path / "data" / "journal.db", time, [WARM], HaccpConfig())
    made.sample(at(DAY, "07:00"), 3.0)
    made.sample(at(DAY, "07:05"), 3.5)
    made.conn.close()
    out = tmp_path / "dairy.csv"
    args = ["haccp", "--config", str(config), "--device", "fridge-1", "--date", "2026-11-02"]
    result = cli(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = list(csv.reader(io.StringIO(out.read_text())))
    assert ["limit_c", "8", ""] in table
    assert ["2026-11-02T07:00:00+08:00", "2026-11-02T07:15:00+08:00", "2", "3", "3.5", "3.5", ""] in table
    assert len([r for r in table if r[:1] and r[0].startswith("2026-11-02T")]) == 96
    result = cli(*args, "--format", "json", "--out", "-")
    assert result.returncode == 0, result.stderr
    log = orjson.loads(result.stdout)
    assert (log["readings"], log["timezone"], log["limit_rules"]) == (
        2,
        HK,
        [{"rule_id": "dairy-warm", "max_c": 8.0}],
    )
    assert cli(*args[:-1], "2026-13-01", "--out", str(out)).returncode == 2
    for far in ("9999-12-31", "0001-01-01"):  # years 1970 to 2999 only
        refused = cli(*args[:-1], far, "--out", str(out))
        assert refused.returncode == 2
        assert "out of range" in refused.stderr
    unknown = cli(*args[:4], "fridge-9", *args[5:], "--out", str(out))
    assert unknown.returncode == 1
    assert "no temperature log of device 'fridge-9'" in unknown.stderr


def test_a_bad_haccp_section_is_reported_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(STORE_YAML.replace("interval_s: 900", "interval_s: 700\n  retention_days: 30"))
    with pytest.raises(ConfigError) as info:
        load_config(config, env={"API_TOKEN": "x" * 20})
    text = str(info.value)
    assert f"{config}:14:" in text
    assert "haccp.interval_s" in text
    assert "must divide 900" in text
    assert f"{config}:15:" in text
    assert "haccp.retention_days" in text


async def test_a_running_gateway_logs_a_fridge_and_serves_its_day(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    """The whole gateway: readings over MQTT, the rule engine's excursion acknowledged through the API, and the
    day's log from GET /api/haccp."""
    rule = {"id": "dairy-warm", "type": "temperature", "max_c": 8, "for_s": 0, "clear_for_s": 0}
    config = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=tmp_path / "data",
        devices=(),
        json_sensors=("fridge-dairy",),
        rules=[rule],
    )
    journal = tmp_path / "data" / "journal.db"

    def kinds() -> list[str]:
        with contextlib.closing(sqlite3.connect(journal)) as conn:
            return [
                k for (k,) in conn.execute("SELECT kind FROM events WHERE kind LIKE 'alert.%' ORDER BY seq")
            ]

    sensor = MqttClient(broker_config(store_broker), "sensor-fridge-dairy", clean_start=True)
    async with running_gateway(load(config)) as gateway:
        port = await gateway.wait_api()
        await sensor.connect()
        headers = {"Authorization": f"Bearer {E2E_TOKEN}"}
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                await sensor.publish("store/sensor/fridge-dairy/state", b'{"temperature": 9.5}', qos=1)
                await poll_until(lambda: kinds() == ["alert.raised"], "the excursion is raised")
                body = {"note": "moved the milk to the walk-in", "role": "manager"}
                done = await client.post(
                    "/api/alerts/dairy-warm/fridge-dairy/1/ack", json=body, headers=headers
                )
                assert done.status_code == 200, done.text
                await sensor.publish("store/sensor/fridge-dairy/state", b'{"temperature": 4.0}', qos=1)
                await poll_until(lambda: kinds()[-1:] == ["alert.cleared"], "the excursion is cleared")
                with contextlib.closing(sqlite3.connect(journal)) as conn:
                    [(recorded_at,)] = conn.execute(
                        "SELECT recorded_at FROM events WHERE kind='sensor.sample' ORDER BY seq LIMIT 1"
                    ).fetchall()
                day = datetime.fromisoformat(recorded_at).astimezone(ZoneInfo(HK)).date().isoformat()
                answer = await client.get(f"/api/haccp?device=fridge-dairy&date={day}", headers=headers)
                assert answer.status_code == 200, answer.text
                log = answer.json()
                csv_answer = await client.get(
                    f"/api/haccp?device=fridge-dairy&date={day}&format=csv", headers=headers
                )
                assert csv_answer.status_code == 200
        finally:
            await sensor.disconnect()
    assert (log["limit_c"], log["timezone"]) == (8, HK)
    [excursion] = log["excursions"]
    assert (excursion["alert_id"], excursion["corrective_action"], excursion["acknowledged_by"]) == (
        "dairy-warm/fridge-dairy/1",
        "moved the milk to the walk-in",
        "manager",
    )
    assert excursion["open"] is False
    logged = [(i["readings"], i["max_c"]) for i in log["intervals"] if i["readings"]]
    assert sum(n for n, _ in logged) == 2  # (the two readings may fall in two intervals)
    assert max(m for _, m in logged) == 9.5
    assert "moved the milk to the walk-in,manager" in csv_answer.text


def test_a_damaged_excursion_row_and_cells_that_look_like_formulas_are_printed_safely(store: Store) -> None:
    """An acknowledgement time no date has is left empty (not a crash); a cell a spreadsheet would run as a
    formula, after spaces or a line break, gets a leading quote; a long duration is printed in minutes."""
    store.sample(at(DAY, "10:00"), 4.0)
    store.conn.execute(
        "INSERT INTO haccp_excursion VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            '=HYPERLINK("http://x")',
            "fridge-1",
            "dairy-warm",
            8.0,
            at(DAY, "01:00") - 3 * 365 * 86400,
            at(DAY, "01:00") - 3 * 365 * 86400,
            None,
            9.0,
            None,
            orjson.dumps(
                [{"at": 1e300, "note": " =1+1", "role": "\n=cmd"}, {"at": at(DAY, "02:00"), "role": "  @x"}]
            ).decode(),
            1,
            1,
        ),
    )
    log = store.report(DAY, now=at(DAY, "12:00"))
    assert log is not None
    [excursion] = log["excursions"]
    assert (excursion["acknowledged_at"], excursion["acknowledgements"][1]["at"]) == (
        None,
        "2026-11-02T02:00:00+08:00",
    )
    assert log["excursions_truncated"] is False
    table = list(csv.reader(io.StringIO(as_csv(log))))
    row = next(r for r in table if r[5:6] == ['\'=HYPERLINK("http://x")'])
    assert row[2] == f"{(at(DAY, '12:00') - excursion_start(log)) / 60:.1f}"
    assert "e+" not in row[2]
    assert (row[6], row[7]) == ("' =1+1", "'\n=cmd,   @x")


def excursion_start(log: dict[str, Any]) -> float:
    return datetime.fromisoformat(log["excursions"][0]["start"]).timestamp()


def test_a_day_lists_at_most_500_excursions_and_says_so(store: Store) -> None:
    store.sample(at(DAY, "10:00"), 4.0)
    store.conn.executemany(
        "INSERT INTO haccp_excursion VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            (
                f"dairy-warm/fridge-1/{n}",
                "fridge-1",
                "dairy-warm",
                8.0,
                at(DAY, "03:00") + n,
                0,
                at(DAY, "04:00"),
                9.0,
                "recovered",
                "[]",
                1,
                1,
            )
            for n in range(501)
        ],
    )
    log = store.report(DAY, now=at(DAY, "12:00"))
    assert log is not None
    assert (len(log["excursions"]), log["excursions_truncated"]) == (500, True)
    assert ["more excursions than the 500 listed"] in list(csv.reader(io.StringIO(as_csv(log))))
    with pytest.raises(ValueError, match="out of range"):
        day_bounds(date(9999, 12, 31), HK)


def test_a_fridge_is_logged_by_the_metric_its_temperature_rule_reads(tmp_path: Path, time: Time) -> None:
    """A Modbus controller reports ``air_temperature``: its temperature rule says so, and the log follows the rule;
    a device no temperature rule watches is logged by ``temperature``, and nothing else is taken for one."""
    rule = {**WARM, "id": "cabinet-warm", "metric": "air_temperature", "select": {"devices": ["cabinet-1"]}}
    store = Store(tmp_path / "journal.db", time, [rule], HaccpConfig())
    try:
        store.move_to(at(DAY, "08:00") + 10)
        samples = [
            ("cabinet-1", {"air_temperature": 3.5, "evaporator_temperature": -12.0}),
            ("probe-2", {"temperature": 5.0}),
            ("scale-3", {"weight_kg": 2.0}),
        ]
        store.commit([store.event(SensorSample(values=v, source="dixell-xr"), d) for d, v in samples])
        cabinet = store.report(DAY, device="cabinet-1")
        assert cabinet is not None
        logged = [i for i in cabinet["intervals"] if i["readings"]]
        assert [(i["last_c"], i["readings"]) for i in logged] == [(3.5, 1)]
        probe = store.report(DAY, device="probe-2")
        assert probe is not None
        assert [i["last_c"] for i in probe["intervals"] if i["readings"]] == [5.0]
        assert store.report(DAY, device="scale-3") is None
    finally:
        store.conn.close()


def test_a_rule_for_one_format_does_not_change_how_other_devices_are_logged(
    tmp_path: Path, time: Time
) -> None:
    """A rule for the Modbus controllers' format (``select.sources``) reads ``air_temperature``: a BLE probe that says
    ``temperature`` is logged by it all the same, and so is a reading without the rule's metric."""
    rule = {**WARM, "id": "cabinets", "metric": "air_temperature", "select": {"sources": ["dixell-xr"]}}
    store = Store(tmp_path / "journal.db", time, [rule], HaccpConfig())
    try:
        store.move_to(at(DAY, "08:00") + 10)
        samples = [
            ("cabinet-1", SensorSample(values={"air_temperature": 3.5}, source="dixell-xr")),
            ("probe-2", SensorSample(values={"temperature": 5.0}, source="ruuvi-rawv2")),
            ("cabinet-3", SensorSample(values={"temperature": 6.0}, source="dixell-xr")),
        ]
        store.commit([store.event(model, device) for device, model in samples])
        for device, value in (("cabinet-1", 3.5), ("probe-2", 5.0), ("cabinet-3", 6.0)):
            report = store.report(DAY, device=device)
            assert report is not None, device
            assert [i["last_c"] for i in report["intervals"] if i["readings"]] == [value], device
    finally:
        store.conn.close()
