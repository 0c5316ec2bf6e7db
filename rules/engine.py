"""The rule engine: one pipeline processor that runs every rule of the store (docs/RULES.md).

It sits in the journal's pipeline after the stock ledger, so it sees every committed event in seq order, and
what it decides commits in the same transaction as the events that decided it: each rule's state (its timers,
its open alert and episode number) is a row of the ``rule_state`` table, and an ``alert.raised`` or
``alert.cleared`` is written together with the row that records it. A crash before the COMMIT loses both, and
the events are committed again by their drivers' redelivery; after it, the row says the alert was raised. So
each episode (rule id, subject, episode number) raises exactly once and clears at most once, whatever crashes.

Time is the rules' clock (:mod:`rules.clock`): timers wait on it, fire from the journal's ticks (about every
second), and survive restarts. A rule whose definition changed (or that was removed or disabled) starts fresh:
its open alerts are cleared with ``reason: rule_changed`` (or ``rule_removed``).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple

import orjson

from cloud_bridge.documents import Planogram, Roster
from gateway.kernel.config import Location
from gateway.kernel.events import (
    AlertAcknowledged,
    AlertCleared,
    AlertEscalated,
    AlertRaised,
    DocumentUpdated,
    SensorSample,
    StockLevel,
)
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Emit, Event, Processor
from gateway.kernel.rule_config import RuleDefinition
from gateway.kernel.store_hours import StoreHours
from rules.clock import RuleClock
from rules.layout import Layout

_LOGGER = logging.getLogger(__name__)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rule_state(
    rule_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    episode INTEGER NOT NULL,
    due REAL,
    data TEXT NOT NULL,
    PRIMARY KEY (rule_id, subject)
);
CREATE TABLE IF NOT EXISTS rule_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
DEFER_S: Final = 60.0
"""A track whose rule deferred its change (a silence timer restarted by a reading) is written within this long; after
a crash the rule type's ``recover`` brings it up to date from the events since (``rule_meta.deferred_seq``)."""
SKU_RULES: Final = frozenset(
    {
        "stock.low",
        "negative_stock",
        "returns_spike",
        "shelf_low",
        "shelf_empty",
        "possible_shrink",
        "misplaced",
        "attendance",
    }
)
"""Rule types whose subject is not a device (a SKU, the store, a shelf's GTIN): their alerts carry no device id."""
_UNREAD: Final = object()
_NO_TRACKS: Final[list[Track | None]] = [None]
MAX_PLANS: Final = 10_000
"""The (event kind, device) pairs whose rules and tracks the engine keeps worked out (then it starts again)."""
RETIRED: Final = "-"
"""The fingerprint of a track whose rule is no longer in force."""
IDLE: Final = "idle"
PENDING: Final = "pending"
ACTIVE: Final = "active"
CLEARING: Final = "clearing"


@dataclass(slots=True)
class Track:
    """One rule's state for one subject (a device): a row of ``rule_state``."""

    rule_id: str
    subject: str
    fingerprint: str
    state: str = IDLE
    episode: int = 0
    due: float | None = None
    """The rules' time its timer fires (pending: raise; clearing: clear; for silence: raise)."""
    data: dict[str, Any] = field(default_factory=dict)
    """What the rule type keeps: evidence, grace periods."""
    deferred: bool = False
    """Set by an ``observe`` whose change may be written later (:data:`DEFER_S`); not stored."""

    @property
    def alert_id(self) -> str:
        return f"{self.rule_id}/{self.subject}/{self.episode}"


class Context:
    """What a rule type's functions are given: the time, and the way to raise and clear alerts."""

    def __init__(self, engine: RuleEngine, now: float) -> None:
        self.now = now
        self._engine = engine

    def raise_alert(self, rule: RuleDefinition, track: Track, message: str, details: dict[str, Any]) -> None:
        self._engine.raise_alert(rule, track, message, details, self.now)

    def clear_alert(
        self,
        rule: RuleDefinition,
        track: Track,
        message: str,
        details: dict[str, Any],
        reason: Literal["recovered", "unwatched"] = "recovered",
    ) -> None:
        """End the track's open alert: it recovered, or (``unwatched``) what it watched is no longer watched."""
        self._engine.clear_alert(rule, track, reason, message, details)

    def has(self, rule: RuleDefinition, subject: str) -> bool:
        """Whether the rule has a track for the subject (without making one)."""
        return (rule.id, subject) in self._engine._tracks

    def due_at(self, due: float | None) -> str | None:
        """The wall-clock time (UTC, ISO 8601) a timer was due, if the wall clock can say."""
        return None if due is None else self._engine.due_at(due)

    @property
    def layout(self) -> Layout:
        """HQ's planogram, as the RFID shelf rules read it."""
        return self._engine.layout

    @property
    def roster(self) -> Roster | None:
        """HQ's roster (None before HQ sent one), as the attendance rules read it."""
        return self._engine.roster

    @property
    def location(self) -> Location | None:
        """Where the store is (``store.location``): the check-ins' geofence."""
        return self._engine.location

    def velocity(self, sku: str, days: int) -> Decimal | None:
        """The SKU's units sold per day over the last ``days`` days, from the stock ledger; None without one."""
        known = self._engine.velocity
        return None if known is None else known(sku, days)

    def emit(self, model: StrictModel) -> None:
        """Commit an event other than an alert (a daily summary) with what the rule writes."""
        self._engine.emit(model)

    def track(self, rule: RuleDefinition, subject: str) -> Track:
        """The rule's track for a subject, for rule types one event concerns several subjects of
        (:attr:`RuleType.many`): the engine writes those it changed."""
        return self._engine.touch(rule, subject)

    def subjects(self, rule: RuleDefinition) -> list[str]:
        """The subjects the rule has tracks for."""
        return self._engine.subjects(rule.id)

    @property
    def hours(self) -> StoreHours:
        return self._engine.hours

    @property
    def synced(self) -> bool:
        """Whether the wall clock can be trusted now (the store's hours and dates depend on it)."""
        return self._engine.clock.synced()

    def wall(self, at: float) -> float:
        """The wall-clock (Unix) time of the rules' time ``at``, as the wall clock reads now."""
        return self._engine.wall_of(at)


Observe = Callable[[Context, RuleDefinition, Track, Event, StrictModel], None]
"""A rule type's reaction to one committed event about ``track``'s subject. The engine writes the track when its
state, episode, timer or data compare different afterwards: replace a nested value in ``track.data`` (a new
dict or list), never change one in place."""
Recover = Callable[[sqlite3.Connection, list[tuple[RuleDefinition, list[Track]]], int, float], list[Track]]
"""A rule type's catching up, at a load, with the events committed after a seq (see ``RuleType.recover``)."""
Fire = Callable[[Context, RuleDefinition, Track], None]
"""A rule type's reaction to its timer (``track.due``) coming due."""


def device_subject(rule: RuleDefinition, event: Event) -> str | None:
    """The subject of a device rule: the event's device, when the rule selects it."""
    if event.device_id is None or not rule.select.matches(event.device_id, _source(event)):
        return None
    return event.device_id


@dataclass(frozen=True, slots=True)
class RuleType:
    kinds: frozenset[str]
    observe: Observe
    fire: Fire
    subject: Callable[[RuleDefinition, Event], str | None] = device_subject
    """What an event is about for this rule (a device, a SKU), or None: not for it."""
    start: Callable[[RuleDefinition, Track, float], None] | None = None
    """At the gateway's start, for each of its tracks: adjust timers the time away should not count for."""
    many: Callable[[Context, RuleDefinition, Event], None] | None = None
    """For rules one event concerns several subjects of (a shelf reader's window: each shelf and GTIN it
    watches): it takes the tracks it changes from ``ctx.track``, and ``subject`` and ``observe`` are unused."""
    replan: Callable[[Context, RuleDefinition], None] | None = None
    """After HQ replaced the planogram (``ctx.layout``): look again at the rule's tracks (``ctx.subjects``)."""
    reroster: Callable[[Context, RuleDefinition], None] | None = None
    """At every load (start, a rule change) and after HQ replaced the roster (``ctx.roster``): set the rule's
    timers for the shifts (it takes its tracks from ``ctx.track``)."""
    keep: frozenset[str] = frozenset()
    """Keys of a track's data kept when its rule changes (what happened, not what the rule decided of it)."""
    any_device: frozenset[str] = frozenset()
    """Kinds it reads from every device, whatever ``select.devices`` names (a shelf rule's tills)."""
    recover: Recover | None = None
    """For a type whose ``observe`` defers changes (``track.deferred``): at every load, bring its tracks up to date
    from the events committed after the seq given (the last write of deferred changes); returns those it changed."""


class _Entry(NamedTuple):
    """A rule as the event index holds it, with what the engine asks of it on every event worked out once."""

    rule: RuleDefinition
    rule_id: str
    kind: RuleType
    observe: Observe
    many: Callable[[Context, RuleDefinition, Event], None] | None
    by_device: bool
    """Its subject is the event's device (the index matched it)."""
    sources: frozenset[str]
    """The device formats it reads (``select.sources``); empty: any."""


class RuleEngine(Processor):
    """Every rule of the store, indexed by the event kinds each reads (unrelated rules cost nothing)."""

    name = "rules"

    def __init__(
        self,
        rules: Sequence[RuleDefinition],
        clock: RuleClock,
        hq_rules: Callable[[sqlite3.Connection], Sequence[RuleDefinition]] | None = None,
        *,
        planogram: Callable[[sqlite3.Connection], Planogram | None] | None = None,
        types: dict[str, RuleType] | None = None,
        wall: Callable[[], float] = time.time,
        hours: StoreHours | None = None,
        velocity: Callable[[str, int], Decimal | None] | None = None,
        roster: Callable[[sqlite3.Connection], Roster | None] | None = None,
        location: Location | None = None,
    ) -> None:
        from rules.types import RULE_TYPES  # the rule types import this module's Track and Context

        self.types = types if types is not None else RULE_TYPES
        self._configured = list(rules)
        self._hq_rules = hq_rules
        """HQ's rules (the ``rules`` document), read again at every load: they join the configured ones, and
        replace a configured rule with the same id."""
        self._planogram = planogram
        """HQ's planogram, read at every load and after a ``document.updated`` says it changed."""
        self.layout = Layout()
        self._replan = False
        self._roster = roster
        """HQ's roster, read at every load and after a ``document.updated`` says it changed."""
        self.roster: Roster | None = None
        self._reroster = False
        self.location = location
        self._touched: dict[tuple[str, str], tuple[Any, ...]] | None = None
        self._by_rule: dict[str, list[str]] | None = None
        """Rule id -> the subjects of its tracks: built when first asked, kept as tracks are added."""
        """The tracks a ``many`` rule type took, as they were before."""
        self.clock = clock
        self._wall = wall
        self.hours = hours if hours is not None else StoreHours()
        self.velocity = velocity
        """A SKU's units sold per day over the last N days (the stock ledger keeps them); None: not known here."""
        """The store's opening hours, for the rules that count only open time."""
        self.rules: dict[str, RuleDefinition] = {}
        self._by_kind: dict[str, list[_Entry]] = {}
        self._by_device: dict[tuple[str, str], list[_Entry]] = {}
        self._by_sku: dict[str, list[_Entry]] = {}
        """The stock.level rules that name their SKUs, by SKU."""
        self._plans: dict[tuple[str, str], tuple[Sequence[_Entry], list[Track | None]]] = {}
        """(kind, device) -> its rules and their tracks (:meth:`_plan`); forgotten at every load."""
        self._ctx = Context(self, 0.0)
        """The context the rules' ``observe`` are given (its time set at every event)."""
        self.evaluations = 0
        """(Event, rule) pairs the index matched since start, rolled-back commits included
        (``storegw_rule_evaluations``)."""
        self.errors: dict[str, int] = {}
        """Rule id -> events its rule failed on since start (``storegw_rule_errors``)."""
        self._fingerprints: dict[str, str] = {}
        self._index(self._configured)
        self._tracks: dict[tuple[str, str], Track] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._deferred: set[tuple[str, str]] = set()
        """Tracks changed only in ways their rule type lets wait: written within :data:`DEFER_S`."""
        self._deferred_at = -math.inf
        self._deferred_seq = 0
        """``rule_meta.deferred_seq`` as last read or written."""
        self._seen_seq = 0
        """The seq of the last event applied."""
        self._rewrite: list[Track] = []
        """Tracks of rules that changed or went, reset: written (their alerts cleared) with the next write."""
        self._retired: dict[tuple[str, str], Track] = {}
        """Tracks of rules no longer in force: kept for their episode numbers, should the rule come back."""
        self._out: list[Emit] = []
        self._sources: dict[str, str] = {}
        """Device -> the format of its readings (a sensor.sample's source), as last seen."""
        self._earliest = math.inf
        """The earliest timer of any track (at most: a timer set since may be earlier only if noted here)."""

    # --- the processor -----------------------------------------------------------------------------------

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        away = self.clock.load(conn)
        self.clock.save(conn, force=True)
        # Nothing is deferred yet: the events before now need no recovery (an older release wrote every change).
        conn.execute("INSERT OR IGNORE INTO rule_meta VALUES ('deferred_seq', ?)", (_newest_seq(conn),))
        conn.execute("COMMIT")
        self._load(conn)
        now = self.clock.now()
        for key, track in self._tracks.items():
            start = self.types[self.rules[track.rule_id].type].start
            if start is not None and track.due is not None:
                start(self.rules[track.rule_id], track, now)
                self._dirty.add(key)
        self._earliest = self._earliest_due()
        if away:
            _LOGGER.info("rules: the gateway was away %.0f s; the rules' timers count that time", away)

    def apply(self, event: Event) -> None:
        self._seen_seq = event.seq
        if event.kind == "alert.acknowledged":
            self._acknowledge(event)
            return
        if event.kind == "document.updated" and self._planogram is not None:
            updated = event.model
            self._replan |= isinstance(updated, DocumentUpdated) and updated.name == "planogram"
        if event.kind == "document.updated" and self._roster is not None:
            updated = event.model
            self._reroster |= isinstance(updated, DocumentUpdated) and updated.name == "roster"
        device = event.device_id
        slots: list[Track | None] | None = None
        if device is not None:
            plan = self._plans.get((event.kind, device))
            if plan is not None:
                rules, slots = plan
            else:
                named = self._by_device.get((event.kind, device))
                rules = named if named is not None else self._by_kind.get(event.kind, ())
        else:
            found_rules: Sequence[_Entry] | None = None
            if event.kind == "stock.level":
                level = event.model
                if isinstance(level, StockLevel):
                    found_rules = self._by_sku.get(level.sku)
            rules = found_rules if found_rules is not None else self._by_kind.get(event.kind, ())
        if not rules:
            return
        self.evaluations += len(rules)
        model = event.model
        if device is not None and isinstance(model, SensorSample) and model.source is not None:
            self._sources[device] = model.source  # remembered for device.status
        ctx = self._ctx
        ctx.now = self.clock.now()
        source: object = _UNREAD
        tracks, dirty, out = self._tracks, self._dirty, self._out
        for (rule, rule_id, kind, observe, many, by_device, sources), track in zip(
            rules, slots or _NO_TRACKS * len(rules), strict=True
        ):
            if track is None:  # found each time: a first event, no device, a format filter, another subject
                if many is not None:
                    self._each(ctx, rule, many, event)
                    continue
                if by_device:  # the index already matched the device
                    if device is None:
                        continue
                    if sources:
                        if source is _UNREAD:
                            source = self._sources.get(device)
                        if source not in sources:
                            continue
                    subject = device
                else:
                    found = kind.subject(rule, event)
                    if found is None:
                        continue
                    subject = found
                track = tracks.get((rule_id, subject)) or self._track(rule, subject)
            state, episode, due, data = track.state, track.episode, track.due, track.data
            before = data.copy()  # to see a change, and to restore it if the rule fails
            emitted = len(out)
            try:
                observe(ctx, rule, track, event, model)
            except Exception:  # one rule's bug: that rule skips the event (as if unseen), the others take it
                _LOGGER.exception("rule %s failed on seq %d and skips it", rule.id, event.seq)
                self.errors[rule_id] = self.errors.get(rule_id, 0) + 1
                track.state, track.episode, track.due, track.data = state, episode, due, before
                track.deferred = False
                del out[emitted:]
                continue
            if track.state != state or track.episode != episode or track.due != due or track.data != before:
                key = (rule_id, track.subject)
                if key not in dirty:
                    if track.deferred:  # the rule type says this change may wait (and can be recovered)
                        self._deferred.add(key)
                    else:
                        dirty.add(key)
                if track.due is not None and track.due < self._earliest:
                    self._earliest = track.due
            track.deferred = False
        if device is not None and slots is None:
            self._plan(event.kind, device, rules)

    def _plan(self, kind: str, device: str, rules: Sequence[_Entry]) -> None:
        """After the first event of this kind from this device: its rules, and the tracks (made by that event, in
        the rules' order) of those whose subject is the device and that read any format. The next such events
        find them here, until the next load."""
        tracks = self._tracks
        slots = [tracks.get((e.rule_id, device)) if e.by_device and not e.sources else None for e in rules]
        if len(self._plans) >= MAX_PLANS:  # devices come and go: the plans of those gone are not kept forever
            self._plans.clear()
        self._plans[kind, device] = (rules, slots)

    def _acknowledge(self, event: Event) -> None:
        """Note an acknowledgement (its note is the corrective action) on the open alert it names."""
        ack = event.model
        assert isinstance(ack, AlertAcknowledged)
        found = split_alert_id(ack.alert_id)
        track = self._tracks.get(found[:2]) if found else None
        if (
            track is None
            or found is None
            or track.episode != found[2]
            or track.state not in (ACTIVE, CLEARING)
        ):
            return
        track.data["ack"] = {
            "seq": event.seq,
            "note": ack.note,
            "role": ack.role,
            "via": ack.via,
            "by": ack.by,
        }
        self._dirty.add((track.rule_id, track.subject))

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        if self._replan:
            self._replan_shelves(conn)
        if self._reroster:
            self._read_roster(conn)
        self._due(self.clock.now())
        return self._write(conn)

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        if self._reroster:
            self._read_roster(conn)
        self._due(self.clock.now())
        return self._write(conn)

    def rollback(self, conn: sqlite3.Connection) -> None:
        self._load(conn)

    def reload(self, conn: sqlite3.Connection) -> None:
        """Read the state again in the middle of a transaction: the changes this process deferred are not in the
        tables, and the events that made them may not be either (they are inserted at the end): they are carried
        over to the tracks that are still as they were, and written with the next write."""
        carried = {
            key: (t.fingerprint, t.episode, t.due, t.data)
            for key in self._deferred
            if (t := self._tracks.get(key)) is not None and t.state == PENDING
        }
        self._load(conn)
        for key, (fingerprint, episode, due, data) in carried.items():
            track = self._tracks.get(key)
            if track is not None and (track.fingerprint, track.episode, track.state) == (
                fingerprint,
                episode,
                PENDING,
            ):
                track.due, track.data = due, data
                self._dirty.add(key)
        self._earliest = self._earliest_due()

    @property
    def wants_ticks(self) -> bool:  # type: ignore[override]
        """Ticks only while a timer waits, or clears of changed rules wait to be written."""
        return self._earliest < math.inf or bool(self._out) or bool(self._rewrite) or self._reroster

    @property
    def earliest(self) -> float:
        """The rules' time of the earliest timer (infinity: none): when a tick will do something."""
        return self._earliest

    # --- alerts ------------------------------------------------------------------------------------------

    def raise_alert(
        self,
        rule: RuleDefinition,
        track: Track,
        message: str,
        details: dict[str, Any],
        now: float | None = None,
    ) -> None:
        track.episode += 1
        track.state = ACTIVE
        at = self.clock.now() if now is None else now
        track.data = {k: v for k, v in track.data.items() if k not in ("ack", "esc", "channels")}
        track.data["channels"] = list(
            rule.notify
        )  # its clear goes where it went, whatever the rule says later
        if rule.renotify_s is not None or rule.escalate:
            track.data["esc"] = {
                "raised": at,
                "message": message[:300],  # told again with each re-notification and escalation
                "steps": 0,
                "renotify": None if rule.renotify_s is None else at + rule.renotify_s,
            }
            self._earliest = min(self._earliest, _esc_due(rule, track.data["esc"]))
        details = {
            "alert_id": track.alert_id,
            "rule_id": rule.id,
            "episode": track.episode,
            "channels": list(rule.notify),
            **details,
        }
        self._out.append(
            Emit(
                AlertRaised(
                    rule=rule.type,
                    severity=rule.severity,
                    subject=track.subject[:64],
                    message=message[:500],
                    details=details,
                ),
                self._device(track),
            )
        )

    def _device(self, track: Track) -> str | None:
        """The events' device id: the subject of a device rule, none for a SKU's."""
        return None if track.data.get("type") in SKU_RULES else track.subject

    def clear_alert(
        self,
        rule: RuleDefinition | None,
        track: Track,
        reason: Literal["recovered", "rule_changed", "rule_removed", "unwatched"],
        message: str,
        details: dict[str, Any],
    ) -> None:
        kind = rule.type if rule is not None else str(track.data.get("type", "rule"))
        self._out.append(
            Emit(
                AlertCleared(
                    rule=kind,
                    subject=track.subject[:64],
                    alert_id=track.alert_id,
                    reason=reason,
                    message=message[:500],
                    details={
                        "rule_id": track.rule_id,
                        "episode": track.episode,
                        "channels": list(track.data.get("channels", rule.notify if rule is not None else [])),
                        **details,
                    },
                ),
                self._device(track),
            )
        )
        track.state = IDLE
        track.due = None
        track.data = {k: v for k, v in track.data.items() if k not in ("ack", "esc", "channels")}

    def _escalate(self, rule: RuleDefinition, track: Track, now: float) -> None:
        """Tell more people about an open alert nobody acknowledged: the next escalation step that came due,
        or the rule's own channels again (``renotify_s``)."""
        esc = dict(track.data.get("esc") or {})
        if not esc or track.state not in (ACTIVE, CLEARING) or "ack" in track.data:
            track.data = {k: v for k, v in track.data.items() if k != "esc"}
            return
        steps = int(esc["steps"])
        if rule.renotify_s is None:  # the rule no longer re-notifies (changed while the alert is open)
            esc["renotify"] = None
        elif esc.get("renotify") is None:
            esc["renotify"] = now + rule.renotify_s
        if steps < len(rule.escalate) and esc["raised"] + rule.escalate[steps].after_s <= now:
            step, channels = steps + 1, rule.escalate[steps].notify
            esc["steps"] = step
        elif esc.get("renotify") is not None and esc["renotify"] <= now:
            step, channels = 0, rule.notify
            esc["renotify"] = now + (rule.renotify_s or 0)
        else:
            track.data = {**track.data, "esc": esc}
            return
        track.data = {**track.data, "esc": esc}
        minutes = (now - esc["raised"]) / 60
        self._out.append(
            Emit(
                AlertEscalated(
                    alert_id=track.alert_id,
                    rule=rule.type,
                    subject=track.subject[:64],
                    step=step,
                    channels=list(channels),
                    message=f"not acknowledged after {minutes:.0f} min: {esc.get('message', track.alert_id)}"[
                        :500
                    ],
                    details={"rule_id": rule.id, "episode": track.episode, "step": step},
                ),
                self._device(track),
            )
        )

    def wall_of(self, at: float) -> float:
        return self._wall() - (self.clock.now() - at)

    def due_at(self, due: float) -> str | None:
        """The wall-clock time a timer was due, for an alert's details (None while the clock is unsynced)."""
        if not self.clock.synced():
            return None
        wall = self._wall() - (self.clock.now() - due)
        return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    # --- state ---------------------------------------------------------------------------------------------

    def _index(self, rules: Sequence[RuleDefinition]) -> None:
        """By event kind, and by device for rules that name theirs: an event costs only the rules that may
        care about it, however many others there are."""
        self.rules = {r.id: r for r in rules if r.enabled}
        self._fingerprints = {r.id: r.fingerprint() for r in self.rules.values()}
        self._by_kind = {}
        self._by_device = {}
        self._by_sku = {}
        self._plans = {}
        for rule in self.rules.values():
            rule_type = self.types[rule.type]
            by_device = rule_type.many is None and rule_type.subject is device_subject
            entry = _Entry(
                rule,
                rule.id,
                rule_type,
                rule_type.observe,
                rule_type.many,
                by_device,
                frozenset(rule.select.sources),
            )
            for kind in rule_type.kinds:
                if rule.select.devices and kind not in rule_type.any_device:
                    for device in rule.select.devices:
                        self._by_device.setdefault((kind, device), []).append(entry)
                elif rule.select.skus and kind == "stock.level":
                    for sku in rule.select.skus:
                        self._by_sku.setdefault(sku, []).append(entry)
                else:
                    self._by_kind.setdefault(kind, []).append(entry)
        # The rules for every device (or SKU) first, then those naming it: one list per device, made once.
        for (kind, device), named in self._by_device.items():
            self._by_device[kind, device] = [*self._by_kind.get(kind, ()), *named]
        for sku, named in self._by_sku.items():
            self._by_sku[sku] = [*self._by_kind.get("stock.level", ()), *named]

    def _track(self, rule: RuleDefinition, subject: str) -> Track:
        key = (rule.id, subject)
        track = self._tracks.get(key)
        if track is None:
            retired = self._retired.pop(key, None)  # the rule came back: its episode numbers go on
            episode = retired.episode if retired is not None else 0
            track = Track(
                rule.id, subject, self._fingerprints[rule.id], episode=episode, data={"type": rule.type}
            )
            self._tracks[key] = track
            if self._by_rule is not None:
                self._by_rule.setdefault(rule.id, []).append(subject)
        return track

    def _due(self, now: float) -> None:
        """Fire the timers that came due: a scan of the tracks only when the earliest timer is due."""
        if now < self._earliest:
            return
        ctx = Context(self, now)
        for key, track in self._tracks.items():
            rule = self.rules[track.rule_id]
            if track.due is not None and track.due <= now:
                touched: dict[tuple[str, str], tuple[Any, ...]] = {}
                self._touched = touched  # other tracks the timer changes (ctx.track) are written too
                try:
                    self.types[rule.type].fire(ctx, rule, track)
                except Exception:  # one rule type's bug must not stop every other rule's timers
                    _LOGGER.exception(
                        "rule %s: its timer for %s failed and is dropped", rule.id, track.subject
                    )
                    track.due = None
                finally:
                    self._touched = None
                self._dirty.add(key)
                for other, before in touched.items():
                    changed = self._tracks[other]
                    if before != (changed.state, changed.episode, changed.due, changed.data):
                        self._dirty.add(other)
            esc = track.data.get("esc")
            if esc and _esc_due(rule, esc) <= now:
                try:
                    self._escalate(rule, track, now)
                except Exception:  # like a failing timer: logged, dropped, the other rules go on
                    _LOGGER.exception("rule %s: escalating %s failed and stops", rule.id, track.alert_id)
                    track.data = {k: v for k, v in track.data.items() if k != "esc"}
                self._dirty.add(key)
        self._earliest = self._earliest_due()

    def touch(self, rule: RuleDefinition, subject: str) -> Track:
        """A track for a ``many`` rule type: noted as it was, to write it if it changes (or restore it)."""
        key = (rule.id, subject)
        track = self._tracks.get(key) or self._track(rule, subject)
        if self._touched is not None and key not in self._touched:
            self._touched[key] = (track.state, track.episode, track.due, dict(track.data))
        return track

    def subjects(self, rule_id: str) -> list[str]:
        """The subjects a rule has tracks for (a copy)."""
        if self._by_rule is None:
            self._by_rule = {}
            for owner, subject in self._tracks:
                self._by_rule.setdefault(owner, []).append(subject)
        return list(self._by_rule.get(rule_id, ()))

    def _each(self, ctx: Context, rule: RuleDefinition, work: Callable[..., None], *args: Any) -> None:
        """Run a rule type's work that takes several of its tracks (``ctx.track``): the tracks it changed are
        written; if it fails (a bug), they stay as they were and what it emitted is dropped."""
        touched: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._touched = touched
        emitted = len(self._out)
        try:
            work(ctx, rule, *args)
        except Exception:  # like a failing observe: that rule skips it, the others go on
            _LOGGER.exception("rule %s failed and skips what it was doing", rule.id)
            self.errors[rule.id] = self.errors.get(rule.id, 0) + 1
            for key, (state, episode, due, data) in touched.items():
                track = self._tracks[key]
                track.state, track.episode, track.due, track.data = state, episode, due, data
            del self._out[emitted:]
            return
        finally:
            self._touched = None
        for key, before in touched.items():
            track = self._tracks[key]
            if before != (track.state, track.episode, track.due, track.data):
                self._dirty.add(key)
                if track.due is not None and track.due < self._earliest:
                    self._earliest = track.due

    def emit(self, model: StrictModel) -> None:
        self._out.append(Emit(model))

    def _read_roster(self, conn: sqlite3.Connection) -> None:
        """HQ's roster, read again: the rules that follow it set their timers for its shifts (the tracks they
        change are written in this transaction)."""
        self._reroster = False
        if self._roster is not None:
            try:
                self.roster = self._roster(conn)
            except Exception:  # a bug in reading it: the attendance rules keep the roster they had
                _LOGGER.exception(
                    "rules: the roster could not be read; the attendance rules keep the one they had"
                )
        ctx = Context(self, self.clock.now())
        for rule in self.rules.values():
            reroster = self.types[rule.type].reroster
            if reroster is not None:
                self._each(ctx, rule, reroster)

    def _read_planogram(self, conn: sqlite3.Connection) -> None:
        self._replan = False
        if self._planogram is None:
            return
        try:
            self.layout = Layout(self._planogram(conn))
        except Exception:  # a bug in reading it: the shelf rules keep the planogram they had
            _LOGGER.exception("rules: the planogram could not be read; the shelf rules keep the one they had")

    def _replan_shelves(self, conn: sqlite3.Connection) -> None:
        """HQ replaced the planogram: the shelf rules look again at what they watch, in this transaction."""
        self._read_planogram(conn)
        ctx = Context(self, self.clock.now())
        for rule in self.rules.values():
            replan = self.types[rule.type].replan
            if replan is not None:
                self._each(ctx, rule, replan)

    def _earliest_due(self) -> float:
        earliest = math.inf
        for track in self._tracks.values():
            if track.due is not None:
                earliest = min(earliest, track.due)
            esc = track.data.get("esc")
            if esc:
                earliest = min(earliest, _esc_due(self.rules[track.rule_id], esc))
        return earliest

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Changes deferred and not yet written when the gateway stopped (or a commit failed): the rule types that
        defer bring their tracks up to date from the events since the last write of them, in the next write."""
        self._deferred = set()
        self._deferred_at = -math.inf
        row = conn.execute("SELECT value FROM rule_meta WHERE key = 'deferred_seq'").fetchone()
        if row is None:
            return
        since = self._deferred_seq = int(row[0])
        newest = _newest_seq(conn)
        self._seen_seq = max(since, newest)  # what was applied and not committed is applied again
        recovering = {r.id: r for r in self.rules.values() if self.types[r.type].recover is not None}
        if not recovering or newest <= since:
            return
        tracks: dict[str, list[Track]] = {}
        for (rule_id, _), track in self._tracks.items():
            if rule_id in recovering:
                tracks.setdefault(rule_id, []).append(track)
        by_type: dict[Recover, list[tuple[RuleDefinition, list[Track]]]] = {}
        for rule_id, rule in recovering.items():
            recover = self.types[rule.type].recover
            assert recover is not None
            by_type.setdefault(recover, []).append((rule, tracks.get(rule_id, [])))
        now = self.clock.now()
        for recover, rules in by_type.items():
            for track in recover(conn, rules, since, now):
                self._dirty.add((track.rule_id, track.subject))

    def _write(self, conn: sqlite3.Connection) -> list[Emit]:
        now = self.clock.now()
        if now - self._deferred_at >= DEFER_S:  # the deferred changes too, and from which seq to recover
            self._deferred_at = now
            self._dirty |= self._deferred
            self._deferred = set()
            if self._seen_seq != self._deferred_seq:
                conn.execute("UPDATE rule_meta SET value = ? WHERE key = 'deferred_seq'", (self._seen_seq,))
                self._deferred_seq = self._seen_seq
        elif self._deferred and self._dirty:
            self._deferred -= self._dirty
        if self._dirty or self._rewrite:
            tracks = [*self._rewrite, *(self._tracks[key] for key in self._dirty)]
            self._rewrite = []
            rows = [
                (t.rule_id, t.subject, t.fingerprint, t.state, t.episode, t.due, orjson.dumps(t.data))
                for t in tracks
            ]
            conn.executemany("INSERT OR REPLACE INTO rule_state VALUES (?,?,?,?,?,?,?)", rows)
            self._dirty.clear()
            self.clock.save(conn, force=True)
        elif self._earliest < math.inf:  # timers wait: keep the clock's reading fresh
            self.clock.save(conn)
        out, self._out = self._out, []
        return out

    def _load(self, conn: sqlite3.Connection) -> None:
        """The state as committed. A rule that changed (how it evaluates), was disabled or removed starts afresh:
        its open alerts are cleared and its tracks reset in the next write (the same transaction as the clears);
        their episode numbers go on, so an alert id is never used twice."""
        self._read_planogram(conn)
        self._reroster = True  # the roster is read, and the rules' timers for it set, with the next write
        if self._hq_rules is not None:
            merged = {r.id: r for r in self._configured}
            hq = list(self._hq_rules(conn))
            if any(r.type == "attendance" for r in hq):  # HQ's attendance rule replaces the store's own
                merged = {i: r for i, r in merged.items() if r.type != "attendance"}
            merged.update((r.id, r) for r in hq)
            self._index(list(merged.values()))
        self._tracks = {}
        self._plans = {}
        self._by_rule = None
        self._retired = {}
        self._dirty.clear()
        self._deferred = set()
        self._rewrite = []
        self._out = []
        for rule_id, subject, fp, state, episode, due, data in conn.execute("SELECT * FROM rule_state"):
            track = Track(rule_id, subject, fp, state, int(episode), due, orjson.loads(data))
            key = (rule_id, subject)
            rule = self.rules.get(rule_id)
            current = self._fingerprints.get(rule_id, RETIRED)
            if fp == current:
                (self._tracks if rule is not None else self._retired)[key] = track
                continue
            if track.state in (ACTIVE, CLEARING):
                why: Literal["rule_changed", "rule_removed"] = (
                    "rule_changed" if rule is not None else "rule_removed"
                )
                self.clear_alert(rule, track, why, f"rule {rule_id} changed: its alert ends here", {})
            kept = self.types.get(str(track.data.get("type")))
            keep = {k: track.data[k] for k in (kept.keep if kept else ()) if k in track.data}
            reset = Track(
                rule_id, subject, current, IDLE, track.episode, None, {"type": track.data.get("type"), **keep}
            )
            (self._tracks if rule is not None else self._retired)[key] = reset
            self._rewrite.append(reset)
        self._recover(conn)
        now = self.clock.now()
        for key, track in self._tracks.items():  # open alerts of rules that began re-notifying or escalating
            rule = self.rules[track.rule_id]
            wants = rule.renotify_s is not None or bool(rule.escalate)
            if (
                wants
                and track.state in (ACTIVE, CLEARING)
                and "esc" not in track.data
                and "ack" not in track.data
            ):
                track.data = {**track.data, "esc": {"raised": now, "steps": 0, "renotify": None}}
                self._dirty.add(key)
        self._earliest = self._earliest_due()


def _source(event: Event) -> str | None:
    """The format that decoded a device's readings (a sensor sample's ``source``), or None."""
    model = event.model
    return model.source if isinstance(model, SensorSample) else None  # only samples say their format


def newest_by_device(conn: sqlite3.Connection, kinds: tuple[str, ...], since: int) -> dict[str, int]:
    """Each device's newest event of ``kinds`` committed after ``since`` (for a rule type's ``recover``)."""
    marks = ",".join("?" * len(kinds))
    rows = conn.execute(
        f"SELECT device_id, MAX(seq) FROM events WHERE seq > ? AND kind IN ({marks})"  # noqa: S608 - marks only
        " AND device_id IS NOT NULL GROUP BY device_id",
        (since, *kinds),
    )
    return {device: int(seq) for device, seq in rows}


def _newest_seq(conn: sqlite3.Connection) -> int:
    """The journal's newest seq (0 without an events table: the engine on a file of its own, as in a backtest)."""
    if (
        conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
        is None
    ):
        return 0
    (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
    return int(seq)


def split_alert_id(alert_id: str) -> tuple[str, str, int] | None:
    """``<rule id>/<subject>/<episode>`` -> (rule id, subject, episode); None if it is not one. (A rule id has
    no '/'; a subject, a SKU, may.)"""
    rule_id, _, rest = alert_id.partition("/")
    subject, _, episode = rest.rpartition("/")
    if not rule_id or not subject or not episode.isdigit():
        return None
    return rule_id, subject, int(episode)


def open_alerts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The open alerts as committed (``rule_state``): raised and not yet cleared, acknowledged or not."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='rule_state'").fetchone()
    if not exists:
        return []
    rows = conn.execute(
        "SELECT rule_id, subject, state, episode, data FROM rule_state WHERE state IN (?, ?)"
        " ORDER BY rule_id, subject",
        (ACTIVE, CLEARING),
    ).fetchall()
    out = []
    for rule_id, subject, state, episode, data in rows:
        extra = orjson.loads(data)
        out.append(
            {
                "alert_id": f"{rule_id}/{subject}/{episode}",
                "rule_id": rule_id,
                "rule": extra.get("type"),
                "subject": subject,
                "episode": int(episode),
                "recovering": state == CLEARING,
                "acknowledged": extra.get("ack"),
            }
        )
    return out


def _esc_due(rule: RuleDefinition, esc: dict[str, Any]) -> float:
    """When an open alert's next escalation step or re-notification is due (infinity: none left)."""
    due = math.inf
    steps = int(esc.get("steps", 0))
    if steps < len(rule.escalate):
        due = esc["raised"] + rule.escalate[steps].after_s
    if esc.get("renotify") is not None:
        due = min(due, esc["renotify"])
    elif rule.renotify_s is not None:
        due = min(due, esc["raised"])  # the rule started re-notifying while the alert was open: look now
    return due
