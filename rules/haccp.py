"""The HACCP temperature log: each fridge's readings folded into fixed intervals, and its excursions with their
corrective actions, kept in the journal's file apart from the outbox (docs/HACCP.md).

A pipeline processor after the rule engine: it sees every committed event in seq order, with its commit's
wall-clock time, and writes in the same transaction. ``sensor.sample`` events that carry a ``temperature`` (or
the metric of the temperature rule watching the device) are folded into one row per device and interval (min,
max, last, count), so a fridge costs 96 rows a day at 15 min whatever its reading rate; a temperature rule's
``alert.raised`` and ``alert.cleared`` and the ``alert.acknowledged`` that names it make an excursion row.
Outbox eviction and TTL delete ``events`` rows only: this log stays for ``haccp.retention_days`` (400 at least),
then it is pruned.

Each row keeps the seq of the last event folded into it, and an event at or below it is not folded again, so
feeding events twice (a restart that replays them) never counts a reading twice.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

import orjson
from pydantic import Field, field_validator

from gateway.kernel.events import AlertAcknowledged, AlertCleared, AlertRaised, SensorSample
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Emit, Event, Processor
from gateway.kernel.rule_config import RuleDefinition, TemperatureRule

_LOGGER = logging.getLogger(__name__)

METRIC: Final = "temperature"
"""The value logged: a device whose ``sensor.sample`` carries it (or names it in ``faults``) is a fridge here."""
DEFROST_METRIC: Final = "defrost_active"
"""1 while the controller defrosts: the reading is logged, and its interval flagged."""
MIN_RETENTION_DAYS: Final = 400
PRUNE_EVERY_S: Final = 3600.0
"""How often (in the events' time) rows past the retention are deleted."""
LAST_TIME: Final = 32_503_680_000.0
"""Year 3000: a time past it in an alert's details is no time."""
MAX_DEVICES: Final = 10_000
"""Devices whose metric is remembered (more are worked out at each reading)."""
MAX_ACKS: Final = 20
"""Acknowledgements kept per excursion (the latest ones)."""
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS haccp_interval(
    device_id TEXT NOT NULL,
    start INTEGER NOT NULL,
    min_c REAL,
    max_c REAL,
    last_c REAL,
    last_at REAL,
    readings INTEGER NOT NULL,
    defrost INTEGER NOT NULL,
    faults INTEGER NOT NULL,
    unsynced INTEGER NOT NULL,
    source TEXT,
    last_seq INTEGER NOT NULL,
    seconds INTEGER NOT NULL,
    PRIMARY KEY (device_id, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS haccp_interval_start ON haccp_interval(start);
CREATE TABLE IF NOT EXISTS haccp_excursion(
    alert_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    rule_id TEXT,
    limit_c REAL,
    start REAL NOT NULL,
    raised_at REAL NOT NULL,
    cleared_at REAL,
    max_c REAL,
    reason TEXT,
    acks TEXT NOT NULL,
    clock_synced INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS haccp_excursion_device ON haccp_excursion(device_id, start);
"""


class HaccpConfig(StrictModel):
    """The HACCP temperature log (docs/HACCP.md)."""

    interval_s: Annotated[int, Field(ge=60, le=900)] = Field(
        default=900,
        description="Readings are summarised per interval of this many seconds (min, max, last); it divides 900"
        " so intervals start on the quarter hours of every timezone.",
    )
    retention_days: Annotated[int, Field(ge=MIN_RETENTION_DAYS, le=3650)] = Field(
        default=MIN_RETENTION_DAYS,
        description="How long the log is kept, in days (400 at least), whatever the outbox evicts.",
    )

    @field_validator("interval_s")
    @classmethod
    def _quarter_hours(cls, value: int) -> int:
        if 900 % value:
            raise ValueError("must divide 900 (for example 60, 300, 450 or 900)")
        return value


@dataclass(slots=True)
class Interval:
    """One device's readings in one interval: a row of ``haccp_interval``."""

    device_id: str
    start: int
    min_c: float | None = None
    max_c: float | None = None
    last_c: float | None = None
    last_at: float | None = None
    readings: int = 0
    defrost: int = 0
    faults: int = 0
    unsynced: int = 0
    """Readings (or faults) stamped by a clock not synchronised: their time may be wrong."""
    source: str | None = None
    last_seq: int = 0
    seconds: int = 900
    """The interval's length (``haccp.interval_s`` when it was written)."""

    def row(self) -> tuple[Any, ...]:
        return (
            self.device_id,
            self.start,
            self.min_c,
            self.max_c,
            self.last_c,
            self.last_at,
            self.readings,
            self.defrost,
            self.faults,
            self.unsynced,
            self.source,
            self.last_seq,
            self.seconds,
        )


@dataclass(frozen=True, slots=True)
class _Sample:
    seq: int
    device_id: str
    at: float
    value: float | None
    """None: the probe was reported faulty."""
    defrost: bool
    source: str | None
    synced: bool


@dataclass(frozen=True, slots=True)
class _Alert:
    seq: int
    at: float
    synced: bool
    model: AlertRaised | AlertCleared | AlertAcknowledged
    device_id: str | None


def watching_rule(
    rules: Mapping[str, RuleDefinition], device: str, source: str | None = None
) -> TemperatureRule | None:
    """The temperature rule that speaks for a fridge (its readings' format ``source``): the first naming it in
    ``select.devices``, else the first for every device, among those whose ``select.sources`` take that format
    (its metric is what the log reads, its defrost and door metrics what the page shows)."""
    watching = [
        r
        for r in rules.values()
        if isinstance(r, TemperatureRule) and (not r.select.sources or source in r.select.sources)
    ]
    named = [r for r in watching if device in r.select.devices]
    every = [r for r in watching if not r.select.devices]
    found = named or every
    return found[0] if found else None


class HaccpLog(Processor):
    """Folds temperature readings and temperature excursions into the HACCP log's tables."""

    name = "haccp"

    def __init__(
        self,
        config: HaccpConfig | None = None,
        rules: Callable[[], Mapping[str, RuleDefinition]] | None = None,
    ) -> None:
        """``rules``: the rules in force (the engine's, by id): a fridge a ``temperature`` rule watches is logged by
        that rule's metric (a Modbus controller's ``air_temperature``); any other by ``temperature``."""
        self.config = config or HaccpConfig()
        self._rules = rules
        self._rules_seen: Mapping[str, RuleDefinition] | None = None
        self._metrics: dict[tuple[str, str | None], str] = {}
        """(Device, format) -> the metric its readings are logged by, worked out once per rule set."""
        self._pending: list[_Sample | _Alert] = []
        """What ``apply`` took since the last flush, in seq order (apply does no SQL)."""
        self._current: dict[str, Interval] = {}
        """Each device's latest interval as written in this transaction or read back: spares a read a sample."""
        self._next_prune = -math.inf

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)

    def apply(self, event: Event) -> None:
        kind = event.kind
        if kind == "sensor.sample":
            self._take_sample(event)
        elif kind in ("alert.raised", "alert.cleared", "alert.acknowledged"):
            model = _model(event)
            if (
                isinstance(model, AlertRaised | AlertCleared | AlertAcknowledged)
                and event.recorded_at is not None
            ):
                self._pending.append(
                    _Alert(event.seq, event.recorded_at, event.clock_synced, model, event.device_id)
                )

    def _metric(self, device: str, source: str | None) -> str:
        rules = self._rules() if self._rules is not None else None
        if rules is not self._rules_seen:  # the engine read its rules again (a new dict): work them out again
            self._rules_seen, self._metrics = rules, {}
        found = self._metrics.get((device, source))
        if found is None:
            rule = watching_rule(rules or {}, device, source)
            found = rule.metric if rule is not None else METRIC
            if len(self._metrics) < MAX_DEVICES:
                self._metrics[device, source] = found
        return found

    def _take_sample(self, event: Event) -> None:
        # A reading's time is the gateway's clock at its commit. While that clock is not synchronised (a box
        # without a real-time clock, before NTP; NTP blocked) the reading is placed by it all the same, and
        # counted as such: the log shows it, flagged, rather than a gap.
        if event.device_id is None or event.recorded_at is None:
            return
        sample = _model(event)
        if not isinstance(sample, SensorSample):
            return
        metric = self._metric(event.device_id, sample.source)
        if metric not in sample.values and metric not in sample.faults:
            metric = METRIC  # the rule's metric is not among these readings: a probe that says 'temperature'
        value = sample.values.get(metric)
        if value is None and metric not in sample.faults:
            return  # not a device that measures a temperature
        if value is not None and not math.isfinite(value):
            value = None  # a value no probe reads: a fault
        defrost = sample.values.get(DEFROST_METRIC, 0.0) >= 0.5
        self._pending.append(
            _Sample(
                event.seq,
                event.device_id,
                event.recorded_at,
                value,
                defrost,
                sample.source,
                event.clock_synced,
            )
        )

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        pending, self._pending = self._pending, []
        dirty: dict[tuple[str, int], Interval] = {}
        newest = -math.inf
        for item in pending:
            if isinstance(item, _Sample):
                interval = self._fold(conn, item)
                if interval is not None:
                    dirty[(interval.device_id, interval.start)] = interval
            else:
                self._excursion(conn, item)
            if item.synced:  # only a synchronised clock says which rows are past the retention
                newest = max(newest, item.at)
        if dirty:
            conn.executemany(
                "INSERT OR REPLACE INTO haccp_interval VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [interval.row() for interval in dirty.values()],
            )
        if newest > -math.inf and newest >= self._next_prune:
            self._prune(conn, newest)
        return ()

    def rollback(self, conn: sqlite3.Connection) -> None:
        self._forget()

    def reload(self, conn: sqlite3.Connection) -> None:
        self._forget()

    def _forget(self) -> None:
        self._pending = []
        self._current = {}

    # --- intervals ---------------------------------------------------------------------------------------

    def _fold(self, conn: sqlite3.Connection, sample: _Sample) -> Interval | None:
        size = self.config.interval_s
        start = int(sample.at // size) * size
        interval = self._current.get(sample.device_id)
        if interval is None or interval.start != start:
            interval = _read_interval(conn, sample.device_id, start, size)
            self._current[sample.device_id] = interval
        if sample.seq <= interval.last_seq:
            return None  # folded before (events fed again)
        interval.last_seq = sample.seq
        interval.source = sample.source or interval.source
        if not sample.synced:
            interval.unsynced += 1
        value = sample.value
        if value is None:
            interval.faults += 1
            return interval
        interval.readings += 1
        interval.min_c = value if interval.min_c is None else min(interval.min_c, value)
        interval.max_c = value if interval.max_c is None else max(interval.max_c, value)
        interval.last_c, interval.last_at = value, sample.at
        if sample.defrost:
            interval.defrost += 1
        return interval

    # --- excursions --------------------------------------------------------------------------------------

    def _excursion(self, conn: sqlite3.Connection, alert: _Alert) -> None:
        model = alert.model
        if isinstance(model, AlertRaised):
            if model.rule != "temperature" or alert.device_id is None:
                return
            details = model.details
            alert_id = details.get("alert_id")
            if not isinstance(alert_id, str) or not alert_id:
                return
            if conn.execute("SELECT 1 FROM haccp_excursion WHERE alert_id=?", (alert_id,)).fetchone():
                return  # raised before (events fed again)
            for_s = _number(details.get("for_s")) or 0.0
            due = _timestamp(details.get("due_at"))
            start = (due if due is not None else alert.at) - for_s
            conn.execute(
                "INSERT INTO haccp_excursion VALUES (?,?,?,?,?,?,NULL,?,NULL,'[]',?,?)",
                (
                    alert_id,
                    alert.device_id,
                    _text(details.get("rule_id")),
                    _number(details.get("limit_c")),
                    start,
                    alert.at,
                    _number(details.get("max_c")),
                    int(alert.synced),
                    alert.seq,
                ),
            )
            return
        found = conn.execute(
            "SELECT max_c, acks, last_seq FROM haccp_excursion WHERE alert_id=?", (model.alert_id,)
        ).fetchone()
        if found is None or alert.seq <= found[2]:
            return  # not a temperature excursion, or taken before
        if isinstance(model, AlertCleared):
            peak = _number(model.details.get("max_c"))
            if peak is not None and found[0] is not None:
                peak = max(peak, found[0])
            conn.execute(
                "UPDATE haccp_excursion SET cleared_at=?, reason=?, max_c=coalesce(?, max_c), last_seq=?"
                " WHERE alert_id=?",
                (alert.at, model.reason, peak, alert.seq, model.alert_id),
            )
            return
        acks = _acks(found[1])
        acks.append(
            {
                "at": alert.at,
                "note": model.note,
                "role": model.role,
                "via": model.via,
                "by": model.by,
                "seq": alert.seq,
            }
        )
        conn.execute(
            "UPDATE haccp_excursion SET acks=?, last_seq=? WHERE alert_id=?",
            (orjson.dumps(acks[-MAX_ACKS:]).decode(), alert.seq, model.alert_id),
        )

    # --- retention ---------------------------------------------------------------------------------------

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        cutoff = now - self.config.retention_days * 86400
        gone = conn.execute("DELETE FROM haccp_interval WHERE start < ?", (cutoff,)).rowcount
        gone += conn.execute(
            "DELETE FROM haccp_excursion WHERE cleared_at IS NOT NULL AND cleared_at < ?", (cutoff,)
        ).rowcount
        if gone:
            _LOGGER.info("haccp: %d row(s) older than %d days pruned", gone, self.config.retention_days)
        self._current = {d: i for d, i in self._current.items() if i.start >= cutoff}
        self._next_prune = now + PRUNE_EVERY_S


def _model(event: Event) -> object:
    """The event's payload model; None for a payload that does not validate (it says nothing to the log)."""
    try:
        return event.model
    except ValueError:
        return None


def _read_interval(conn: sqlite3.Connection, device_id: str, start: int, seconds: int) -> Interval:
    row = conn.execute(
        "SELECT min_c, max_c, last_c, last_at, readings, defrost, faults, unsynced, source, last_seq, seconds"
        " FROM haccp_interval"
        " WHERE device_id=? AND start=?",
        (device_id, start),
    ).fetchone()
    if row is None:
        return Interval(device_id, start, seconds=seconds)
    min_c, max_c, last_c, last_at, readings, defrost, faults, unsynced, source, last_seq, stored = row
    return Interval(
        device_id,
        start,
        min_c,
        max_c,
        last_c,
        last_at,
        readings,
        defrost,
        faults,
        unsynced,
        source,
        last_seq,
        int(stored),  # the row's own length (the configured one may have changed since)
    )


def _number(value: object) -> float | None:
    """A finite number of an alert's details, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past any float
        return None
    return number if math.isfinite(number) else None


def _text(value: object) -> str | None:
    return value[:64] if isinstance(value, str) else None


def _timestamp(value: object) -> float | None:
    """An ISO 8601 UTC time (an alert's ``due_at``) as Unix seconds; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
        at = moment.timestamp() if moment.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None
    return at if at is not None and 0 <= at < LAST_TIME else None


def _acks(text: object) -> list[dict[str, Any]]:
    try:
        found = orjson.loads(text) if isinstance(text, str | bytes) else []
    except orjson.JSONDecodeError:
        return []
    return [a for a in found if isinstance(a, dict)] if isinstance(found, list) else []
