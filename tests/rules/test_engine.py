"""The rule engine on a real SQLite file, with the rules' clock moved by the test: alerts raise once per episode,
clear with hysteresis, ignore defrost and door readings, keep their timers across a restart, and start afresh
when their rule changes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from gateway.kernel.events import AlertCleared, AlertRaised, DeviceStatus, SensorSample
from gateway.kernel.pipeline import Event, Pipeline
from gateway.kernel.rule_config import RuleDefinition
from rules.clock import RuleClock
from rules.engine import RuleEngine
from tests.gateway.test_pipeline import Writer

RULE = TypeAdapter(RuleDefinition)


class Time:
    """The monotonic and wall clocks the rules' clock reads, moved by the test."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0
        self.synced = True

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def clock(self) -> RuleClock:
        return RuleClock(lambda: self.synced, lambda: self.mono, lambda: self.wall)


class Rig:
    """A journal file, and the engine as the journal's writer runs it (one transaction per call)."""

    def __init__(self, path: Path, rules: list[dict[str, Any]], time: Time) -> None:
        self.path = path
        self.time = time
        self.seq = 0
        self.alerts: list[AlertRaised | AlertCleared] = []
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.start(rules)

    def start(self, rules: list[dict[str, Any]]) -> None:
        defs = [RULE.validate_python(r) for r in rules]
        self.engine = RuleEngine(defs, self.time.clock(), wall=lambda: self.time.wall)
        self.pipeline = Pipeline([self.engine])
        self.pipeline.setup(self.conn)

    def _commit(self, work: Any) -> None:
        writer = Writer(self.seq)
        self.conn.execute("BEGIN IMMEDIATE")
        work(writer)
        self.conn.execute("COMMIT")
        self.pipeline.committed()
        self.seq = writer.last_seq
        self.alerts += [e.model for e in writer.emitted if isinstance(e.model, AlertRaised | AlertCleared)]

    def sample(self, device: str = "fridge-1", **values: float) -> None:
        self.seq += 1
        model = SensorSample(values=values, source="dixell-xr")
        event = Event(self.seq, "sensor.sample", device, model.model_dump_json().encode(), model)
        self._commit(lambda w: self.pipeline.run(self.conn, [event], w.append))

    def status(self, status: str, device: str = "fridge-1") -> None:
        self.seq += 1
        model = DeviceStatus(status=status, reason="poll timed out" if status == "error" else None)  # type: ignore[arg-type]
        event = Event(self.seq, "device.status", device, model.model_dump_json().encode(), model)
        self._commit(lambda w: self.pipeline.run(self.conn, [event], w.append))

    def tick(self) -> None:
        self._commit(lambda w: self.pipeline.tick(self.conn, self.time.wall, w.append))

    def kinds(self) -> list[tuple[str, str]]:
        return [("raised" if isinstance(a, AlertRaised) else "cleared", a.subject) for a in self.alerts]


@pytest.fixture
def time() -> Time:
    return Time()


@pytest.fixture
def rig_at(tmp_path: Path, time: Time) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(rules: list[dict[str, Any]]) -> Rig:
        rig = Rig(tmp_path / "journal.db", rules, time)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        with contextlib.suppress(sqlite3.Error):
            rig.conn.close()


WARM = {
    "id": "dairy-warm",
    "type": "temperature",
    "max_c": 8,
    "for_s": 600,
    "clear_below_c": 6,
    "clear_for_s": 300,
}


def test_too_warm_for_long_enough_raises_once_and_recovery_clears_once(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(599)
    rig.sample(temperature=9.5)
    rig.tick()
    assert rig.alerts == []
    time.advance(1)
    rig.tick()
    rig.tick()
    [raised] = rig.alerts
    assert isinstance(raised, AlertRaised)
    assert (raised.rule, raised.subject, raised.severity) == ("temperature", "fridge-1", "warning")
    assert raised.details["alert_id"] == "dairy-warm/fridge-1/1"
    assert raised.details["first"] == {"seq": 1, "value": 9.0}
    assert raised.details["max_c"] == 9.5
    assert raised.details["due_at"] == "2027-01-15T08:10:00Z"
    rig.sample(temperature=7.0)  # in the hysteresis band: still an excursion
    time.advance(400)
    rig.tick()
    rig.sample(temperature=5.0)
    time.advance(299)
    rig.tick()
    assert len(rig.alerts) == 1
    time.advance(1)
    rig.tick()
    cleared = rig.alerts[1]
    assert isinstance(cleared, AlertCleared)
    assert (cleared.alert_id, cleared.reason) == ("dairy-warm/fridge-1/1", "recovered")
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    assert rig.alerts[2].details["alert_id"] == "dairy-warm/fridge-1/2"  # the next episode


def test_a_reading_back_in_range_before_the_duration_raises_nothing(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(500)
    rig.sample(temperature=7.9)
    time.advance(500)
    rig.tick()
    assert rig.alerts == []


def test_defrost_door_and_faulty_readings_count_for_nothing(rig_at: Any, time: Time) -> None:
    rig = rig_at([{**WARM, "post_defrost_grace_s": 900, "door_grace_s": 120}])
    rig.sample(temperature=12.0, defrost_active=1)
    time.advance(800)
    rig.sample(temperature=11.0, defrost_active=0)  # within the grace after the defrost
    time.advance(800)
    rig.tick()
    assert rig.alerts == []
    rig.sample(temperature=10.0, door_open=1)
    time.advance(60)
    rig.sample(temperature=10.0, door_open=0)  # within the door's grace
    rig.sample(humidity=40.0)  # no temperature: a fault is not in range either
    time.advance(700)
    rig.tick()
    assert rig.alerts == []


def test_a_timer_survives_a_restart_and_counts_the_time_away(rig_at: Any, time: Time) -> None:
    """Waiting 10 min above 8 °C, restarted at minute 6 after 2 min away: fires at minute 10, not 16."""
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(240)
    rig.tick()  # the rules' clock saved at minute 4
    time.advance(120)  # running until minute 6, unsaved
    rig.conn.close()
    time.advance(120)  # away for 2 min; the monotonic clock of the new boot starts elsewhere
    time.mono = 5.0
    rig2 = rig_at([WARM])
    rig2.tick()
    assert rig2.alerts == []
    time.advance(119)
    rig2.tick()
    assert rig2.alerts == []
    time.advance(1)
    rig2.tick()
    assert rig2.kinds() == [("raised", "fridge-1")]


def test_overdue_at_start_fires_once_with_the_time_it_was_due(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    rig.tick()
    rig.conn.close()
    time.advance(3600)  # down for an hour
    rig2 = rig_at([WARM])
    rig2.tick()
    rig2.tick()
    [raised] = rig2.alerts
    assert raised.details["due_at"] == "2027-01-15T08:10:00Z"


def test_an_open_alert_is_not_raised_again_after_a_restart_and_still_clears(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    rig.conn.close()
    rig2 = rig_at([WARM])
    rig2.sample(temperature=9.0)
    time.advance(600)
    rig2.tick()
    assert rig2.alerts == []
    rig2.sample(temperature=5.0)
    time.advance(300)
    rig2.tick()
    assert rig2.kinds() == [("cleared", "fridge-1")]


def test_a_changed_rule_clears_its_open_alerts_and_an_unchanged_one_keeps_them(
    rig_at: Any, time: Time
) -> None:
    other = {
        **WARM,
        "id": "freezer-warm",
        "max_c": -15,
        "clear_below_c": -17,
        "select": {"devices": ["freezer-1"]},
    }
    rig = rig_at([WARM, other])
    rig.sample(temperature=9.0)
    rig.sample(device="freezer-1", temperature=-10.0)
    time.advance(600)
    rig.tick()
    assert sorted(rig.kinds()) == [("raised", "freezer-1"), ("raised", "fridge-1")]
    rig.conn.close()
    rig2 = rig_at([{**WARM, "max_c": 9}, other])
    rig2.tick()
    [cleared] = rig2.alerts
    assert isinstance(cleared, AlertCleared)
    assert (cleared.alert_id, cleared.reason) == ("dairy-warm/fridge-1/1", "rule_changed")
    rig2.sample(device="freezer-1", temperature=-20.0)
    time.advance(300)
    rig2.tick()
    assert rig2.kinds()[1:] == [("cleared", "freezer-1")]  # the unchanged rule kept its alert and timers


def test_a_silent_device_raises_and_its_next_reading_clears(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "quiet", "type": "silent", "after_s": 900}])
    rig.sample(temperature=4.0)
    time.advance(899)
    rig.tick()
    assert rig.alerts == []
    time.advance(1)
    rig.tick()
    rig.tick()
    assert rig.kinds() == [("raised", "fridge-1")]
    rig.sample(temperature=4.0)
    assert rig.kinds() == [("raised", "fridge-1"), ("cleared", "fridge-1")]
    rig.status("error")
    rig.status("error")
    assert rig.kinds()[2:] == [("raised", "fridge-1")]
    assert rig.alerts[2].details["alert_id"] == "quiet/fridge-1/2"


def test_a_selector_keeps_a_rule_to_its_devices(rig_at: Any, time: Time) -> None:
    rig = rig_at([{**WARM, "select": {"devices": ["fridge-2"]}}])
    rig.sample(temperature=20.0)
    time.advance(1000)
    rig.tick()
    assert rig.alerts == []
