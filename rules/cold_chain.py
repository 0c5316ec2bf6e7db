"""The cold chain's simple rules, on ``sensor.sample``: ``door_open``, ``battery_low``, ``controller_alarm``.

(``temperature``, with its grace periods and hysteresis, has a module of its own.)
"""

from __future__ import annotations

import functools
import re
from typing import Final

from gateway.kernel.events import SensorSample
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import BatteryLowRule, ControllerAlarmRule, DoorOpenRule, RuleDefinition
from rules.engine import ACTIVE, IDLE, PENDING, Context, Track

ALARM_BIT: Final = re.compile(r"^alarm_|_alarm$")


@functools.lru_cache(maxsize=1024)
def _alarm_bits(names: tuple[str, ...]) -> tuple[str, ...]:
    """The alarm bits among a sample's metric names (a device sends the same names every time: cached)."""
    return tuple(name for name in names if ALARM_BIT.search(name) is not None)


# --- door_open


def door_observe(ctx: Context, rule: DoorOpenRule, track: Track, event: Event, model: StrictModel) -> None:
    sample = model
    if not isinstance(sample, SensorSample) or rule.metric not in sample.values:
        return
    is_open = sample.values[rule.metric] >= 0.5
    if is_open and track.state == IDLE:
        track.state, track.due = PENDING, ctx.now + rule.open_s
        track.data["opened"] = {"seq": event.seq}
    elif not is_open and track.state == PENDING:
        track.state, track.due = IDLE, None
    elif not is_open and track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{track.subject}: door closed", {"seq": event.seq})
    if track.due is not None and track.due <= ctx.now:
        door_fire(ctx, rule, track)


def door_fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, DoorOpenRule)
    due, track.due = track.due, None
    if track.state == PENDING:
        ctx.raise_alert(
            rule,
            track,
            f"{track.subject}: door open for more than {rule.open_s / 60:g} min",
            {"open_s": rule.open_s, "opened": track.data.get("opened"), "due_at": ctx.due_at(due)},
        )


# --- battery_low


def battery_observe(
    ctx: Context, rule: BatteryLowRule, track: Track, event: Event, model: StrictModel
) -> None:
    sample = model
    if not isinstance(sample, SensorSample):
        return
    pct = sample.values.get(rule.metric)
    flag = sample.values.get(rule.flag_metric)
    if pct is None and flag is None:
        return
    low = (pct is not None and pct <= rule.min_pct) or (flag is not None and flag >= 0.5)
    fine = (pct is None or pct > rule.clear_above_pct) and (flag is None or flag < 0.5)
    if low and track.state != ACTIVE:
        ctx.raise_alert(
            rule,
            track,
            f"{track.subject}: battery low" + (f" ({pct:g} %)" if pct is not None else ""),
            {"battery_pct": pct, "flag": flag, "seq": event.seq},
        )
    elif fine and track.state == ACTIVE:
        ctx.clear_alert(
            rule, track, f"{track.subject}: battery fine again", {"battery_pct": pct, "seq": event.seq}
        )


# --- controller_alarm


def alarm_observe(
    ctx: Context, rule: ControllerAlarmRule, track: Track, event: Event, model: StrictModel
) -> None:
    sample = model
    if not isinstance(sample, SensorSample):
        return
    values = sample.values
    chosen = rule.metrics
    watched = [name for name in chosen if name in values] if chosen else _alarm_bits(tuple(values))
    if not watched:
        return
    on: list[str] = []
    for name in watched:  # a loop, not a comprehension: this runs for every reading of every fridge
        if values[name] >= 0.5:
            on.append(name)
    if on:
        on = sorted(set(on))
    if on and track.state != ACTIVE:
        message = f"{track.subject}: controller alarm {', '.join(on)}"
        ctx.raise_alert(rule, track, message, {"bits": on, "seq": event.seq})
    elif not on and track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{track.subject}: controller alarm cleared", {"seq": event.seq})


def no_timer(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    """Rules that raise and clear on readings have no timer."""
    track.due = None
