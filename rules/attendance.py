"""``attendance``: the kiosks' check-ins against the store's geofence and HQ's roster (docs/RULES.md).

A check-in (``staff.checkin``) is **accepted** only when its whole accuracy circle lies inside the store's geofence
(``store.location``: haversine distance + ``accuracy_m`` <= ``geofence_radius_m``), its fix is at least as good
as ``max_accuracy_m`` and its face-match score at least ``min_face_score``. Otherwise it **needs review**: it is
kept (and counted in the day's summary) but is neither a first in nor a last out, and it raises a
``needs_review`` alert with the evidence (the distance, never the position; the score, never a face).

Accepted check-ins are compared with the roster's shifts, in the store's timezone: ``late`` (the shift's first
accepted check-in after start + ``grace_s``, raised with that check-in), ``no_show`` (no accepted check-in
``no_show_after_s`` after start: a timer; it clears when the employee checks in), ``early_leave`` (at the shift's
end, the last accepted check-out was before end - ``grace_s`` and nobody checked in again). After each
store-local day (and its last shift) has ended, plus ``report_after_s``, one ``attendance.daily`` event sums it
up per employee. Every alert but a ``no_show`` that ends with a check-in clears ``clear_after_s`` after it was
raised: it reports something that happened.

The rule's tracks, by subject: ``daily`` (the last day reported, and the timer of the next report),
``log:<employee>`` (the check-ins not yet reported), and ``<flag>:<employee>`` for each alert (``no_show`` and
``early_leave`` also carry the timer of the employee's next shift). Times in the log are the rules' clock, turned
into wall-clock times when needed, so a clock set meanwhile does not move them. Check-ins are attributed to the
shift nearest them: within its span, or up to :data:`ATTACH_S` before or after it, and never past halfway to the
employee's previous or next shift; the others are the day's unscheduled check-ins.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from cloud_bridge.documents import Roster, Shift
from gateway.kernel.events import (
    MAX_ATTENDANCE_EMPLOYEES,
    AttendanceDaily,
    AttendanceEmployee,
    AttendanceFlag,
    AttendanceShift,
    StaffCheckin,
)
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import AttendanceRule, RuleDefinition
from rules.engine import ACTIVE, Context, Track

_LOGGER = logging.getLogger(__name__)

EARTH_RADIUS_M: Final = 6_371_008.8
"""The mean Earth radius (IUGG), for the haversine distance."""
ATTACH_S: Final = 6 * 3600.0
"""A check-in belongs to a shift when it is at most this long before its start or after its end."""
UNSYNCED_RECHECK_S: Final = 60.0
"""While the box's clock is not synchronised, the shift and day timers look again this often."""
MAX_CATCH_UP_DAYS: Final = 31
MAX_LOG: Final = 500
"""Check-ins kept per employee until their day is reported (a kiosk stuck repeating one is cut to the last)."""
"""After a long downtime, at most this many past days are reported."""
DAILY: Final = "daily"
FLAGS: Final[tuple[AttendanceFlag, ...]] = ("late", "early_leave", "no_show", "needs_review")
TIMED: Final[tuple[AttendanceFlag, ...]] = ("no_show", "early_leave")
KEEP: Final = frozenset({"log", "reported", "done", "since"})
"""Track data that survives a change of the rule: the check-ins, the last day reported, the shifts checked."""


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The great-circle distance in metres between two WGS84 points (on a sphere: within 0.5 %)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, max(0.0, h))))


def review_reasons(
    ctx: Context, rule: AttendanceRule, checkin: StaffCheckin
) -> tuple[list[str], float | None]:
    """Why a check-in is not accepted (empty: accepted), and its distance from the store in metres."""
    reasons: list[str] = []
    distance: float | None = None
    location = ctx.location
    if location is None:
        reasons.append("no_geofence")
    else:
        distance = haversine_m(location.latitude, location.longitude, checkin.latitude, checkin.longitude)
        if distance > location.geofence_radius_m:
            reasons.append("outside_geofence")
        elif distance + checkin.accuracy_m > location.geofence_radius_m:
            reasons.append("accuracy_circle_outside")
    if checkin.accuracy_m > rule.max_accuracy_m:
        reasons.append("poor_accuracy")
    if checkin.face_match_score < rule.min_face_score:
        reasons.append("low_face_score")
    return reasons, distance


@dataclass(frozen=True, slots=True)
class Window:
    """One rostered shift (wall-clock times) and the times whose check-ins belong to it."""

    start: float
    end: float
    lo: float
    hi: float

    def holds(self, wall: float) -> bool:
        return self.lo <= wall < self.hi


def windows(roster: Roster | None, employee: str) -> list[Window]:
    """The employee's shifts in the roster, in time order, with the times attributed to each."""
    if roster is None:
        return []
    cached = _INDEX[0] if _INDEX else None
    if cached is not None and cached[0] is roster:
        return cached[1].get(employee, [])
    index = {member.staff_id: _windows(member.shifts) for member in roster.staff}
    _INDEX[:] = [(roster, index)]
    return index.get(employee, [])


_INDEX: list[tuple[Roster, dict[str, list[Window]]]] = []
"""The windows of the last roster asked about, per employee: a roster is read whole and never changed."""


def _windows(shifts: list[Shift]) -> list[Window]:
    spans = sorted((s.start.timestamp(), s.end.timestamp()) for s in shifts)
    out = []
    for i, (start, end) in enumerate(spans):
        lo, hi = start - ATTACH_S, end + ATTACH_S
        if i > 0:
            lo = max(lo, (spans[i - 1][1] + start) / 2)
        if i + 1 < len(spans):
            hi = min(hi, (end + spans[i + 1][0]) / 2)
        out.append(Window(start, end, lo, hi))
    return out


def employees(ctx: Context, rule: RuleDefinition) -> set[str]:
    """Everyone the rule knows of: the roster's staff and whoever has tracks."""
    known = {s.staff_id for s in ctx.roster.staff} if ctx.roster is not None else set()
    return known | {s.partition(":")[2] for s in ctx.subjects(rule) if ":" in s}


def _peek(ctx: Context, rule: RuleDefinition, subject: str) -> dict[str, Any]:
    """A track's data, read only (a timer must not add tracks: the engine is going through them)."""
    return ctx.track(rule, subject).data if ctx.has(rule, subject) else {}


# --- check-ins ---------------------------------------------------------------------------------------------


def checkin(ctx: Context, rule: RuleDefinition, event: Event) -> None:
    """A kiosk's check-in or check-out: its verdict, the log, and the alerts it raises or ends at once."""
    assert isinstance(rule, AttendanceRule)
    model = event.model
    if not isinstance(model, StaffCheckin):
        return
    employee = model.employee_id
    reasons, distance = review_reasons(ctx, rule, model)
    accepted = not reasons
    log = ctx.track(rule, f"log:{employee}")
    entries = _pruned(ctx, rule, log)
    log.data = {**log.data, "log": [*entries, [ctx.now, model.direction, accepted, event.seq]][-MAX_LOG:]}
    if not accepted:
        location = ctx.location
        _flag(
            ctx,
            rule,
            "needs_review",
            employee,
            f"{employee}: check-{model.direction} needs review ({', '.join(reasons)})",
            {
                "seq": event.seq,
                "device_id": event.device_id,
                "direction": model.direction,
                "reasons": reasons,
                "distance_m": None if distance is None else round(distance, 1),
                "accuracy_m": model.accuracy_m,
                "radius_m": None if location is None else location.geofence_radius_m,
                "max_accuracy_m": rule.max_accuracy_m,
                "face_match_score": model.face_match_score,
                "min_face_score": rule.min_face_score,
            },
        )
        return
    if model.direction != "in":
        return
    absent = ctx.track(rule, f"no_show:{employee}")
    if absent.state == ACTIVE:
        ctx.clear_alert(rule, absent, f"{employee}: checked in", {"seq": event.seq})
        _arm(ctx, rule, absent)
    if not ctx.synced:
        return  # the wall clock cannot say the time of day: the day's summary still flags it
    wall = ctx.wall(ctx.now)
    shift = next((w for w in windows(ctx.roster, employee) if w.holds(wall)), None)
    if shift is None or wall <= shift.start + rule.grace_s:
        return
    earlier = [e for e in entries if e[2] and e[1] == "in" and shift.holds(ctx.wall(float(e[0])))]
    if earlier:
        return
    minutes = (wall - shift.start) / 60
    _flag(
        ctx,
        rule,
        "late",
        employee,
        f"{employee}: {minutes:.0f} min late for the {_clock(ctx, shift.start)} shift",
        {"seq": event.seq, "shift_start": _iso(ctx, shift.start), "late_s": round(wall - shift.start)},
    )


def _pruned(ctx: Context, rule: AttendanceRule, log: Track) -> list[list[Any]]:
    """The log without the check-ins of days already reported (a day before the first unreported day)."""
    entries: list[list[Any]] = list(log.data.get("log", []))
    reported = _peek(ctx, rule, DAILY).get("reported")
    if reported is None or not ctx.synced:
        return entries
    keep_from = _midnight(ctx, date.fromisoformat(reported)) - ATTACH_S
    return [e for e in entries if ctx.wall(float(e[0])) >= keep_from]


def _flag(
    ctx: Context,
    rule: AttendanceRule,
    flag: AttendanceFlag,
    employee: str,
    message: str,
    details: dict[str, Any],
) -> None:
    """Raise the alert of a finding (a previous one of the same kind still open ends first)."""
    if flag not in rule.alerts:
        return
    track = ctx.track(rule, f"{flag}:{employee}")
    if track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{employee}: {flag} (followed by another)", {})
    ctx.raise_alert(rule, track, message, {"flag": flag, "employee_id": employee, **details})
    track.data = {**track.data, "clear": ctx.now + rule.clear_after_s}
    _arm(ctx, rule, track)


# --- timers ------------------------------------------------------------------------------------------------


def reroster(ctx: Context, rule: RuleDefinition) -> None:
    """At every load and after HQ replaced the roster: each employee's next shift timers, and the day's report."""
    assert isinstance(rule, AttendanceRule)
    for employee in employees(ctx, rule):
        for flag in TIMED:
            track = ctx.track(rule, f"{flag}:{employee}")
            _schedule(ctx, rule, track, flag, employee)
    _arm_daily(ctx, rule, ctx.track(rule, DAILY))


def fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, AttendanceRule)
    if track.subject == DAILY:
        _report(ctx, rule, track)
        return
    flag, _, employee = track.subject.partition(":")
    if track.state == ACTIVE and float(track.data.get("clear", math.inf)) <= ctx.now:
        ctx.clear_alert(rule, track, f"{employee}: {flag} (reported)", {})
    if (
        flag in TIMED
        and "next" in track.data
        and ctx.synced
        and ctx.wall(ctx.now) >= track.data["next"] - 0.5
    ):
        if flag == "no_show":
            _check_no_show(ctx, rule, track, employee)
        else:
            _check_early_leave(ctx, rule, track, employee)
    if flag in TIMED:
        _schedule(ctx, rule, track, flag, employee)
    else:
        _arm(ctx, rule, track)


def _schedule(ctx: Context, rule: AttendanceRule, track: Track, flag: str, employee: str) -> None:
    """The employee's next shift to check for this flag (``next``: the wall-clock time of the check)."""
    data = {k: v for k, v in track.data.items() if k not in ("next", "shift", "wait")}
    if "done" not in data:
        if not ctx.synced:  # which shifts already passed is not known yet
            track.data = {**data, "wait": True}
            _arm(ctx, rule, track)
            return
        wall = ctx.wall(
            ctx.now
        )  # shifts whose check time passed before the rule watched them are not checked
        data["done"] = wall - rule.no_show_after_s if flag == "no_show" else wall
    done = float(data["done"])
    for window in windows(ctx.roster, employee):
        key = window.start if flag == "no_show" else window.end
        if key > done:
            data["shift"] = [window.start, window.end]
            data["next"] = window.start + rule.no_show_after_s if flag == "no_show" else window.end
            break
    track.data = data
    _arm(ctx, rule, track)


def _arm(ctx: Context, rule: AttendanceRule, track: Track) -> None:
    """The track's timer: its open alert's clear, or its next shift check, whichever comes first."""
    due = math.inf
    if track.state == ACTIVE:
        due = float(track.data.get("clear", ctx.now))
    if "next" in track.data or track.data.get("wait"):
        if not ctx.synced:
            due = min(due, ctx.now + UNSYNCED_RECHECK_S)
        elif "next" in track.data:
            due = min(due, ctx.now + max(0.0, float(track.data["next"]) - ctx.wall(ctx.now)))
        else:  # the clock is synchronised now: the first tick finds the next shift
            due = min(due, ctx.now)
    track.due = None if due == math.inf else due


def _accepted(ctx: Context, rule: AttendanceRule, employee: str) -> list[tuple[float, str]]:
    """The employee's accepted check-ins in the log: (wall-clock time, direction), in time order."""
    log = _peek(ctx, rule, f"log:{employee}").get("log", [])
    return sorted((ctx.wall(float(e[0])), str(e[1])) for e in log if e[2])


def _window_of(ctx: Context, employee: str, shift: list[float]) -> Window:
    found = [w for w in windows(ctx.roster, employee) if w.start == shift[0]]
    return found[0] if found else Window(shift[0], shift[1], shift[0] - ATTACH_S, shift[1] + ATTACH_S)


def _check_no_show(ctx: Context, rule: AttendanceRule, track: Track, employee: str) -> None:
    shift = _window_of(ctx, employee, track.data["shift"])
    track.data = {**track.data, "done": shift.start}
    if any(d == "in" and shift.holds(t) for t, d in _accepted(ctx, rule, employee)):
        return
    _flag(
        ctx,
        rule,
        "no_show",
        employee,
        f"{employee}: not checked in {rule.no_show_after_s / 60:g} min after the {_clock(ctx, shift.start)}"
        " shift started",
        {"shift_start": _iso(ctx, shift.start), "shift_end": _iso(ctx, shift.end)},
    )


def _check_early_leave(ctx: Context, rule: AttendanceRule, track: Track, employee: str) -> None:
    shift = _window_of(ctx, employee, track.data["shift"])
    track.data = {**track.data, "done": shift.end}
    seen = [(t, d) for t, d in _accepted(ctx, rule, employee) if shift.holds(t) and t <= shift.end]
    if not any(d == "in" for _, d in seen) or seen[-1][1] != "out" or seen[-1][0] >= shift.end - rule.grace_s:
        return
    left = seen[-1][0]
    _flag(
        ctx,
        rule,
        "early_leave",
        employee,
        f"{employee}: left {(shift.end - left) / 60:.0f} min before the shift's end ({_clock(ctx, shift.end)})",
        {"shift_end": _iso(ctx, shift.end), "last_out": _iso(ctx, left), "early_s": round(shift.end - left)},
    )


# --- the day's summary -------------------------------------------------------------------------------------


def _arm_daily(ctx: Context, rule: AttendanceRule, track: Track) -> None:
    if not ctx.synced:
        track.due = ctx.now + UNSYNCED_RECHECK_S
        return
    if "reported" not in track.data:  # the rule's first day is the one it starts on
        wall = ctx.wall(ctx.now)
        today = _local(ctx, wall).date()
        track.data = {**track.data, "reported": (today - timedelta(days=1)).isoformat(), "since": wall}
    day = date.fromisoformat(track.data["reported"]) + timedelta(days=1)
    track.due = ctx.now + max(0.0, _report_time(ctx, rule, day) - ctx.wall(ctx.now))


def _report_time(ctx: Context, rule: AttendanceRule, day: date) -> float:
    """When the day's summary is due: its end, or its last shift's end if later, plus ``report_after_s``."""
    end = _midnight(ctx, day + timedelta(days=1))
    for employee in employees(ctx, rule):
        for window in windows(ctx.roster, employee):
            if _local(ctx, window.start).date() == day:
                end = max(end, window.end)
    return end + rule.report_after_s


def _report(ctx: Context, rule: AttendanceRule, track: Track) -> None:
    if not ctx.synced or "reported" not in track.data:
        _arm_daily(ctx, rule, track)
        return
    wall = ctx.wall(ctx.now)
    day = date.fromisoformat(track.data["reported"]) + timedelta(days=1)
    oldest = _local(ctx, wall).date() - timedelta(days=MAX_CATCH_UP_DAYS)
    if day < oldest:
        day = oldest
    if wall + 0.5 < _report_time(ctx, rule, day):  # the roster changed, or the clock was set: not yet
        _arm_daily(ctx, rule, track)
        return
    ctx.emit(summary(ctx, rule, day))
    track.data = {**track.data, "reported": day.isoformat()}
    for subject in ctx.subjects(
        rule
    ):  # the reported day's check-ins leave every log, not only the next one's
        if subject.startswith("log:"):
            log = ctx.track(rule, subject)
            entries = _pruned(ctx, rule, log)
            if len(entries) != len(log.data.get("log", [])):
                log.data = {**log.data, "log": entries}
    _arm_daily(ctx, rule, track)


def summary(ctx: Context, rule: AttendanceRule, day: date) -> AttendanceDaily:
    """The day's attendance per employee: each shift starting that day, and the check-ins outside any shift."""
    out = []
    since = float(_peek(ctx, rule, DAILY).get("since", -math.inf))
    for employee in sorted(employees(ctx, rule)):
        log = _peek(ctx, rule, f"log:{employee}").get("log", [])
        entries = sorted((ctx.wall(float(e[0])), str(e[1]), bool(e[2])) for e in log)
        shifts = windows(ctx.roster, employee)
        rows = []
        for window in shifts:
            if _local(ctx, window.start).date() == day and window.start + rule.no_show_after_s > since:
                rows.append(_shift(ctx, rule, window, [e for e in entries if window.holds(e[0])]))
        loose = [
            e for e in entries if _local(ctx, e[0]).date() == day and not any(w.holds(e[0]) for w in shifts)
        ]
        if loose:
            rows.append(_shift(ctx, rule, None, loose))
        if rows:
            flags = [f for f in FLAGS if any(f in r.flags for r in rows)]
            worked = round(sum(r.minutes_worked for r in rows), 1)
            out.append(
                AttendanceEmployee(employee_id=employee, shifts=rows, minutes_worked=worked, flags=flags)
            )
    if len(out) > MAX_ATTENDANCE_EMPLOYEES:
        _LOGGER.error(
            "attendance %s: %s had %d employees; the summary lists the first %d",
            rule.id,
            day,
            len(out),
            MAX_ATTENDANCE_EMPLOYEES,
        )
    return AttendanceDaily(
        rule_id=rule.id,
        date=day.isoformat(),
        timezone=ctx.hours.timezone,
        employees=out[:MAX_ATTENDANCE_EMPLOYEES],
    )


def _shift(
    ctx: Context, rule: AttendanceRule, window: Window | None, entries: list[tuple[float, str, bool]]
) -> AttendanceShift:
    ok = [(t, d) for t, d, accepted in entries if accepted]
    ins = [t for t, d in ok if d == "in"]
    outs = [t for t, d in ok if d == "out"]
    worked, since = 0.0, None
    for t, d in ok:
        if d == "in" and since is None:
            since = t
        elif d == "out" and since is not None:
            worked += t - since
            since = None
    review = sum(1 for *_, accepted in entries if not accepted)
    flags: list[AttendanceFlag] = []
    if window is not None:
        if ins and ins[0] > window.start + rule.grace_s:
            flags.append("late")
        if ins and ok[-1][1] == "out" and ok[-1][0] < window.end - rule.grace_s:
            flags.append("early_leave")
        if not ins:
            flags.append("no_show")
    if review:
        flags.append("needs_review")
    return AttendanceShift(
        start=None if window is None else _local(ctx, window.start),
        end=None if window is None else _local(ctx, window.end),
        first_in=_local(ctx, ins[0]) if ins else None,
        last_out=_local(ctx, outs[-1]) if outs else None,
        minutes_worked=round(worked / 60, 1),
        flags=flags,
        needs_review=review,
    )


# --- the store's local time --------------------------------------------------------------------------------


def _local(ctx: Context, wall: float) -> datetime:
    return datetime.fromtimestamp(round(wall), ZoneInfo(ctx.hours.timezone))


def _midnight(ctx: Context, day: date) -> float:
    """The start of a store-local day (a DST change at midnight: the first moment of the day that exists)."""
    zone = ZoneInfo(ctx.hours.timezone)
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def _iso(ctx: Context, wall: float) -> str:
    return _local(ctx, wall).isoformat()


def _clock(ctx: Context, wall: float) -> str:
    return _local(ctx, wall).strftime("%H:%M")


def unused(ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel) -> None:
    """Not called: a check-in concerns several of the rule's tracks (:func:`checkin`)."""
