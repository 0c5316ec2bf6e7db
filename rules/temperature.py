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
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import RuleDefinition, TemperatureRule
from rules.engine import ACTIVE, CLEARING, IDLE, PENDING, Context, Track


def observe(ctx: Context, rule: RuleDefinition, track: Track, event: Event) -> None:
    assert isinstance(rule, TemperatureRule)
    sample = event.model
    if not isinstance(sample, SensorSample):
        return
    data = track.data
    now = ctx.now
    values = sample.values
    if values.get(rule.defrost_metric, 0) >= 0.5:
        data["grace_until"] = max(data.get("grace_until", 0.0), now + rule.post_defrost_grace_s)
        return
    if values.get(rule.door_metric, 0) >= 0.5:
        data["grace_until"] = max(data.get("grace_until", 0.0), now + rule.door_grace_s)
        return
    if now < data.get("grace_until", 0.0):
        return
    value = values.get(rule.metric)
    if value is None:  # a fault, or a device that does not measure it: not an in-range reading either
        return
    too_warm = value > rule.max_c
    recovered = value < rule.clear_c
    if too_warm:
        data["max"] = max(value, data.get("max", value))
        data["last"] = {"seq": event.seq, "value": value}
    state = track.state
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
        ctx.clear_alert(
            rule,
            track,
            f"{track.subject}: back below {rule.clear_c:g} °C",
            {"recovered": data.get("recovered"), "max_c": data.get("max"), "due_at": ctx.due_at(due)},
        )
        spent = ("first", "last", "max", "recovered")
        track.data = {k: v for k, v in track.data.items() if k not in spent}
