"""The RFID shelf rules, on ``rfid.inventory`` windows and HQ's planogram (docs/RULES.md).

- ``shelf_low``, ``shelf_empty``: per shelf and GTIN (subject ``<shelf_id>/<gtin>``), the distinct tags of the
  GTIN in the latest window of the shelf's reader, against the planogram's ``min_on_shelf`` and ``facings``.
- ``possible_shrink``: per shelf and GTIN, tags that departed and no till sale of their GTIN within
  ``sale_window_s`` (each unit sold accounts for the oldest waiting departure of that GTIN, on any shelf).
- ``misplaced``: a GTIN a reader sees that the planogram does not put on the shelves it watches (subject
  ``<shelf_id>/<gtin>``, or ``<reader>/<gtin>`` for a reader that watches several shelves).

One window concerns every shelf its reader watches, so these rule types take their tracks themselves
(:attr:`rules.engine.RuleType.many`). A window's counts are the window's own: the same window twice counts once.
"""

from __future__ import annotations

import math
from typing import Any, Final

from gateway.kernel.events import PosReturn, PosSale, RfidInventory
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import (
    MisplacedRule,
    PossibleShrinkRule,
    RuleDefinition,
    ShelfEmptyRule,
    ShelfLowRule,
)
from rules.engine import ACTIVE, Context, Track
from rules.layout import Place, gtin14

MAX_EPCS: Final = 100
"""EPCs an alert's details list, at most (``count`` says how many there were)."""
MAX_PRESENT: Final = 10_000
"""Tags remembered per shelf and GTIN (to know a departed tag's GTIN)."""
MAX_UNITS: Final = 10_000
"""Units one sale line accounts for, at most."""
MAX_CREDITS: Final = 1_000
"""Units sold ahead of their departures, kept per GTIN, at most."""
RESTART_GRACE_S: Final = 120.0
"""After a restart, a waiting departure waits at least this long for the sales queued meanwhile."""


def unused(ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel) -> None:
    """The per-track ``observe`` these rule types do not use (their ``many`` takes the tracks)."""


def _window(event: Event) -> tuple[str, RfidInventory] | None:
    inventory = event.model if event.kind == "rfid.inventory" else None
    if event.device_id is None or not isinstance(inventory, RfidInventory):
        return None
    return event.device_id, inventory


def _seen(inventory: RfidInventory) -> dict[str, set[str]]:
    """GTIN -> the distinct EPCs of it in the window (tags without a GTIN count for nothing)."""
    seen: dict[str, set[str]] = {}
    for tag in inventory.tags:
        if tag.gtin is not None:
            seen.setdefault(tag.gtin, set()).add(tag.epc)
    return seen


def _place_details(place: Place) -> dict[str, Any]:
    return {"shelf_id": place.shelf_id, "sku": place.sku, "gtin": place.gtin, "reader": place.reader}


# --- shelf_low, shelf_empty ------------------------------------------------------------------------------


def levels_observe(ctx: Context, rule: RuleDefinition, event: Event) -> None:
    found = _window(event)
    if found is None:
        return
    reader, inventory = found
    seen = _seen(inventory)
    for place in ctx.layout.by_reader.get(reader, ()):
        count = len(seen.get(place.gtin, ()))
        _level(ctx, rule, ctx.track(rule, place.subject), place, count, event.seq, not inventory.truncated)


def levels_replan(ctx: Context, rule: RuleDefinition) -> None:
    """A new planogram: a shelf it no longer watches ends its alert; new thresholds apply to the last count."""
    for subject in ctx.subjects(rule):
        track = ctx.track(rule, subject)
        place = ctx.layout.places.get(subject)
        if place is None:
            if track.state == ACTIVE:
                ctx.clear_alert(
                    rule,
                    track,
                    f"{subject}: no longer watched (planogram changed)",
                    {"count": track.data.get("count"), "seq": None, "cause": "planogram"},
                    reason="unwatched",
                )
            track.data = {k: v for k, v in track.data.items() if k != "count"}
        elif isinstance(track.data.get("count"), int):
            _level(ctx, rule, track, place, track.data["count"], None, True)


def _limits(rule: RuleDefinition, place: Place) -> tuple[int, int]:
    """(raise below this count, clear at or above this count)."""
    if isinstance(rule, ShelfLowRule):
        clear = place.min_on_shelf if rule.clear_at == "min" else max(place.min_on_shelf, place.facings)
        return place.min_on_shelf, clear
    assert isinstance(rule, ShelfEmptyRule)
    return 1, max(1, place.min_on_shelf)


def _level(
    ctx: Context,
    rule: RuleDefinition,
    track: Track,
    place: Place,
    count: int,
    seq: int | None,
    complete: bool,
) -> None:
    below, clear = _limits(rule, place)
    if track.data.get("count") != count:
        track.data["count"] = count
    if track.state == ACTIVE:
        if count >= clear:
            ctx.clear_alert(
                rule,
                track,
                f"{place.shelf_id}: {count} of {place.sku} on the shelf again",
                {"count": count, "seq": seq, "cause": "count"},
            )
        return
    if count < below and complete:  # a truncated window may have left the tags out
        what = (
            f"no {place.sku} left"
            if count == 0
            else f"{count} of {place.sku}, below its minimum of {place.min_on_shelf}"
        )
        ctx.raise_alert(
            rule,
            track,
            f"{place.shelf_id}: {what}",
            {
                **_place_details(place),
                "count": count,
                "min_on_shelf": place.min_on_shelf,
                "facings": place.facings,
                "clear_at": clear,
                "seq": seq,
            },
        )


# --- misplaced ---------------------------------------------------------------------------------------------


def misplaced_observe(ctx: Context, rule: RuleDefinition, event: Event) -> None:
    assert isinstance(rule, MisplacedRule)
    found = _window(event)
    if found is None:
        return
    reader, inventory = found
    layout = ctx.layout
    if reader not in layout.by_reader or reader in layout.partial:
        return  # an unknown shelf, or one whose goods the planogram does not all give a GTIN for
    area = layout.area(reader)
    planned = layout.planned(reader)
    stray = {gtin: epcs for gtin, epcs in _seen(inventory).items() if gtin not in planned}
    for gtin, epcs in sorted(stray.items()):
        track = ctx.track(rule, f"{area}/{gtin}")
        if track.state != ACTIVE:
            ctx.raise_alert(
                rule,
                track,
                f"{area}: {len(epcs)} item(s) of GTIN {gtin}, which the planogram does not put here",
                {
                    "area": area,
                    "reader": reader,
                    "gtin": gtin,
                    "count": len(epcs),
                    "epcs": sorted(epcs)[:MAX_EPCS],
                    "seq": event.seq,
                },
            )
            track.data["reader"] = reader
    if inventory.truncated:
        return  # a tag left out of the window may still be there
    for subject in ctx.subjects(rule):
        where, _, gtin = subject.rpartition("/")
        if where == area and gtin not in stray:
            track = ctx.track(rule, subject)
            if track.state == ACTIVE:
                ctx.clear_alert(
                    rule,
                    track,
                    f"{area}: GTIN {gtin} no longer seen there",
                    {"seq": event.seq, "cause": "gone"},
                )


def misplaced_replan(ctx: Context, rule: RuleDefinition) -> None:
    """A new planogram: goods it now puts on that shelf (or a shelf it no longer watches) end their alert."""
    layout = ctx.layout
    for subject in ctx.subjects(rule):
        track = ctx.track(rule, subject)
        if track.state != ACTIVE:
            continue
        area, _, gtin = subject.rpartition("/")
        reader = str(track.data.get("reader"))
        still = (
            reader in layout.by_reader
            and reader not in layout.partial
            and layout.area(reader) == area
            and gtin not in layout.planned(reader)
        )
        if not still:
            ctx.clear_alert(
                rule,
                track,
                f"{subject}: the planogram changed",
                {"seq": None, "cause": "planogram"},
                reason="unwatched",
            )


# --- possible_shrink -----------------------------------------------------------------------------------------


def shrink_observe(ctx: Context, rule: RuleDefinition, event: Event) -> None:
    assert isinstance(rule, PossibleShrinkRule)
    if event.kind == "pos.sale":
        _sold(ctx, rule, event)
        return
    found = _window(event)
    if found is None:
        return
    reader, inventory = found
    seen = _seen(inventory)
    departed = set(inventory.departed)
    for place in ctx.layout.by_reader.get(reader, ()):
        track = ctx.track(rule, place.subject)
        here = seen.get(place.gtin, set())
        present = set(track.data.get("present", ()))
        gone = (departed & present) - here  # a departed tag's GTIN: from the tags seen here before
        present = (present | here) - gone
        if len(present) > MAX_PRESENT:
            present = here
        pending = [p for p in track.data.get("pending", ()) if p[0] not in here]  # back in time: not shrink
        held = [h for h in track.data.get("held", ()) if h[0] not in here]
        waiting = {p[0] for p in pending} | {h[0] for h in held}
        pending += [
            [epc, event.seq, ctx.now + rule.sale_window_s]
            for epc in sorted(gone - waiting)
            if not _use_credit(ctx, rule, place.gtin)  # sold before the reader reported it gone
        ]
        track.data = {**track.data, "present": sorted(present), "pending": pending, "held": held}
        alerted = track.data.get("alerted")
        if track.state == ACTIVE and alerted and set(alerted) <= here:
            ctx.clear_alert(
                rule,
                track,
                f"{place.shelf_id}: the {place.sku} that left are back on the shelf",
                {"seq": event.seq, "cause": "back"},
            )
        _settle(ctx, rule, track)
    _moved(ctx, rule, reader, seen)


def _moved(ctx: Context, rule: PossibleShrinkRule, reader: str, seen: dict[str, set[str]]) -> None:
    """Departed tags another reader sees before their window ends moved (``misplaced`` says where): no shrink."""
    for gtin, epcs in seen.items():
        for place in ctx.layout.by_gtin.get(gtin, ()):
            if place.reader == reader:
                continue
            track = ctx.track(rule, place.subject)
            pending = [p for p in track.data.get("pending", ()) if p[0] not in epcs]
            held = [h for h in track.data.get("held", ()) if h[0] not in epcs]
            if len(pending) + len(held) < len(track.data.get("pending", ())) + len(
                track.data.get("held", ())
            ):
                track.data = {**track.data, "pending": pending, "held": held}
                _settle(ctx, rule, track)


def shrink_fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, PossibleShrinkRule)
    _settle(ctx, rule, track)


def shrink_start(rule: RuleDefinition, track: Track, now: float) -> None:
    """At the gateway's start: each waiting departure waits at least :data:`RESTART_GRACE_S` more (or its whole
    window, if shorter), so that the tills' sales made while the gateway was down, queued in the store broker
    and delivered at once, can still account for it. (A full window again would let a gateway restarting more
    often than the window never raise it.)"""
    assert isinstance(rule, PossibleShrinkRule)
    grace = min(rule.sale_window_s, RESTART_GRACE_S)
    pending = [[p[0], p[1], max(float(p[2]), now + grace)] for p in track.data.get("pending", ())]
    track.data = {**track.data, "pending": pending}
    dues = [p[2] for p in pending]
    if track.state == ACTIVE and "until" in track.data:
        dues.append(track.data["until"])
    track.due = min(dues) if dues else None


def shrink_replan(ctx: Context, rule: RuleDefinition) -> None:
    """A new planogram: a shelf and GTIN it no longer watches ends its alert and forgets its tags."""
    for subject in ctx.subjects(rule):
        if subject in ctx.layout.places:
            continue
        track = ctx.track(rule, subject)
        if track.state == ACTIVE:
            ctx.clear_alert(
                rule,
                track,
                f"{subject}: no longer watched (planogram changed)",
                {"seq": None, "cause": "planogram"},
                reason="unwatched",
            )
        track.data = {"type": track.data.get("type")}
        track.due = None


def _sold(ctx: Context, rule: PossibleShrinkRule, event: Event) -> None:
    """Each unit sold accounts for the oldest departure of its GTIN still waiting, on any shelf; units left over
    account for departures reported within the sale window after it."""
    sale = event.model
    if not isinstance(sale, PosSale) or isinstance(sale, PosReturn):
        return
    layout = ctx.layout
    for line in sale.lines:
        gtin = gtin14(line.gtin) or layout.gtin_of_sku.get(line.sku)
        if gtin is None or line.quantity <= 0:
            continue
        units = min(math.ceil(line.quantity), MAX_UNITS)
        tracks = [ctx.track(rule, place.subject) for place in layout.by_gtin.get(gtin, ())]
        waiting = sorted(
            (int(p[1]), i, str(p[0])) for i, track in enumerate(tracks) for p in track.data.get("pending", ())
        )
        sold: dict[int, set[str]] = {}
        for _, i, epc in waiting[:units]:
            sold.setdefault(i, set()).add(epc)
        for i, epcs in sold.items():
            track = tracks[i]
            pending = [p for p in track.data.get("pending", ()) if p[0] not in epcs]
            track.data = {**track.data, "pending": pending}
            _settle(ctx, rule, track)
        left = units - min(units, len(waiting))
        if left and tracks:  # units sold before their tags were reported gone: kept for the sale window
            first = tracks[0]
            credits = [c for c in first.data.get("credits", ()) if c[1] > ctx.now]
            credits += [[event.seq, ctx.now + rule.sale_window_s]] * min(left, MAX_CREDITS)
            first.data = {**first.data, "credits": credits[-MAX_CREDITS:]}


def _use_credit(ctx: Context, rule: PossibleShrinkRule, gtin: str) -> bool:
    """A unit of ``gtin`` sold within the sale window before this departure was reported accounts for it."""
    for place in ctx.layout.by_gtin.get(gtin, ()):
        track = ctx.track(rule, place.subject)
        stored = track.data.get("credits")
        if not stored:
            continue
        credits = [c for c in stored if c[1] > ctx.now]
        used = bool(credits)
        track.data = {**track.data, "credits": credits[1:]}
        if used:
            return True
    return False


def _settle(ctx: Context, rule: PossibleShrinkRule, track: Track) -> None:
    """Departures whose sale window ended raise (or wait for the open alert to end); the open alert ends
    ``clear_after_s`` after it was raised; the timer is set to the next of these."""
    now = ctx.now
    pending = list(track.data.get("pending", ()))
    held = list(track.data.get("held", ()))
    held += [[p[0], p[1]] for p in pending if p[2] <= now]
    pending = [p for p in pending if p[2] > now]
    if track.state == ACTIVE and float(track.data.get("until", math.inf)) <= now:
        ctx.clear_alert(
            rule,
            track,
            f"{track.subject}: closed {rule.clear_after_s / 60:g} min after it was raised",
            {"seq": None, "cause": "time"},
        )
    if track.state != ACTIVE:
        track.data = {k: v for k, v in track.data.items() if k not in ("alerted", "until")}
    if track.state != ACTIVE and held:
        shelf_id, _, gtin = track.subject.rpartition("/")
        place = ctx.layout.places.get(track.subject)
        sku = place.sku if place is not None else None
        ctx.raise_alert(
            rule,
            track,
            f"{shelf_id}: {len(held)} item(s) of {sku or gtin} left the shelf and were not sold within"
            f" {rule.sale_window_s / 60:g} min",
            {
                "shelf_id": shelf_id,
                "sku": sku,
                "gtin": gtin,
                "reader": place.reader if place is not None else None,
                "count": len(held),
                "epcs": [h[0] for h in held][:MAX_EPCS],
                "seqs": [h[1] for h in held][:MAX_EPCS],
                "sale_window_s": rule.sale_window_s,
            },
        )
        track.data = {**track.data, "alerted": [h[0] for h in held], "until": now + rule.clear_after_s}
        held = []
    track.data = {**track.data, "pending": pending, "held": held}
    dues = [p[2] for p in pending]
    if track.state == ACTIVE and "until" in track.data:
        dues.append(track.data["until"])
    track.due = min(dues) if dues else None
