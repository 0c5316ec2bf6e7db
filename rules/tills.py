"""``register_silent``: a till that sent nothing, no sale and no return, for ``after_s`` of opening hours.

Only the store's opening hours count (``store.opening_hours``, in its timezone; without them, every minute): a
till quiet from closing to the next morning is not silent, and one quiet for the first half hour after opening
is. The timer is due when the store will have been open ``after_s`` since the till's last receipt; when it fires,
the open time is counted again (the hours may have changed, or the wall clock been set), and short of
``after_s`` it waits for the rest. While the box's clock is not synchronised the store's hours cannot be read,
so the alert waits until it is. A till is watched from its first receipt the rules see; its next receipt clears.
Time the gateway itself was down is not the till's silence: at start the count begins again.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import RegisterSilentRule, RuleDefinition
from rules.engine import ACTIVE, PENDING, Context, Track, newest_by_device

RECHECK_S: Final = 86_400.0
"""With no opening in sight (closed for weeks), look again this much later."""
UNSYNCED_RECHECK_S: Final = 60.0


def observe(ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel) -> None:
    assert isinstance(rule, RegisterSilentRule)
    if track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{track.subject}: receipts again", {"seq": event.seq})
    elif track.state == PENDING:  # only the count restarts: written within a minute, recovered after a crash
        track.deferred = True
    track.data["last_seq"] = event.seq
    track.data["since"] = ctx.now
    track.state = PENDING
    _wait(ctx, rule, track, rule.after_s)


def fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, RegisterSilentRule)
    if track.state != PENDING:
        track.due = None
        return
    if not ctx.hours.always_open and not ctx.synced:
        track.due = ctx.now + UNSYNCED_RECHECK_S
        return
    since = float(track.data.get("since", ctx.now))
    quiet = ctx.hours.open_between(ctx.wall(since), ctx.wall(ctx.now))
    if quiet + 1 < rule.after_s:  # the hours changed, or the wall clock was set: wait for the rest
        _wait(ctx, rule, track, rule.after_s - quiet)
        return
    due = track.due
    track.due = None
    ctx.raise_alert(
        rule,
        track,
        f"{track.subject}: no sale or return for {rule.after_s / 60:g} min of opening hours",
        {"after_s": rule.after_s, "last_seq": track.data.get("last_seq"), "due_at": ctx.due_at(due)},
    )


def start(rule: RuleDefinition, track: Track, now: float) -> None:
    """At the gateway's start: the count of a waiting till begins again (the gateway was away, not the till)."""
    if track.state == PENDING and track.due is not None:
        track.data = {**track.data, "since": now}
        track.due = now  # the first tick works out the new due time from the opening hours


def recover(
    conn: sqlite3.Connection, rules: list[tuple[RuleDefinition, list[Track]]], since: int, now: float
) -> list[Track]:
    """A waiting till's receipts are written within a minute, not at every receipt: after a crash (or a failed
    commit) each waiting track takes its till's newest receipt since ``since`` from the journal, and its count
    begins again now (late, never early)."""
    newest = newest_by_device(conn, ("pos.sale", "pos.return"), since)
    changed = []
    for _, tracks in rules:
        for track in tracks:
            seq = newest.get(track.subject)
            if track.state != PENDING or seq is None or seq <= track.data.get("last_seq", 0):
                continue
            track.data = {**track.data, "last_seq": seq, "since": now}
            track.due = now  # the first tick works out the due time from the opening hours
            changed.append(track)
    return changed


def _wait(ctx: Context, rule: RegisterSilentRule, track: Track, seconds: float) -> None:
    wall_now = ctx.wall(ctx.now)
    reached = ctx.hours.reach(wall_now, seconds)
    track.due = ctx.now + (RECHECK_S if reached is None else max(1.0, reached - wall_now))
