"""``silent``: a device that went quiet (on ``sensor.sample``, ``sensor.reading`` and ``device.status``).

No reading for ``after_s`` raises, and so does its driver saying it is ``offline`` or in ``error``; its next
reading (or ``online``) clears. Only devices that send readings are watched: the timer starts at the device's
first reading the rules see (or at start, for a device the rule names), and ``offline``/``error`` count for
devices that sent readings before or that the rule names, not for tills and scanners. Time the gateway itself
was down is not the device's silence: at start each timer waits its full ``after_s`` again.
"""

from __future__ import annotations

import sqlite3

from gateway.kernel.events import DeviceStatus
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import RuleDefinition, SilentRule
from rules.engine import ACTIVE, PENDING, Context, Track, newest_by_device


def observe(ctx: Context, rule: SilentRule, track: Track, event: Event, model: StrictModel) -> None:
    status = model if event.kind == "device.status" else None
    if isinstance(status, DeviceStatus):
        watched = "last_seq" in track.data or track.subject in rule.select.devices
        if status.status in ("offline", "error") and watched and track.state != ACTIVE:
            reason = status.reason or status.status
            track.due = None
            ctx.raise_alert(
                rule,
                track,
                f"{track.subject}: {status.status} ({reason})"[:500],
                {"status": status.status, "reason": status.reason, "seq": event.seq},
            )
        elif status.status == "online" and track.state == ACTIVE:
            ctx.clear_alert(rule, track, f"{track.subject}: back online", {"seq": event.seq})
            track.state, track.due = PENDING, ctx.now + rule.after_s
        return
    if track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{track.subject}: heard from again", {"seq": event.seq})
    elif track.state == PENDING:  # only the timer restarts: written within a minute, recovered after a crash
        track.deferred = True
    track.state, track.due = PENDING, ctx.now + rule.after_s
    track.data["last_seq"] = event.seq


def fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, SilentRule)
    due = track.due
    track.due = None
    if track.state == PENDING:
        ctx.raise_alert(
            rule,
            track,
            f"{track.subject}: nothing heard for {rule.after_s / 60:g} min",
            {"after_s": rule.after_s, "last_seq": track.data.get("last_seq"), "due_at": ctx.due_at(due)},
        )


def recover(
    conn: sqlite3.Connection, rules: list[tuple[RuleDefinition, list[Track]]], since: int, now: float
) -> list[Track]:
    """A waiting timer's restarts by readings are written within a minute, not at every reading: after a crash
    (or a failed commit) each waiting track takes its device's newest reading since ``since`` from the journal,
    and its timer waits its full time from now (late, never early)."""
    newest = newest_by_device(conn, ("sensor.sample", "sensor.reading"), since)
    changed = []
    for rule, tracks in rules:
        assert isinstance(rule, SilentRule)
        for track in tracks:
            seq = newest.get(track.subject)
            if track.state != PENDING or seq is None or seq <= track.data.get("last_seq", 0):
                continue
            track.data["last_seq"] = seq
            track.due = max(track.due if track.due is not None else now, now + rule.after_s)
            changed.append(track)
    return changed


def start(rule: RuleDefinition, track: Track, now: float) -> None:
    """At the gateway's start: a waiting timer waits its full time again (the gateway was away, not the device)."""
    assert isinstance(rule, SilentRule)
    if track.state == PENDING and track.due is not None:
        track.due = max(track.due, now + rule.after_s)
