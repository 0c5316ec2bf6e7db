"""``report.daily``: one summary of each store-local day for HQ, made at ``report.at`` the day after
(docs/REPORTS.md).

A pipeline processor after the rule engine and the HACCP log. It sees every committed event (seq order): from
those committed by a synchronised clock, and from its ticks, it records in ``report_state`` the first seq of each
store-local day (the journal's seq when a synchronised clock first read that day): a day's events are the seqs
from its start to the next day's, whatever ``recorded_at`` an unsynchronised clock gave them. At its tick, once
the next day has started and the report time of the day after the last one reported has passed, it reads that day
from the journal's tables in the writer's transaction, aggregating in SQL, and emits one ``report.daily``; the
day is written as the last one reported in ``report_state`` in the same transaction, so a day is reported exactly
once whatever crashes and restarts happen. A day whose report time passed while the gateway was down is reported
at its next start, one day per tick, oldest first (at most :data:`MAX_CATCH_UP_DAYS` back).

It reads tables other modules own, by SQL, and tolerates any of them missing: ``events`` (the journal), ``stock``
(the stock ledger, :mod:`gateway.ledger.stock`: its ``low`` flags), ``rule_state`` (the replenishment rules' open
drafts), ``haccp_interval`` and ``haccp_excursion`` (:mod:`rules.haccp`) and ``outbox_state``. A section that
fails (a changed table, a value it cannot read) is left empty and named in ``problems``; the report is made all
the same. A SQLite error other than malformed JSON (the disk, a corrupt file) fails the commit, as in every
processor, and the report is tried again.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_time
from decimal import Decimal
from typing import Annotated, Any, Final
from zoneinfo import ZoneInfo

import orjson
from pydantic import Field

from gateway.kernel.events import (
    ReportAlerts,
    ReportAttendance,
    ReportDaily,
    ReportDevice,
    ReportDraft,
    ReportExcursion,
    ReportFridge,
    ReportLowStock,
    ReportMoney,
    ReportOutboxClass,
    ReportSku,
)
from gateway.kernel.model import StrictModel
from gateway.kernel.outbox import CLASSES, of_class
from gateway.kernel.pipeline import Emit, Event, Processor
from gateway.kernel.rule_config import STOCK_LOW_ID, RuleDefinition, TemperatureRule

_LOGGER = logging.getLogger(__name__)

MAX_CATCH_UP_DAYS: Final = 31
"""After a long downtime, at most this many past days are reported (the older ones are skipped, logged)."""
UNSYNCED_RECHECK_S: Final = 60.0
"""While the wall clock is not synchronised no day is reported; it looks again this often."""
TICK_AHEAD_S: Final = 3600.0
"""A synchronised clock's reading (a tick's, a committed event's) starts a day only if it agrees within this with
the readings before it, less the monotonic time since; the first after a start is trusted. A clock that steps
ahead (or back) while the gateway runs starts no day, unless the step holds :data:`SETTLE_S`."""
SETTLE_S: Final = 1800.0
RETRY_S: Final = 600.0
"""A report that failed (a bug) is tried again this much later."""
MAX_FAILURES: Final = 3
"""After this many failed attempts a day gets a report with empty sections and the error in ``problems``, so
the days after it are not held up."""
MAX_ABS: Final = 1e10
"""Amounts and quantities beyond this (a damaged row) are left out."""
LATE_S: Final = 3600.0
"""A report made this long after its time is ``late`` (the gateway was down, or its clock unsynchronised)."""
KEEP_DAYS: Final = 92
"""Reports kept in ``report_daily`` for ``GET /api/reports/daily``."""
MAX_IDS: Final = 20
MAX_LIST: Final = 500
MAX_FRIDGES: Final = 500
MAX_DEVICES: Final = 1000
MAX_EXCURSIONS: Final = 100
UP: Final = ("online", "rate_limited")
STATE_KEY: Final = "last_day"
MARK_KEY: Final = "mark"
"""``report_state``: the newest store-local day a synchronised clock read (an event's commit, a tick)."""
START_KEY: Final = "start:"
"""``report_state``: ``start:<date>`` -> the first seq of that store-local day."""
KEEP_STARTS: Final = MAX_CATCH_UP_DAYS + 3
UNSYNCED: Final = b'"clock_synced":false'
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS report_state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS report_daily(day TEXT PRIMARY KEY, made_at REAL NOT NULL, body BLOB NOT NULL);
"""


class ReportConfig(StrictModel):
    """The daily report for HQ (docs/REPORTS.md)."""

    enabled: bool = Field(default=True, description="Make a report.daily for each store-local day.")
    at: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")] = Field(
        default="02:00",
        description="Store-local time (HH:MM) the day before is reported at, the day after it; a time a DST"
        " change skips is taken as the wall clock reads it after the change.",
    )
    top_skus: Annotated[int, Field(ge=0, le=100)] = Field(
        default=10, description="How many best-selling SKUs (by units sold) the report lists."
    )


@dataclass(frozen=True, slots=True)
class Day:
    """A store-local day: its date, and the Unix times it starts and ends (23, 24 or 25 hours apart)."""

    day: date
    start: float
    end: float

    @classmethod
    def of(cls, day: date, zone: ZoneInfo) -> Day:
        start = datetime.combine(day, day_time(0), zone).timestamp()
        end = datetime.combine(day + timedelta(days=1), day_time(0), zone).timestamp()
        return cls(day, start, end)


class DailyReport(Processor):
    """Makes each day's ``report.daily`` once, in the writer's transaction (see the module's docstring)."""

    name = "report"

    def __init__(
        self,
        config: ReportConfig,
        timezone: str,
        *,
        synced: Callable[[], bool] = lambda: True,
        rules: Callable[[], Sequence[RuleDefinition]] = list,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.zone = ZoneInfo(timezone)
        self.timezone = timezone
        self._synced = synced
        self._rules = rules
        """The rules in force (the temperature rules' limits, the rule types of acknowledged alerts)."""
        self._wall = wall
        self._monotonic = monotonic
        self._offset: float | None = None
        """The synchronised wall clock less the monotonic one, as last trusted in this process."""
        self._step: tuple[float, float] | None = None
        """A new offset not trusted yet, and the monotonic time it was first seen."""
        self._last: date | None = None
        """The last day reported, as committed; None: not yet known (the clock was never synchronised)."""
        self._due = 0.0
        """The wall-clock time the next tick has something to do."""
        self._mark: date | None = None
        """The newest store-local day a synchronised clock read (committed events, ticks)."""
        self._starts: dict[date, int] = {}
        """Days started since the last write: their first seq."""
        self._dirty = False
        self._failures: dict[date, int] = {}
        self._warned_behind: date | None = None
        self._mark_end_of: tuple[date | None, float] = (None, 0.0)

    # --- the processor -------------------------------------------------------------------------------------

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
        self._load(conn)

    def rollback(self, conn: sqlite3.Connection) -> None:
        self._load(conn)

    def reload(self, conn: sqlite3.Connection) -> None:
        self._load(conn)

    @property
    def wants_ticks(self) -> bool:  # type: ignore[override]
        if not self.config.enabled:
            return False
        wall = self._wall()
        return wall >= self._due or wall >= self._mark_end

    @property
    def _mark_end(self) -> float:
        """When the newest day seen ends (a tick then starts the next one)."""
        if self._mark is None:
            return math.inf  # the next tick due (_due) sees the first day
        if self._mark_end_of[0] != self._mark:
            self._mark_end_of = (self._mark, Day.of(self._mark, self.zone).end)
        return self._mark_end_of[1]

    def apply(self, event: Event) -> None:
        if (
            event.clock_synced
            and event.recorded_at is not None
            and self.config.enabled
            and self._trusted(event.recorded_at)
        ):
            self._observe(event.recorded_at, event.seq)

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        self._write_marks(conn)
        return ()

    def _observe(self, at: float, seq: int) -> None:
        """A synchronised clock read ``at`` when ``seq`` was the next seq: the days it starts begin at ``seq``."""
        try:
            day = datetime.fromtimestamp(at, self.zone).date()
        except (OverflowError, ValueError, OSError):
            return
        if self._mark is None or day > self._mark:
            first = day - timedelta(days=KEEP_STARTS)
            begin = first if self._mark is None or self._mark < first else self._mark + timedelta(days=1)
            if self._mark is not None:  # the first day seen (a new journal, a lost state) starts unknown
                while begin <= day:
                    self._starts[begin] = seq
                    begin += timedelta(days=1)
            self._mark = day
            self._dirty = True

    def _trusted(self, wall: float) -> bool:
        """Whether a synchronised clock's reading may start a day: it agrees, within :data:`TICK_AHEAD_S`, with
        the readings before it (wall-clock time less monotonic time), or a new offset has held for
        :data:`SETTLE_S` (the clock was corrected). The first reading after a start is trusted."""
        mono = self._monotonic()
        offset = wall - mono
        if self._offset is None or abs(offset - self._offset) <= TICK_AHEAD_S:
            self._offset, self._step = offset, None
            return True
        if self._step is None or abs(offset - self._step[0]) > TICK_AHEAD_S:
            _LOGGER.warning(
                "report: the synchronised clock stepped by %.0f s; no day is started by it unless it holds %.0f s",
                offset - self._offset,
                SETTLE_S,
            )
            self._step = (offset, mono)
            return False
        if mono - self._step[1] >= SETTLE_S:
            _LOGGER.warning("report: the clock's step held %.0f s: taken as a correction", SETTLE_S)
            self._offset, self._step = offset, None
            return True
        return False

    def _write_marks(self, conn: sqlite3.Connection) -> None:
        if not self._dirty or self._mark is None:
            return
        conn.executemany(
            "INSERT OR REPLACE INTO report_state VALUES (?, ?)",
            [(START_KEY + d.isoformat(), str(seq)) for d, seq in self._starts.items()],
        )
        conn.execute("INSERT OR REPLACE INTO report_state VALUES (?, ?)", (MARK_KEY, self._mark.isoformat()))
        oldest = self._mark - timedelta(days=KEEP_STARTS)
        conn.execute(
            "DELETE FROM report_state WHERE key >= ? AND key < ?", (START_KEY, START_KEY + oldest.isoformat())
        )
        self._starts.clear()
        self._dirty = False

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        if not self.config.enabled:
            return ()
        if self._synced():
            if not self._trusted(now):  # a clock that just stepped: nothing until it holds or comes back
                return ()
            self._observe(now, _last_seq(conn) + 1)
            self._write_marks(conn)
        if now < self._due:
            return ()
        if not self._synced() or self._mark is None:
            self._due = now + UNSYNCED_RECHECK_S
            return ()
        today = datetime.fromtimestamp(now, self.zone).date()
        if self._last is None:  # the first day reported is the one the gateway first runs on
            self._save(conn, today - timedelta(days=1))
            self._due = self.report_time(today)
            return ()
        if self._mark > today + timedelta(days=1) or self._last > today + timedelta(days=1):
            if self._warned_behind != today:
                _LOGGER.error(
                    "report: the clock reads %s but the journal has events of %s (and days up to %s reported)"
                    " by a synchronised clock: one of them was wrong; no day is reported until the clock"
                    " reads %s (docs/REPORTS.md)",
                    today,
                    self._mark,
                    self._last,
                    max(self._mark, self._last),
                )
                self._warned_behind = today
            self._due = now + UNSYNCED_RECHECK_S
            return ()
        day = self._last + timedelta(days=1)
        oldest = self._mark - timedelta(days=MAX_CATCH_UP_DAYS)
        if day < oldest:
            _LOGGER.warning("report: days %s to %s were never reported (too long ago)", day, oldest)
            day = oldest
        due = self.report_time(day)
        if now < due or day >= self._mark:  # not its time, or the next day has not started in the journal
            self._due = due if now < due else now + UNSYNCED_RECHECK_S
            return ()
        report: ReportDaily | None
        try:
            report = self.build(conn, day, now)
        except sqlite3.Error as err:
            if not _json_error(err):
                raise  # the disk or the file: the commit fails, and the tick is tried again
            report = self._failed(day, now, err)
        except Exception as err:  # a bug: tried again later, and after MAX_FAILURES made with empty sections
            report = self._failed(day, now, err)
        if report is None:
            self._due = now + RETRY_S
            return ()
        self._failures.pop(day, None)
        body = orjson.dumps(report.model_dump(mode="json", by_alias=True))
        conn.execute("INSERT OR REPLACE INTO report_daily VALUES (?,?,?)", (day.isoformat(), now, body))
        conn.execute(  # the newest KEEP_DAYS copies (by count: a clock ahead does not purge the real days)
            "DELETE FROM report_daily WHERE day NOT IN (SELECT day FROM report_daily ORDER BY day DESC LIMIT ?)",
            (KEEP_DAYS,),
        )
        self._save(conn, day)
        self._due = min(now, self.report_time(day + timedelta(days=1)))  # a missed day after it: next tick
        if report.late:
            _LOGGER.info("report: %s reported late (its time passed while the gateway was down)", day)
        return [Emit(report)]

    def _failed(self, day: date, now: float, err: Exception) -> ReportDaily | None:
        """The report of ``day`` failed: None (try again later), or after :data:`MAX_FAILURES` attempts the
        report with empty sections and the error in ``problems``."""
        count = self._failures[day] = self._failures.get(day, 0) + 1
        if count < MAX_FAILURES:
            _LOGGER.error(
                "report: the report of %s failed; trying again in %.0f s", day, RETRY_S, exc_info=err
            )
            return None
        _LOGGER.error(
            "report: the report of %s failed %d times; reported with empty sections", day, count, exc_info=err
        )
        span = Day.of(day, self.zone)
        return ReportDaily(
            date=day.isoformat(),
            timezone=self.timezone,
            day_start=datetime.fromtimestamp(span.start, self.zone),
            day_end=datetime.fromtimestamp(span.end, self.zone),
            late=now - self.report_time(day) > LATE_S,
            sales=[],
            returns=[],
            returns_ratio=None,
            top_skus=[],
            low_stock=[],
            low_stock_total=0,
            open_drafts=[],
            open_drafts_total=0,
            alerts=[],
            fridges=[],
            attendance=[],
            devices=[],
            outbox=[],
            problems=[f"report: {type(err).__name__}: {err}"[:300]],
        )

    def _save(self, conn: sqlite3.Connection, day: date) -> None:
        conn.execute("INSERT OR REPLACE INTO report_state VALUES (?, ?)", (STATE_KEY, day.isoformat()))
        self._last = day

    def _load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM report_state WHERE key=?", (STATE_KEY,)).fetchone()
        try:
            self._last = date.fromisoformat(row[0]) if row is not None else None
        except (TypeError, ValueError):
            _LOGGER.error("report: the last day reported (%r) is not a date", row[0])
            self._last = None
        if self._last is None:
            self._last = _newest_reported(conn)
            if self._last is not None:
                _LOGGER.warning(
                    "report: no last day reported in report_state; the newest report is of %s", self._last
                )
        row = conn.execute("SELECT value FROM report_state WHERE key=?", (MARK_KEY,)).fetchone()
        try:
            self._mark = date.fromisoformat(row[0]) if row is not None else None
        except (TypeError, ValueError):
            _LOGGER.error("report: the newest day seen (%r) is not a date", row[0])
            self._mark = None
        self._starts.clear()
        self._dirty = False
        self._due = 0.0  # the next tick looks (a missed day is reported at start)

    def report_time(self, day: date) -> float:
        """When ``day`` is reported: ``report.at`` on the day after it (never before the day has ended)."""
        hours, minutes = (int(x) for x in self.config.at.split(":"))
        after = day + timedelta(days=1)
        at = datetime(after.year, after.month, after.day, hours, minutes, tzinfo=self.zone).timestamp()
        return max(at, Day.of(day, self.zone).end)

    # --- the report ----------------------------------------------------------------------------------------

    def build(self, conn: sqlite3.Connection, day: date, now: float) -> ReportDaily:
        """The report of ``day`` from the tables as they are in ``conn`` (it only reads)."""
        span = Day.of(day, self.zone)
        problems: list[str] = []
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rules = list(self._rules())
        seqs = _seq_range(conn, span) if "events" in tables else None

        def section(name: str, work: Callable[[], Any], empty: Any) -> Any:
            try:
                return work()
            except (sqlite3.Error, ValueError, TypeError, ArithmeticError) as err:
                if isinstance(err, sqlite3.Error) and not _json_error(err):
                    raise
                _LOGGER.exception("report: %s of %s could not be read", name, day)
                problems.append(f"{name}: {err}"[:300])
                return empty

        sales = section("sales", lambda: _money(conn, "pos.sale", span, seqs), [])
        returns = section("returns", lambda: _money(conn, "pos.return", span, seqs), [])
        top = section("top_skus", lambda: _top_skus(conn, span, seqs, self.config.top_skus), [])
        low, low_total = section("low_stock", lambda: _low_stock(conn, tables), ([], 0))
        drafts, drafts_total = section("open_drafts", lambda: _open_drafts(conn, tables), ([], 0))
        alerts = section("alerts", lambda: _alerts(conn, span, seqs, rules), [])
        fridges = section("fridges", lambda: _fridges(conn, tables, span, rules, now), [])
        attendance = section("attendance", lambda: _attendance(conn, tables, day), [])
        devices = section("devices", lambda: _devices(conn, span, seqs, problems), [])
        outbox = section("outbox", lambda: _outbox(conn, tables), [])
        sold = sum(m.count for m in sales)

        def local(at: float) -> datetime:
            return datetime.fromtimestamp(at, self.zone)

        return ReportDaily(
            date=day.isoformat(),
            timezone=self.timezone,
            day_start=local(span.start),
            day_end=local(span.end),
            late=now - self.report_time(day) > LATE_S,
            sales=sales,
            returns=returns,
            returns_ratio=round(sum(m.count for m in returns) / sold, 4) if sold else None,
            top_skus=top,
            low_stock=low,
            low_stock_total=low_total,
            open_drafts=drafts,
            open_drafts_total=drafts_total,
            alerts=alerts,
            fridges=fridges,
            attendance=attendance,
            devices=devices,
            outbox=outbox,
            problems=problems[:20],
        )


# --- the events of the day -----------------------------------------------------------------------------------


def _iso(at: float) -> str:
    """``recorded_at`` as the journal writes it: UTC, milliseconds, 'Z' (text that sorts as time does)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Window:
    """The seqs of a day's events: from the day's first seq to the next day's, as :class:`DailyReport` recorded
    them; a bound not known (the first day, a lost state) is taken from ``recorded_at`` on that side."""

    lo: int | None
    hi: int | None
    span: Day

    def args(self) -> tuple[Any, ...]:
        """seq from, seq to, recorded_at from, recorded_at before (the day's events, by seq where known)."""
        return (
            self.lo if self.lo is not None else 1,
            self.hi if self.hi is not None else 2**62,
            _iso(self.span.start) if self.lo is None else "",
            _iso(self.span.end) if self.hi is None else "~",
        )


def _start_seq(conn: sqlite3.Connection, day: date) -> int | None:
    row = conn.execute(
        "SELECT value FROM report_state WHERE key=?", (START_KEY + day.isoformat(),)
    ).fetchone()
    try:
        return int(row[0]) if row is not None else None
    except (TypeError, ValueError):
        return None


def _seq_range(conn: sqlite3.Connection, span: Day) -> Window:
    """The day's window of seqs (see :class:`Window`)."""
    lo = _start_seq(conn, span.day)
    after = _start_seq(conn, span.day + timedelta(days=1))
    return Window(lo, after - 1 if after is not None else None, span)


def _last_seq(conn: sqlite3.Connection) -> int:
    try:
        (top,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
    except sqlite3.OperationalError:  # no journal table (a test's bare file)
        return 0
    return int(top)


def _json_error(err: sqlite3.Error) -> bool:
    """A row's body is not JSON (a damaged row): the section fails, not the commit."""
    return "JSON" in str(err)


def _newest_reported(conn: sqlite3.Connection) -> date | None:
    """The newest day with a report (``report_daily``, or a ``report.daily`` event): where to go on from when
    ``report_state`` lost its row."""
    found: list[date] = []
    for sql in (
        "SELECT MAX(day) FROM report_daily",
        "SELECT json_extract(CAST(body AS TEXT), '$.data.date') FROM events WHERE kind='report.daily' AND cls < 3"
        " AND json_valid(CAST(body AS TEXT)) ORDER BY seq DESC LIMIT 1",
    ):
        try:
            row = conn.execute(sql).fetchone()
            if row is not None and row[0] is not None:
                found.append(date.fromisoformat(str(row[0])))
        except (sqlite3.OperationalError, ValueError):  # no such table; not a date
            continue
    return max(found, default=None)


_DAY_EVENTS: Final = (
    "SELECT seq, CAST(body AS TEXT) AS b FROM events"
    " WHERE kind=? AND cls < 3 AND seq BETWEEN ? AND ? AND recorded_at>=? AND recorded_at<?"
    " AND instr(body, '\"clock_synced\":false')=0"
)


def _day_args(kind: str, span: Day, seqs: Window | None) -> tuple[Any, ...]:
    if seqs is None:
        return (kind, 1, 0, "", "")
    return (kind, *seqs.args())


def _money(conn: sqlite3.Connection, kind: str, span: Day, seqs: Window | None) -> list[ReportMoney]:
    """Receipts per currency, totals summed in thousandths (exact to 3 decimal places)."""
    if seqs is None:
        return []
    rows = conn.execute(
        f"WITH e AS ({_DAY_EVENTS}) SELECT json_extract(b, '$.data.currency') AS cur, COUNT(*),"  # noqa: S608 (constants)
        " SUM(CASE WHEN abs(t) <= ? THEN CAST(ROUND(t * 1000) AS INTEGER) END) FROM (SELECT b,"
        " CAST(json_extract(b, '$.data.totals.total') AS REAL) AS t FROM e WHERE json_valid(b))"
        " GROUP BY cur ORDER BY cur LIMIT 50",
        (*_day_args(kind, span, seqs), MAX_ABS),
    ).fetchall()
    return [
        ReportMoney(
            currency=cur[:64] if isinstance(cur, str) and cur else "?",
            count=int(n),
            amount=Decimal(int(milli or 0)) / 1000,
        )
        for cur, n, milli in rows
    ]


def _top_skus(conn: sqlite3.Connection, span: Day, seqs: Window | None, limit: int) -> list[ReportSku]:
    if limit <= 0 or seqs is None:
        return []
    rows = conn.execute(
        f"WITH e AS ({_DAY_EVENTS}), l AS (SELECT e.seq, j.value AS v FROM e, json_each(e.b, '$.data.lines') j"  # noqa: S608
        " WHERE json_valid(e.b) AND j.type='object')"
        " SELECT json_extract(v, '$.sku') AS sku, SUM(q) AS units, COUNT(DISTINCT seq) FROM"
        " (SELECT seq, v, CAST(json_extract(v, '$.quantity') AS REAL) AS q FROM l) WHERE abs(q) <= ?"
        " GROUP BY sku HAVING sku IS NOT NULL ORDER BY units DESC, sku LIMIT ?",
        (*_day_args("pos.sale", span, seqs), MAX_ABS, limit),
    ).fetchall()
    return [
        ReportSku(sku=str(sku)[:64], units=_units(units), receipts=int(n))
        for sku, units, n in rows
        if str(sku)
    ]


def _units(value: object) -> Decimal:
    """A quantity as stored (a float), to 3 decimal places and without a trailing '.0'."""
    number = _num(value)
    if number is None:
        return Decimal(0)
    units = Decimal(repr(round(number, 3)))
    return units.quantize(Decimal(1)) if units == units.to_integral_value() else units


def _num(value: object) -> float | None:
    """A number as stored, or None (text, null, infinity: what a damaged row may hold)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _alerts(
    conn: sqlite3.Connection, span: Day, seqs: Window | None, rules: Sequence[RuleDefinition]
) -> list[ReportAlerts]:
    """Per rule type, the alerts raised, cleared and acknowledged during the day (an acknowledgement's rule type
    is its rule's, by the rule id its alert id starts with: a rule in force, ``stock.low``, or the rule of an
    alert raised that day)."""
    if seqs is None:
        return []
    types: dict[str, str] = {STOCK_LOW_ID: "stock.low"}
    types.update((r.id, r.type) for r in rules)
    counts: dict[str, list[int]] = {}
    ids: dict[str, list[str]] = {}
    for column, kind, path in (
        (0, "alert.raised", "$.data.details.alert_id"),
        (1, "alert.cleared", "$.data.alert_id"),
        (2, "alert.acknowledged", "$.data.alert_id"),
    ):
        cursor = conn.execute(
            f"WITH e AS ({_DAY_EVENTS}) SELECT json_extract(b, '$.data.rule'), json_extract(b, ?) FROM e"  # noqa: S608
            " WHERE json_valid(b)",
            (*_day_args(kind, span, seqs), path),
        )
        for rule, alert_id in cursor:
            rule_id = str(alert_id).partition("/")[0]
            if rule is not None and column == 0:
                types.setdefault(rule_id, str(rule))
            name = str(rule) if rule is not None else types.get(rule_id, "unknown")
            name = name[:64] or "unknown"
            if name not in counts:
                if len(counts) >= 200:
                    continue
                counts[name] = [0, 0, 0]
            counts[name][column] += 1
            if column == 0 and isinstance(alert_id, str):
                listed = ids.setdefault(name, [])
                if len(listed) <= MAX_IDS:
                    listed.append(alert_id[:200])
    return [
        ReportAlerts(
            rule=name,
            raised=n[0],
            cleared=n[1],
            acknowledged=n[2],
            alert_ids=ids.get(name, []) if len(ids.get(name, [])) <= MAX_IDS else None,
        )
        for name, n in sorted(counts.items())
    ]


def _devices(
    conn: sqlite3.Connection, span: Day, seqs: Window | None, problems: list[str]
) -> list[ReportDevice]:
    """Each device's up time from its ``device.status`` changes: its status before the day (its last change
    before it) holds until the next change; before any, its status is unknown and the time is not counted. At
    most :data:`MAX_DEVICES` devices (the first by id; ``problems`` says when there were more)."""
    if seqs is None:
        return []
    lo, hi, after, before = seqs.args()
    start_iso = _iso(span.start)
    known: dict[str, tuple[float, bool]] = {}
    """Device -> since when (in the day) it has been in its state, and whether that state is up."""
    unsynced = " AND instr(body, '\"clock_synced\":false')=0"
    if seqs.lo is not None:  # before the day: before its first seq
        prior = conn.execute(
            "SELECT device_id, body, MAX(seq) FROM events WHERE kind='device.status' AND cls < 3 AND seq<?"  # noqa: S608
            f" AND device_id IS NOT NULL{unsynced} GROUP BY device_id ORDER BY device_id LIMIT ?",
            (lo, MAX_DEVICES + 1),
        ).fetchall()
    else:  # the day's first seq is not known: by recorded_at
        prior = conn.execute(
            "SELECT device_id, body, MAX(seq) FROM events"  # noqa: S608
            " WHERE kind='device.status' AND cls < 3 AND seq<=? AND recorded_at<?"
            f" AND device_id IS NOT NULL{unsynced} GROUP BY device_id ORDER BY device_id LIMIT ?",
            (hi, start_iso, MAX_DEVICES + 1),
        ).fetchall()
    more = len(prior) > MAX_DEVICES
    for device, body, _ in prior[:MAX_DEVICES]:
        known[str(device)] = (span.start, _status(body) in UP)
    up: dict[str, float] = dict.fromkeys(known, 0.0)
    total: dict[str, float] = dict.fromkeys(known, 0.0)
    changes: dict[str, int] = {}
    cursor = conn.execute(
        "SELECT device_id, recorded_at, body FROM events WHERE kind='device.status' AND cls < 3"  # noqa: S608
        f" AND seq BETWEEN ? AND ? AND recorded_at>=? AND recorded_at<? AND device_id IS NOT NULL{unsynced}"
        " ORDER BY seq",
        (lo, hi, after, before),
    )
    for device_id, recorded, body in cursor:
        device = str(device_id)
        if device not in known and len(known) >= MAX_DEVICES:
            more = True
            continue
        at = min(max(_parse_iso(recorded, span.start), span.start), span.end)
        if device in known:
            since, was_up = known[device]
            at = max(at, since)
            total[device] = total.get(device, 0.0) + at - since
            up[device] = up.get(device, 0.0) + (at - since if was_up else 0.0)
        known[device] = (at, _status(body) in UP)
        changes[device] = changes.get(device, 0) + 1
    if more:
        problems.append(f"devices: more than {MAX_DEVICES}; {MAX_DEVICES} listed")
    out = []
    for device, (since, is_up) in sorted(known.items()):
        seen = total.get(device, 0.0) + span.end - since
        on = up.get(device, 0.0) + (span.end - since if is_up else 0.0)
        out.append(
            ReportDevice(
                device_id=device[:64],
                minutes_known=round(seen / 60, 1),
                minutes_up=round(on / 60, 1),
                uptime_pct=round(100 * on / seen, 2) if seen > 0 else None,
                changes=changes.get(device, 0),
            )
        )
    return out


def _status(body: object) -> str | None:
    if not isinstance(body, bytes | str):
        return None
    try:
        data = orjson.loads(body).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


def _parse_iso(text: object, default: float) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


# --- the other tables ----------------------------------------------------------------------------------------


def stock_now(
    conn: sqlite3.Connection, tables: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The low-stock list and the open replenishment drafts as they stand now (the local page shows them)."""
    low, _ = _low_stock(conn, tables)
    drafts, _ = _open_drafts(conn, tables)
    return [item.model_dump(mode="json") for item in low], [item.model_dump(mode="json") for item in drafts]


def _low_stock(conn: sqlite3.Connection, tables: set[str]) -> tuple[list[ReportLowStock], int]:
    """The SKUs the stock ledger flags low as the report is made (its ``stock`` table)."""
    if "stock" not in tables:
        return [], 0
    total = int(conn.execute("SELECT COUNT(*) FROM stock WHERE low=1").fetchone()[0])
    rows = conn.execute(
        "SELECT sku, on_hand, safety_stock FROM stock WHERE low=1 ORDER BY sku LIMIT ?", (MAX_LIST,)
    ).fetchall()
    return [
        ReportLowStock(
            sku=str(sku)[:64],
            on_hand=_units(on_hand),
            safety_stock=_units(safety) if safety is not None else None,
        )
        for sku, on_hand, safety in rows
        if str(sku)
    ], total


def _open_drafts(conn: sqlite3.Connection, tables: set[str]) -> tuple[list[ReportDraft], int]:
    """The open replenishment drafts as the replenishment rules keep them (``rule_state``: per SKU, what is left
    of each open draft, oldest first, and the number of the last draft). Drafts are closed oldest first (a
    delivery, or an age past ``open_days``), so the open ones are the last numbers. A draft past ``open_days`` is
    dropped at its SKU's next ``stock.level``: until then it is still listed."""
    if "rule_state" not in tables:
        return [], 0
    out: list[ReportDraft] = []
    total = 0
    cursor = conn.execute(
        "SELECT rule_id, subject, data FROM rule_state WHERE json_valid(data)"
        " AND json_extract(data, '$.type')='replenishment' AND json_array_length(data, '$.open')>0"
        " ORDER BY rule_id, subject"
    )
    for rule_id, sku, data in cursor:
        try:
            state = orjson.loads(data)
            number = int(state.get("n", 0))
            drafts = [d for d in state.get("open", []) if isinstance(d, list) and d]
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue
        for index, draft in enumerate(drafts):
            total += 1
            if len(out) < MAX_LIST:
                try:
                    quantity = Decimal(str(draft[0]))
                except ArithmeticError:
                    continue
                out.append(
                    ReportDraft(
                        draft_id=f"{rule_id}/{sku}/{number - len(drafts) + index + 1}"[:200],
                        rule_id=str(rule_id)[:64],
                        sku=str(sku)[:64],
                        quantity=quantity,
                    )
                )
    return out, total


def _fridges(
    conn: sqlite3.Connection, tables: set[str], span: Day, rules: Sequence[RuleDefinition], now: float
) -> list[ReportFridge]:
    """Each fridge's day from the HACCP log: the fridges it logged that day or in the week before, or that a
    temperature rule names."""
    if "haccp_interval" not in tables:
        return []
    week = span.start - 7 * 86_400
    devices = {
        str(d)
        for (d,) in conn.execute(
            "SELECT DISTINCT device_id FROM haccp_interval WHERE start>=? AND start<? LIMIT ?",
            (int(week), span.end, MAX_FRIDGES),
        )
    }
    temperature = [r for r in rules if isinstance(r, TemperatureRule) and r.enabled]
    devices |= {d for r in temperature for d in r.select.devices}
    has_excursions = "haccp_excursion" in tables
    out = []
    for device in sorted(devices)[:MAX_FRIDGES]:
        rows = conn.execute(
            "SELECT readings, max_c, seconds, source FROM haccp_interval WHERE device_id=? AND start>=? AND start<?"
            " ORDER BY start",
            (device, int(span.start), span.end),
        ).fetchall()
        source = next((str(r[3]) for r in reversed(rows) if r[3] is not None), None)
        watching = [r.max_c for r in temperature if r.select.matches(device, source)]
        limit = min(watching) if watching else None
        with_data = in_range = 0.0
        peak: float | None = None
        for readings, max_c, seconds, _ in rows:
            top, length = _num(max_c), _num(seconds)
            if not readings or top is None or length is None or length <= 0:
                continue
            length = min(length, span.end - span.start)
            with_data += length
            peak = top if peak is None else max(peak, top)
            if limit is not None and top <= limit:
                in_range += length
        with_data = min(with_data, span.end - span.start)
        excursions = _excursions(conn, device, span, now) if has_excursions else []
        out.append(
            ReportFridge(
                device_id=device[:64],
                limit_c=limit,
                minutes_with_data=round(with_data / 60, 1),
                minutes_in_range=round(in_range / 60, 1) if limit is not None else None,
                gap_minutes=round((span.end - span.start - with_data) / 60, 1),
                max_c=peak,
                excursions=excursions,
            )
        )
    return out


def _excursions(conn: sqlite3.Connection, device: str, span: Day, now: float) -> list[ReportExcursion]:
    rows = conn.execute(
        "SELECT alert_id, start, cleared_at, max_c FROM haccp_excursion WHERE device_id=? AND start<?"
        " AND (cleared_at IS NULL OR cleared_at>=?) ORDER BY start, alert_id LIMIT ?",
        (device, span.end, span.start, MAX_EXCURSIONS),
    ).fetchall()
    out = []
    for alert_id, start, cleared_at, max_c in rows:
        begin, cleared = _num(start), _num(cleared_at)
        if begin is None:
            continue
        until = cleared if cleared is not None else max(now, begin)
        out.append(
            ReportExcursion(
                alert_id=str(alert_id)[:200],
                start=datetime.fromtimestamp(begin, UTC),
                end=datetime.fromtimestamp(cleared, UTC) if cleared is not None else None,
                minutes=round(max(0.0, until - begin) / 60, 1),
                minutes_in_day=round(max(0.0, min(until, span.end) - max(begin, span.start)) / 60, 1),
                max_c=_num(max_c),
            )
        )
    return out


def _attendance(conn: sqlite3.Connection, tables: set[str], day: date) -> list[ReportAttendance]:
    """Totals of the day's ``attendance.daily`` events (one per attendance rule), if they were made by then."""
    if "events" not in tables:
        return []
    out: dict[str, ReportAttendance] = {}
    cursor = conn.execute(
        "SELECT body FROM events WHERE kind='attendance.daily' AND cls < 3 AND json_valid(CAST(body AS TEXT))"
        " AND json_extract(CAST(body AS TEXT), '$.data.date')=? ORDER BY seq",
        (day.isoformat(),),
    )
    for (body,) in cursor:
        try:
            data = orjson.loads(body).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if not isinstance(data, dict) or len(out) >= 50:
            continue
        employees = [e for e in data.get("employees", []) if isinstance(e, dict)]
        flags: dict[str, int] = {}
        for employee in employees:
            for flag in employee.get("flags", []):
                if isinstance(flag, str) and (flag in flags or len(flags) < 8):
                    flags[flag[:64]] = flags.get(flag[:64], 0) + 1
        minutes = sum(_num(e.get("minutes_worked")) or 0.0 for e in employees)
        rule_id = str(data.get("rule_id", "?"))[:64] or "?"
        out[rule_id] = ReportAttendance(
            rule_id=rule_id, employees=len(employees), minutes_worked=round(max(0.0, minutes), 1), flags=flags
        )
    return list(out.values())


def _outbox(conn: sqlite3.Connection, tables: set[str]) -> list[ReportOutboxClass]:
    """Each outbox class as the report is made: its backlog, and its oldest undelivered event's time."""
    if "outbox_state" not in tables:
        return []
    out = []
    rows = conn.execute(
        "SELECT cls, delivered_seq, stored_events, pending_events, evicted_events FROM outbox_state ORDER BY cls"
    ).fetchall()
    for cls, delivered, stored, pending, evicted in rows:
        if not isinstance(cls, int) or not 0 <= cls < len(CLASSES):
            continue
        oldest = None
        if pending and "events" in tables:
            row = conn.execute(
                f"SELECT recorded_at FROM events WHERE {of_class(cls)} AND seq>? ORDER BY seq LIMIT 1",  # noqa: S608
                (delivered,),
            ).fetchone()
            if row is not None:
                oldest = datetime.fromtimestamp(_parse_iso(row[0], 0.0), UTC)
        out.append(
            ReportOutboxClass.model_validate(
                {
                    "class": CLASSES[cls],
                    "pending": max(0, int(pending)),
                    "stored": max(0, int(stored)),
                    "evicted": max(0, int(evicted)),
                    "oldest_undelivered": oldest,
                }
            )
        )
    return out


def stored_report(conn: sqlite3.Connection, day: str) -> bytes | None:
    """The ``report.daily`` data made for a day (kept :data:`KEEP_DAYS`), as JSON bytes; None: none."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='report_daily'").fetchone()
    if not exists:
        return None
    row = conn.execute("SELECT body FROM report_daily WHERE day=?", (day,)).fetchone()
    return bytes(row[0]) if row is not None else None
