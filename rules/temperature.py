"""``temperature``: a fridge or freezer too warm for too long (cold chain, on ``sensor.sample``).

Too warm (above ``max_c``) for ``for_s`` raises; below ``clear_below_c`` for ``clear_for_s`` clears, so a
reading hovering at the limit does not flap. Readings that say nothing about the cabinet are left out: during a
defrost and ``post_defrost_grace_s`` after it, while the door is open and ``door_grace_s`` after it closes, and
a faulty probe (a reading the device flagged, or none at all). A left-out reading neither starts, continues,
nor ends a timer: the timer keeps running on the readings around it.
"""

from __future__ import annotations

from typing import Any

from gateway.kernel.events import SensorSample
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import RuleDefinition, TemperatureRule
from rules.engine import ACTIVE, CLEARING, IDLE, PENDING, Context, Track


def observe(ctx: Context, rule: TemperatureRule, track: Track, event: Event, model: StrictModel) -> None:
    sample = model
    if not isinstance(sample, SensorSample):
        return
    data = track.data
    now = ctx.now
    values = sample.values
    grace = None
    if values.get(rule.defrost_metric, 0) >= 0.5:
        grace = now + rule.post_defrost_grace_s
    elif values.get(rule.door_metric, 0) >= 0.5:
        grace = now + rule.door_grace_s
    if grace is not None:
        data["grace_until"] = max(data.get("grace_until", 0.0), grace)
        if track.state == PENDING:  # the warmth before a defrost or an open door is not an excursion
            track.state, track.due = IDLE, None
        return
    if now < data.get("grace_until", 0.0):
        return
    value = values.get(rule.metric)
    if value is None:  # a fault, or a device that does not measure it: not an in-range reading either
        if track.state == CLEARING:
            data["fault_at"] = now
        return
    too_warm = value > rule.max_c
    recovered = value < rule.clear_c
    state = track.state
    if state in (ACTIVE, CLEARING):  # only a recovery reads it (a fault since the last counted reading)
        data["counted_at"] = now
    if too_warm:
        data["max"] = max(value, data.get("max", value))
        data["last"] = {"seq": event.seq, "value": value}
    if state == IDLE and too_warm:
        track.state, track.due = PENDING, now + rule.for_s
        data["first"] = {"seq": event.seq, "value": value}
        data["max"] = value
    elif state == PENDING and not too_warm:
        track.state, track.due = IDLE, None
    elif state == ACTIVE and recovered:
        track.state, track.due = CLEARING, now + rule.clear_for_s
        data["recovered"] = {"seq": event.seq, "value": value}
    elif state == CLEARING and not recovered:
        track.state, track.due = ACTIVE, None
        data.pop("confirm", None)
    elif state == CLEARING and data.get("confirm"):  # the recovery's time is up: this reading confirms it
        track.due = now
    if track.due is not None and track.due <= now:
        fire(ctx, rule, track)


def fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, TemperatureRule)
    data = track.data
    due = track.due
    track.due = None
    if track.state == PENDING:
        evidence: dict[str, Any] = {
            "first": data.get("first"),
            "last": data.get("last"),
            "max_c": data.get("max"),
        }
        ctx.raise_alert(
            rule,
            track,
            f"{track.subject}: above {rule.max_c:g} °C for {rule.for_s / 60:g} min (max {data.get('max')} °C)",
            {"limit_c": rule.max_c, "for_s": rule.for_s, "due_at": ctx.due_at(due), **evidence},
        )
    elif track.state == CLEARING:
        if ctx.now < data.get("grace_until", 0.0):  # a defrost or an open door: look again after it
            track.due = data["grace_until"]
            return
        if data.get("fault_at", -1.0) > data.get("counted_at", -1.0):
            # The probe went faulty since the last reading that counted: a broken probe never clears an alert;
            # the next in-range reading does.
            track.data = {**data, "confirm": True}
            return
        ctx.clear_alert(
            rule,
            track,
            f"{track.subject}: back below {rule.clear_c:g} °C",
            {"recovered": data.get("recovered"), "max_c": data.get("max"), "due_at": ctx.due_at(due)},
        )
        spent = ("first", "last", "max", "recovered", "confirm", "fault_at")
        track.data = {k: v for k, v in track.data.items() if k not in spent}
