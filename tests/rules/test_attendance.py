"""``attendance`` on a real SQLite file with the rules' clock moved by the test: the geofence (haversine, the fix's
accuracy circle), the face-match score, late / early leave / no show against HQ's roster in the store's timezone,
timers and the daily summary across restarts, and store-local days across a DST change."""

from __future__ import annotations

import contextlib
import math
import re
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from cloud_bridge.documents import Roster
from gateway.config_loader import check_config
from gateway.kernel.config import Location
from gateway.kernel.events import AlertCleared, AlertRaised, AttendanceDaily, StaffCheckin
from gateway.kernel.pipeline import Event
from gateway.kernel.store_hours import StoreHours
from rules.attendance import EARTH_RADIUS_M, haversine_m
from rules.backtest import replay
from tests.gateway.test_pipeline import Writer
from tests.rules.conftest import RULE, Rig, Time

HK = "Asia/Hong_Kong"
"""The test's clock starts at 2027-01-15 08:00 UTC: 16:00 in Hong Kong."""
STORE = Location(latitude=22.2800, longitude=114.1840, geofence_radius_m=100)
GATEWAY = "gateway_id: gw-01\nhq: {host: hq.example}\napi: {token: {env: GATEWAY_API_TOKEN}}\n"
RULE_DEF: dict[str, Any] = {"id": "att", "type": "attendance", "grace_s": 300, "no_show_after_s": 900}


def local(day: int, hh: int, mm: int = 0, zone: str = HK, month: int = 1, year: int = 2027) -> datetime:
    return datetime(year, month, day, hh, mm, tzinfo=ZoneInfo(zone))


def roster(*shifts: tuple[str, datetime, datetime]) -> Roster:
    staff: dict[str, list[dict[str, str]]] = {}
    for employee, start, end in shifts:
        staff.setdefault(employee, []).append({"start": start.isoformat(), "end": end.isoformat()})
    return Roster.model_validate(
        {
            "staff": [
                {"staff_id": e, "name": f"Name {e}", "role": "sales", "shifts": s} for e, s in staff.items()
            ]
        }
    )


def start(
    att: Any, found: Roster | None, rule: dict[str, Any] | None = None, zone: str = HK
) -> AttendanceRig:
    """The engine as the runtime builds it: the store's timezone, its geofence and HQ's roster."""
    rig: AttendanceRig = att([rule or RULE_DEF])
    rig.engine.hours = StoreHours(zone)
    rig.engine.location = STORE
    rig.engine.roster = found
    rig.tick()  # the first write sets the rule's timers for the roster
    return rig


def checkin(
    rig: AttendanceRig,
    employee: str = "e1",
    direction: str = "in",
    *,
    north_m: float = 0.0,
    accuracy_m: float = 10.0,
    score: float = 0.95,
) -> None:
    rig.seq += 1
    model = StaffCheckin(
        employee_id=employee,
        direction=direction,
        latitude=STORE.latitude + north_m / 111_195.0,
        longitude=STORE.longitude,
        accuracy_m=accuracy_m,
        face_match_score=score,
    )
    event = Event(rig.seq, "staff.checkin", "kiosk-1", model.model_dump_json().encode(), model)
    rig._commit(lambda w: rig.pipeline.run(rig.conn, [event], w.append))


def until(rig: AttendanceRig, time: Time, at: datetime, step_s: float = 600) -> None:
    """Move the clocks to ``at``, ticking on the way (as the journal's writer does)."""
    target = at.timestamp()
    while time.wall < target:
        time.advance(min(step_s, target - time.wall))
        rig.tick()


def raised(rig: AttendanceRig) -> list[tuple[str, str]]:
    return [(a.details["flag"], a.subject) for a in rig.alerts if isinstance(a, AlertRaised)]


def dailies(rig: AttendanceRig) -> list[AttendanceDaily]:
    return [e.model for e in rig.emitted if isinstance(e.model, AttendanceDaily)]


class AttendanceRig(Rig):
    """The rules' rig, keeping every event the engine emits (the daily summaries as well as the alerts)."""

    def __init__(self, path: Path, rules: list[dict[str, Any]], time: Time) -> None:
        self.emitted: list[Any] = []
        super().__init__(path, rules, time)

    def _commit(self, work: Any) -> None:
        def keep(writer: Writer) -> None:
            work(writer)
            self.emitted += writer.emitted

        super()._commit(keep)


@pytest.fixture
def att(tmp_path: Path, time: Time) -> Iterator[Callable[[list[dict[str, Any]]], AttendanceRig]]:
    rigs: list[AttendanceRig] = []

    def make(rules: list[dict[str, Any]]) -> AttendanceRig:
        rigs.append(AttendanceRig(tmp_path / "journal.db", rules, time))
        return rigs[-1]

    yield make
    for rig in rigs:
        with contextlib.suppress(sqlite3.Error):
            rig.conn.close()


# --- the distance --------------------------------------------------------------------------------------------


def test_haversine_edge_cases() -> None:
    assert haversine_m(22.28, 114.184, 22.28, 114.184) == 0.0
    assert haversine_m(0, 0, 0, 1) == pytest.approx(111_195, rel=1e-4)  # a degree at the equator
    assert haversine_m(0, 179.9995, 0, -179.9995) == pytest.approx(111.2, abs=0.1)  # across the antimeridian
    assert haversine_m(89.9999, 0, 89.9999, 180) == pytest.approx(22.2, abs=0.1)  # over the pole
    assert haversine_m(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_M)  # antipodes: no domain error
    assert haversine_m(90, 0, -90, 0) == pytest.approx(math.pi * EARTH_RADIUS_M)


# --- the verdict ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("north_m", "accuracy_m", "score", "reasons"),
    [
        (0, 10, 0.95, None),
        (89, 10, 0.8, None),  # the circle just inside (89 + 10 < 100); the score at the limit
        (95, 10, 0.95, ["accuracy_circle_outside"]),  # inside, but the fix may be outside
        (150, 10, 0.95, ["outside_geofence"]),
        (0, 60, 0.95, ["poor_accuracy"]),  # within the fence (0 + 60), but worse than max_accuracy_m (50)
        (0, 10, 0.79, ["low_face_score"]),
        (150, 120, 0.1, ["outside_geofence", "poor_accuracy", "low_face_score"]),
    ],
)
def test_a_checkin_counts_only_inside_the_fence_with_a_good_fix_and_face(
    att: Any, time: Time, north_m: float, accuracy_m: float, score: float, reasons: list[str] | None
) -> None:
    rig = start(att, None)
    checkin(rig, north_m=north_m, accuracy_m=accuracy_m, score=score)
    if reasons is None:
        assert rig.alerts == []
        return
    [alert] = rig.alerts
    assert isinstance(alert, AlertRaised)
    assert (alert.rule, alert.subject, alert.details["flag"]) == (
        "attendance",
        "needs_review:e1",
        "needs_review",
    )
    assert alert.details["reasons"] == reasons
    assert alert.details["distance_m"] == pytest.approx(north_m, abs=0.5)
    assert (alert.details["accuracy_m"], alert.details["radius_m"]) == (accuracy_m, 100)
    assert (alert.details["face_match_score"], alert.details["min_face_score"]) == (score, 0.8)
    assert "latitude" not in alert.details
    assert "longitude" not in alert.details


def test_without_a_geofence_every_checkin_needs_review(att: Any, time: Time) -> None:
    rig = start(att, None)
    rig.engine.location = None
    checkin(rig)
    [alert] = rig.alerts
    assert alert.details["reasons"] == ["no_geofence"]
    assert alert.details["distance_m"] is None


def test_a_review_alert_clears_after_clear_after_s_and_a_new_one_is_the_next_episode(
    att: Any, time: Time
) -> None:
    rig = start(att, None)
    checkin(rig, score=0.1)
    time.advance(600)
    checkin(rig, score=0.1)  # another one while the first is open: the first ends
    assert [
        (type(a).__name__, a.alert_id if isinstance(a, AlertCleared) else a.details["alert_id"])
        for a in rig.alerts
    ] == [
        ("AlertRaised", "att/needs_review:e1/1"),
        ("AlertCleared", "att/needs_review:e1/1"),
        ("AlertRaised", "att/needs_review:e1/2"),
    ]
    time.advance(3599)
    rig.tick()
    assert len(rig.alerts) == 3
    time.advance(1)
    rig.tick()
    assert isinstance(rig.alerts[-1], AlertCleared)
    assert rig.alerts[-1].alert_id == "att/needs_review:e1/2"


# --- against the roster --------------------------------------------------------------------------------------


def test_late_in_the_stores_timezone(att: Any, time: Time) -> None:
    rig = start(att, roster(("e1", local(15, 16), local(15, 22)), ("e2", local(15, 16), local(15, 22))))
    time.advance(300)  # 16:05: at the grace's end, on time
    checkin(rig, "e1")
    time.advance(1)  # 16:05:01
    checkin(rig, "e2")
    checkin(rig, "e2")  # a second check-in is not the first: no second alert
    assert raised(rig) == [("late", "late:e2")]
    [alert] = rig.alerts
    assert alert.details["shift_start"] == "2027-01-15T16:00:00+08:00"
    assert alert.details["late_s"] == 301
    assert alert.message == "e2: 5 min late for the 16:00 shift"


def test_a_needs_review_checkin_is_not_an_arrival(att: Any, time: Time) -> None:
    rig = start(att, roster(("e1", local(15, 16), local(15, 22))))
    time.advance(60)
    checkin(rig, north_m=500)  # from the car park: not accepted
    time.advance(1200)  # 16:21: the no-show check at 16:15 found no accepted check-in
    rig.tick()
    checkin(rig)  # now inside: late, and the no-show ends
    assert raised(rig) == [
        ("needs_review", "needs_review:e1"),
        ("no_show", "no_show:e1"),
        ("late", "late:e1"),
    ]
    cleared = [a for a in rig.alerts if isinstance(a, AlertCleared)]
    assert [c.alert_id for c in cleared] == ["att/no_show:e1/1"]


def test_no_show_after_n_minutes_and_early_leave_at_the_shifts_end(att: Any, time: Time) -> None:
    shifts = roster(("e1", local(15, 17), local(15, 21)), ("e2", local(15, 17), local(15, 21)))
    rig = start(att, shifts)
    until(rig, time, local(15, 16, 55))
    checkin(rig, "e1")
    until(rig, time, local(15, 17, 14), step_s=60)
    assert raised(rig) == []
    until(rig, time, local(15, 17, 15), step_s=60)
    assert raised(rig) == [("no_show", "no_show:e2")]
    until(rig, time, local(15, 20, 50))
    checkin(rig, "e1", "out")  # ten minutes early, beyond the 5 min grace
    until(rig, time, local(15, 20, 59), step_s=60)
    assert raised(rig) == [("no_show", "no_show:e2")]  # decided at the shift's end
    until(rig, time, local(15, 21), step_s=60)
    assert raised(rig) == [("no_show", "no_show:e2"), ("early_leave", "early_leave:e1")]
    alert = rig.alerts[-1]
    assert (alert.details["last_out"], alert.details["early_s"]) == ("2027-01-15T20:50:00+08:00", 600)


def test_a_break_is_not_an_early_leave(att: Any, time: Time) -> None:
    rig = start(att, roster(("e1", local(15, 17), local(15, 21))))
    until(rig, time, local(15, 17))
    checkin(rig)
    until(rig, time, local(15, 18))
    checkin(rig, direction="out")
    until(rig, time, local(15, 18, 30))
    checkin(rig)
    until(rig, time, local(15, 21, 2))
    checkin(rig, direction="out")
    until(rig, time, local(16, 2))
    assert raised(rig) == []
    [day] = dailies(rig)
    [row] = day.employees
    assert row.minutes_worked == 60 + 152
    assert row.shifts[0].flags == []


def test_no_show_survives_a_restart(att: Any, time: Time) -> None:
    rig = start(att, roster(("e1", local(15, 17), local(15, 21))))
    until(rig, time, local(15, 16, 50))
    rig.conn.close()
    time.advance(3600)  # down from 16:50 to 17:50 (same boot): the check at 17:15 came due meanwhile
    rig = start(att, roster(("e1", local(15, 17), local(15, 21))))
    assert raised(rig) == [("no_show", "no_show:e1")]
    rig.tick()
    rig.conn.close()
    rig = start(att, roster(("e1", local(15, 17), local(15, 21))))
    rig.tick()
    assert raised(rig) == []  # checked once, whatever the restarts


def test_a_new_rule_does_not_check_shifts_that_were_over_before_it(att: Any, time: Time) -> None:
    shifts = roster(("e1", local(14, 9), local(14, 17)), ("e1", local(15, 9), local(15, 17)))
    rig = start(att, shifts)
    until(rig, time, local(16, 1, 1))
    assert rig.alerts == []
    [day] = dailies(rig)
    assert day.employees == []  # its first day is reported from when it started


def test_a_new_roster_sets_the_timers_again(att: Any, time: Time) -> None:
    rig = start(att, None)
    rig.engine.roster = roster(("e1", local(15, 17), local(15, 21)))
    rig.engine._reroster = True  # what a document.updated of the roster does
    until(rig, time, local(15, 17, 16), step_s=60)
    assert raised(rig) == [("no_show", "no_show:e1")]


# --- the daily summary ---------------------------------------------------------------------------------------


def test_the_daily_summary_per_employee(att: Any, time: Time) -> None:
    shifts = roster(
        ("e1", local(15, 17), local(15, 21)),
        ("e2", local(15, 17), local(15, 21)),
        ("e3", local(15, 22), local(16, 2)),  # a night shift: the day it starts
    )
    rig = start(att, shifts)
    until(rig, time, local(15, 17, 10))
    checkin(rig, "e1")
    checkin(rig, "e9", score=0.2)  # not on the roster, and not accepted
    until(rig, time, local(15, 20))
    checkin(rig, "e1", "out")
    until(rig, time, local(15, 21, 55))
    checkin(rig, "e3")
    until(rig, time, local(16, 2, 30))
    checkin(rig, "e3", "out")
    until(rig, time, local(16, 2, 59))
    assert dailies(rig) == []  # the last shift ended at 02:00, + report_after_s
    until(rig, time, local(16, 3, 1))
    [day] = dailies(rig)
    assert (day.rule_id, day.date, day.timezone) == ("att", "2027-01-15", HK)
    by = {e.employee_id: e for e in day.employees}
    assert sorted(by) == ["e1", "e2", "e3", "e9"]
    e1 = by["e1"].shifts[0]
    assert (e1.first_in, e1.last_out) == (local(15, 17, 10), local(15, 20))
    assert (e1.minutes_worked, e1.flags) == (170, ["late", "early_leave"])
    assert by["e2"].flags == ["no_show"]
    assert by["e2"].minutes_worked == 0
    assert by["e3"].shifts[0].start == local(15, 22)
    assert by["e3"].minutes_worked == 275
    assert by["e3"].flags == []
    [loose] = by["e9"].shifts
    assert (loose.start, loose.first_in, loose.needs_review, loose.flags) == (None, None, 1, ["needs_review"])
    body = day.model_dump_json()
    assert "Name " not in body
    assert "face" not in body
    assert "latitude" not in body


def test_the_daily_summary_is_made_once_across_restarts(att: Any, time: Time) -> None:
    shifts = roster(("e1", local(15, 17), local(15, 21)))
    rig = start(att, shifts)
    until(rig, time, local(16, 1, 1))  # the report is due at 01:00
    assert [d.date for d in dailies(rig)] == ["2027-01-15"]
    rig.conn.close()
    rig = start(att, shifts)
    until(rig, time, local(16, 12))
    assert dailies(rig) == []
    rig.conn.close()
    time.advance(3 * 86_400)  # down for three days: each is reported once, in order
    rig = start(att, shifts)
    for _ in range(5):
        rig.tick()
    assert [d.date for d in dailies(rig)] == ["2027-01-16", "2027-01-17", "2027-01-18"]
    rig.conn.close()
    rig = start(att, shifts)
    rig.tick()
    assert dailies(rig) == []


def test_a_changed_rule_keeps_the_days_checkins_and_reports_no_day_twice(att: Any, time: Time) -> None:
    shifts = roster(("e1", local(15, 17), local(15, 21)))
    rig = start(att, shifts)
    until(rig, time, local(15, 17))
    checkin(rig)
    rig.conn.close()
    rig = start(att, shifts, {**RULE_DEF, "grace_s": 600})  # a new threshold: the rule starts afresh
    until(rig, time, local(15, 21))
    checkin(rig, direction="out")
    until(rig, time, local(16, 1, 1))
    [day] = dailies(rig)
    assert day.employees[0].minutes_worked == 240


def test_local_days_across_a_dst_change(att: Any, time: Time) -> None:
    london = "Europe/London"
    time.wall = local(29, 12, zone=london, month=3, year=2025).timestamp()  # 30 March 2025: 23 hours
    shifts = roster(
        (
            "e1",
            local(30, 0, 30, london, 3, 2025),
            local(30, 3, 30, london, 3, 2025),
        ),  # 00:30 GMT to 03:30 BST
    )
    rig = start(att, shifts, {**RULE_DEF, "report_after_s": 0}, zone=london)
    until(rig, time, local(30, 0, 30, london, 3, 2025))
    checkin(rig)
    until(rig, time, local(30, 3, 30, london, 3, 2025))
    checkin(rig, direction="out")
    until(rig, time, local(31, 0, 0, london, 3, 2025), step_s=1800)
    assert [d.date for d in dailies(rig)] == ["2025-03-29", "2025-03-30"]
    row = dailies(rig)[1].employees[0]
    assert row.minutes_worked == 120  # three hours on the wall clock, two worked
    assert row.shifts[0].end is not None
    assert row.shifts[0].end.utcoffset() == timedelta(hours=1)
    until(rig, time, local(1, 0, 0, london, 4, 2025), step_s=3600)
    assert [d.date for d in dailies(rig)] == ["2025-03-29", "2025-03-30", "2025-03-31"]


# --- config -------------------------------------------------------------------------------------------------


def test_bad_thresholds_are_refused() -> None:
    for bad in ({"min_face_score": 1.5}, {"max_accuracy_m": 0}, {"alerts": ["tardy"]}, {"grace": 5}):
        with pytest.raises(ValidationError):
            RULE.validate_python({**RULE_DEF, **bad})


def _docs_example() -> str:
    text = (Path(__file__).parents[2] / "docs" / "RULES.md").read_text(encoding="utf-8")
    [block] = [str(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if "type: attendance" in b]
    return block


def test_the_docs_example_is_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(GATEWAY + _docs_example(), encoding="utf-8")
    code, text = check_config(config, no_secrets=True, env={})
    assert code == 0, text


def test_config_errors_come_with_their_line(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    example = _docs_example()
    config.write_text(
        GATEWAY + example.replace("min_face_score: 0.85", "min_face_score: 1.5"), encoding="utf-8"
    )
    code, text = check_config(config, no_secrets=True, env={})
    line = 1 + (GATEWAY + example).splitlines().index("    min_face_score: 0.85            # default 0.8")
    assert code == 1
    assert f"store.yaml:{line}:" in text
    assert "min_face_score" in text
    no_fence = "\n".join(x for x in example.splitlines() if "location:" not in x) + "\n"
    config.write_text(GATEWAY + no_fence, encoding="utf-8")
    code, text = check_config(config, no_secrets=True, env={})
    assert code == 1
    assert "store.location" in text


def test_a_backtest_replays_the_verdicts_with_the_stores_geofence() -> None:
    def envelope(seq: int, at: datetime, north_m: float) -> dict[str, Any]:
        data = {
            "employee_id": "e1",
            "direction": "in",
            "latitude": STORE.latitude + north_m / 111_195.0,
            "longitude": STORE.longitude,
            "accuracy_m": 5,
            "face_match_score": 0.9,
        }
        return {
            "seq": seq,
            "kind": "staff.checkin",
            "device_id": "k",
            "recorded_at": at.isoformat(),
            "data": data,
        }

    events = [envelope(1, local(15, 9), 0), envelope(2, local(15, 9, 5), 400), envelope(3, local(16, 9), 0)]
    rules = [RULE.validate_python({**RULE_DEF, "report_after_s": 0})]
    lines = [o.line() for o in replay(rules, events, StoreHours(HK), STORE)]
    assert lines == [
        "2027-01-15T01:05:00Z raised   att/needs_review:e1/1  e1: check-in needs review (outside_geofence)",
        "2027-01-15T02:05:00Z cleared  att/needs_review:e1/1  e1: needs_review (reported)",
        "2027-01-15T16:00:00Z attendance.daily att/2027-01-15  1 employee(s), 1 with flags",
    ]


def test_after_a_reboot_with_an_unsynchronised_clock_the_shift_timers_wait(att: Any, time: Time) -> None:
    shifts = roster(("e1", local(15, 17), local(15, 21)))
    rig = start(att, shifts)
    until(rig, time, local(15, 16, 50))
    rig.conn.close()
    time.boot, time.mono, time.synced = "boot-2", 5.0, False  # a power cut: no real-time clock
    time.wall += 3600  # 17:50 (the box cannot tell yet)
    rig = start(att, shifts)
    time.advance(120)
    rig.tick()
    assert rig.alerts == []  # late, never early
    time.synced = True
    time.advance(60)
    rig.tick()
    rig.tick()
    assert raised(rig) == [("no_show", "no_show:e1")]


def test_a_25_hour_day_in_autumn(att: Any, time: Time) -> None:
    london = "Europe/London"
    time.wall = local(25, 12, zone=london, month=10, year=2025).timestamp()  # 26 October 2025: 25 hours
    start_, end = local(26, 0, 30, london, 10, 2025), local(26, 3, 30, london, 10, 2025)
    rig = start(att, roster(("e1", start_, end)), {**RULE_DEF, "report_after_s": 0}, zone=london)
    until(rig, time, start_)
    checkin(rig)
    until(rig, time, end)
    checkin(rig, direction="out")
    until(rig, time, local(26, 23, 59, london, 10, 2025), step_s=1800)
    assert [d.date for d in dailies(rig)] == ["2025-10-25"]  # the 26th has not ended: 25 hours long
    until(rig, time, local(27, 0, 0, london, 10, 2025), step_s=60)
    assert [d.date for d in dailies(rig)] == ["2025-10-25", "2025-10-26"]
    assert dailies(rig)[1].employees[0].minutes_worked == 240  # three hours on the wall clock, four worked


def test_review_fixes_one_rule_apart_shifts_pruned_logs_and_readable_alert_ids(att: Any, time: Time) -> None:
    """One attendance rule per store; a staff member's shifts may not overlap; every log leaves the reported
    day's check-ins; alert ids with spaces or any script can be acknowledged through the API."""
    import orjson

    from gateway.kernel.rule_config import RuleFile
    from rules.alerts import ALERT_ID

    two = [{"id": "front", "type": "attendance"}, {"id": "back", "type": "attendance"}]
    with pytest.raises(ValidationError, match="one attendance rule per store"):
        RuleFile.model_validate({"rules": two})
    with pytest.raises(ValidationError, match="shifts overlap"):
        roster(("e1", local(15, 17), local(15, 21)), ("e1", local(15, 18), local(15, 20)))
    rig = start(att, roster(("e1", local(15, 17), local(15, 21))))
    checkin(rig, "stranger", score=0.1)  # someone not on the roster, once
    until(rig, time, local(18, 3), step_s=3600)
    [(data,)] = rig.conn.execute("SELECT data FROM rule_state WHERE subject = 'log:stranger'").fetchall()
    assert orjson.loads(data)["log"] == []  # the reported day left this log too, not only the next check-in's
    for alert_id in (
        "att/needs_review:Mary Chan/1",
        "att/late:陳大文/1",
        "shrink/Aisle 3 Bay 2/00012345678905/1",
    ):
        assert re.match(ALERT_ID, alert_id)
