"""Backtest: replay exported events through the rule engine in virtual time, deterministically.

``store-gateway rules test RULES.yaml --events events.jsonl`` prints every alert the rules would have raised,
cleared or escalated, and the recorded acknowledgements of them, with the time it would have happened;
``--against OTHER.yaml`` prints the difference between two rule sets over the same events (what a threshold
change would have done last month, before HQ pushes it). The events are envelopes as the gateway stores and
sends them, one JSON object per line: from ``store-gateway export``, from ``GET /api/events``, or from HQ's
copy.

Virtual time is the events' own ``recorded_at`` (the gateway's clock when each was committed); timers fire at
their due time between events. The engine is the live one, on an in-memory database: live and replay run the
same code. (Live alerts fire from ticks about a second apart, so their times may differ from the replay's by
that much; which alerts, in which order, do not, except around the gateway's downtime and clock steps: see
docs/RULES.md.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from gateway.kernel.config import Location
from gateway.kernel.events import (
    PAYLOADS,
    AlertAcknowledged,
    AlertCleared,
    AlertEscalated,
    AlertRaised,
    AttendanceDaily,
    StockReplenishmentDraft,
)
from gateway.kernel.pipeline import Derived, Event, Pipeline
from gateway.kernel.rule_config import RuleDefinition
from gateway.kernel.store_hours import StoreHours
from rules.clock import RuleClock
from rules.engine import RuleEngine

OUTPUTS: Final = frozenset(
    {
        "alert.raised",
        "alert.cleared",
        "alert.escalated",
        "notification.sent",
        "notification.failed",
        "attendance.daily",
        "stock.replenishment_draft",
    }
)
"""What the rules (and their notifications) produced live: not replayed, made again."""


@dataclass(frozen=True, slots=True)
class Outcome:
    at: float
    kind: str
    alert_id: str
    message: str

    def line(self) -> str:
        when = datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return f"{when} {self.kind.removeprefix('alert.'):<8} {self.alert_id}  {self.message}"


def read_envelopes(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            envelope = orjson.loads(text)
        except orjson.JSONDecodeError as err:
            raise ValueError(f"line {number}: not JSON: {err}") from err
        if not isinstance(envelope, dict) or not {"seq", "kind", "recorded_at", "data"} <= envelope.keys():
            raise ValueError(f"line {number}: not an event envelope (seq, kind, recorded_at, data)")
        yield envelope


def replay(
    rules: Sequence[RuleDefinition],
    envelopes: Iterable[dict[str, Any]],
    hours: StoreHours | None = None,
    location: Location | None = None,
) -> list[Outcome]:
    """The alerts ``rules`` make of ``envelopes`` (replayed in seq order), with their virtual times; ``hours``:
    the store's opening hours (the store config's), for the rules that count open time; ``location``: the
    store's geofence, for the attendance rules."""
    now = [0.0]
    clock = RuleClock(lambda: True, lambda: now[0], lambda: now[0])
    engine = RuleEngine(list(rules), clock, wall=lambda: now[0], hours=hours, location=location)
    pipeline = Pipeline([engine])
    conn = sqlite3.connect(":memory:", isolation_level=None)
    outcomes: list[Outcome] = []
    seq = [0]

    def append(derived: Sequence[Derived]) -> list[Event]:
        events = []
        for d in derived:
            seq[0] += 1
            events.append(Event(seq[0], d.kind, d.device_id, d.data_json, d.model))
            outcomes.append(_outcome(now[0], d.model))
        return events

    def commit(work: Any) -> None:
        conn.execute("BEGIN")
        work()
        conn.execute("COMMIT")
        pipeline.committed()

    def advance(to: float) -> None:
        while engine.earliest <= to:
            now[0] = max(now[0], engine.earliest)
            commit(lambda: pipeline.tick(conn, now[0], append))
        now[0] = max(now[0], to)

    ordered = sorted(envelopes, key=lambda e: int(e["seq"]))
    gateways = {e.get("gateway_id") for e in ordered}
    if len(gateways) > 1:
        raise ValueError(
            f"events of {len(gateways)} gateways ({', '.join(sorted(map(str, gateways)))}): each has its own"
            " seqs; replay one gateway's events at a time"
        )
    if ordered:
        now[0] = _time(ordered[0])
    pipeline.setup(conn)
    for envelope in ordered:
        advance(_time(envelope))  # every event shows the time passing, the live rules' outputs too
        kind = envelope["kind"]
        if kind in OUTPUTS or kind not in PAYLOADS:
            continue
        seq[0] = max(seq[0], int(envelope["seq"]))
        data = envelope["data"]
        try:
            model = PAYLOADS[kind].model_validate(data)
        except ValueError as err:
            raise ValueError(f"seq {envelope['seq']} ({kind}) is not a valid event: {err}") from err
        event = Event(int(envelope["seq"]), kind, envelope.get("device_id"), orjson.dumps(data), model)
        commit(lambda event=event: pipeline.run(conn, [event], append))
    conn.close()
    return outcomes


def difference(a: list[Outcome], b: list[Outcome]) -> list[str]:
    """Lines only in ``a`` ("-") or only in ``b`` ("+"), in time order."""
    left = {o.line() for o in a}
    right = {o.line() for o in b}
    out = [("-", o) for o in a if o.line() not in right] + [("+", o) for o in b if o.line() not in left]
    out.sort(key=lambda pair: (pair[1].at, pair[0]))
    return [f"{sign} {o.line()}" for sign, o in out]


def _time(envelope: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(envelope["recorded_at"]).replace("Z", "+00:00")).timestamp()


def _outcome(at: float, model: Any) -> Outcome:
    if isinstance(model, AlertRaised):
        return Outcome(at, "alert.raised", str(model.details.get("alert_id")), model.message)
    if isinstance(model, AlertCleared):
        return Outcome(at, "alert.cleared", model.alert_id, model.message)
    if isinstance(model, AlertEscalated):
        return Outcome(at, "alert.escalated", model.alert_id, model.message)
    if isinstance(model, AlertAcknowledged):
        return Outcome(at, "alert.acknowledged", model.alert_id, model.note)
    if isinstance(model, AttendanceDaily):
        flagged = sum(1 for e in model.employees if e.flags)
        return Outcome(
            at,
            "attendance.daily",
            f"{model.rule_id}/{model.date}",
            f"{len(model.employees)} employee(s), {flagged} with flags",
        )
    if isinstance(model, StockReplenishmentDraft):
        return Outcome(at, "stock.replenishment_draft", model.draft_id, f"order {model.quantity} {model.sku}")
    return Outcome(at, type(model).__name__, "", "")
