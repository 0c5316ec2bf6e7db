"""``report.daily``: one summary of each store-local day for HQ, made at ``report.at`` the day after
(docs/REPORTS.md).

A pipeline processor after the rule engine and the HACCP log. It applies no event: at its tick, once the report
time of the day after the last one reported has passed (by the wall clock, synchronised), it reads that day from
the journal's tables in the writer's transaction, aggregating in SQL, and emits one ``report.daily``; the day is
written as the last one reported in ``report_state`` in the same transaction, so a day is reported exactly once
whatever crashes and restarts happen. A day whose report time passed while the gateway was down is reported at
its next start, one day per tick, oldest first (at most :data:`MAX_CATCH_UP_DAYS` back).

It reads tables other modules own, by SQL, and tolerates any of them missing: ``events`` (the journal), ``stock``
(the stock ledger, :mod:`gateway.ledger.stock`: its ``low`` flags), ``rule_state`` (the replenishment rules' open
drafts), ``haccp_interval`` and ``haccp_excursion`` (:mod:`rules.haccp`) and ``outbox_state``. A section that
fails (a damaged row, a changed table) is left empty and named in ``problems``; the report is made all the same.
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
from gateway.kernel.outbox import CLASSES
from gateway.kernel.pipeline import Emit, Processor
from gateway.kernel.rule_config import RuleDefinition, TemperatureRule

_LOGGER = logging.getLogger(__name__)

MAX_CATCH_UP_DAYS: Final = 31
"""After a long downtime, at most this many past days are reported (the older ones are skipped, logged)."""
UNSYNCED_RECHECK_S: Final = 60.0
"""While the wall clock is not synchronised no day is reported; it looks again this often."""
SEQ_MARGIN_S: Final = 86_400.0
"""The day's events are looked for among seqs committed a day either side of it (by ``recorded_at``, which a
clock step may put out of seq order): an event recorded further out of order is missed."""
RETRY_S: Final = 600.0
"""A report that failed (a bug) is tried again this much later."""
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
    ) -> None:
        self.config = config
        self.zone = ZoneInfo(timezone)
        self.timezone = timezone
        self._synced = synced
        self._rules = rules
        """The rules in force (the temperature rules' limits, the rule types of acknowledged alerts)."""
        self._wall = wall
        self._last: date | None = None
        """The last day reported, as committed; None: not yet known (the clock was never synchronised)."""
        self._due = 0.0
        """The wall-clock time the next tick has something to do."""

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
        return self.config.enabled and self._wall() >= self._due

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        if not self.config.enabled or now < self._due:
            return ()
        if not self._synced():
            self._due = now + UNSYNCED_RECHECK_S
            return ()
        today = datetime.fromtimestamp(now, self.zone).date()
        if self._last is None:  # the first day reported is the one the gateway first runs on
            self._save(conn, today - timedelta(days=1))
            self._due = self.report_time(today)
            return ()
        day = self._last + timedelta(days=1)
        oldest = today - timedelta(days=MAX_CATCH_UP_DAYS)
        if day < oldest:
            _LOGGER.warning("report: days %s to %s were never reported (too long ago)", day, oldest)
            day = oldest
        due = self.report_time(day)
        if now < due:
            self._due = due
            return ()
        try:
            report = self.build(conn, day, now)
        except Exception:  # a bug: no report now (and no day marked reported); tried again later
            _LOGGER.exception("report: the report of %s failed; trying again in %.0f s", day, RETRY_S)
            self._due = now + RETRY_S
            return ()
        body = orjson.dumps(report.model_dump(mode="json", by_alias=True))
        conn.execute("INSERT OR REPLACE INTO report_daily VALUES (?,?,?)", (day.isoformat(), now, body))
        conn.execute(
            "DELETE FROM report_daily WHERE day < ?", ((day - timedelta(days=KEEP_DAYS)).isoformat(),)
        )
        self._save(conn, day)
        self._due = min(now, self.report_time(day + timedelta(days=1)))  # a missed day after it: next tick
        if report.late:
            _LOGGER.info("report: %s reported late (its time passed while the gateway was down)", day)
        return [Emit(report)]

    def _save(self, conn: sqlite3.Connection, day: date) -> None:
        conn.execute("INSERT OR REPLACE INTO report_state VALUES (?, ?)", (STATE_KEY, day.isoformat()))
        self._last = day

    def _load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM report_state WHERE key=?", (STATE_KEY,)).fetchone()
        try:
            self._last = date.fromisoformat(row[0]) if row is not None else None
        except (TypeError, ValueError):
            _LOGGER.error("report: the last day reported (%r) is not a date; starting from today", row[0])
            self._last = None
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
        devices = section("devices", lambda: _devices(conn, span, seqs), [])
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


def _first_seq_at(conn: sqlite3.Connection, at: float) -> int:
    """The first seq recorded at or after ``at`` (the last seq + 1 if none), by a binary search on seq that
    takes ``recorded_at`` as ordered by seq."""
    bounds = conn.execute("SELECT MIN(seq), MAX(seq) FROM events").fetchone()
    if bounds is None or bounds[0] is None:
        return 1
    lo, hi = int(bounds[0]), int(bounds[1]) + 1
    mark = _iso(at)
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(
            "SELECT seq, recorded_at FROM events WHERE seq>=? ORDER BY seq LIMIT 1", (mid,)
        ).fetchone()
        if row is None or str(row[1]) >= mark:
            hi = mid
        else:
            lo = int(row[0]) + 1
    return lo


def _seq_range(conn: sqlite3.Connection, span: Day) -> tuple[int, int]:
    """Seqs (inclusive) among which the day's events are: those recorded a margin either side of it."""
    return _first_seq_at(conn, span.start - SEQ_MARGIN_S), _first_seq_at(conn, span.end + SEQ_MARGIN_S) - 1


_DAY_EVENTS: Final = (
    "SELECT seq, CAST(body AS TEXT) AS b FROM events"
    " WHERE kind=? AND seq BETWEEN ? AND ? AND recorded_at>=? AND recorded_at<?"
)


def _day_args(kind: str, span: Day, seqs: tuple[int, int] | None) -> tuple[Any, ...]:
    lo, hi = seqs if seqs is not None else (1, 0)
    return (kind, lo, hi, _iso(span.start), _iso(span.end))


def _money(conn: sqlite3.Connection, kind: str, span: Day, seqs: tuple[int, int] | None) -> list[ReportMoney]:
    """Receipts per currency, totals summed in thousandths (exact to 3 decimal places)."""
    rows = conn.execute(
        f"WITH e AS ({_DAY_EVENTS}) SELECT json_extract(b, '$.data.currency') AS cur, COUNT(*),"  # noqa: S608 (constants)
        " SUM(CAST(ROUND(CAST(json_extract(b, '$.data.totals.total') AS REAL) * 1000) AS INTEGER))"
        " FROM e WHERE json_valid(b) GROUP BY cur ORDER BY cur LIMIT 50",
        _day_args(kind, span, seqs),
    ).fetchall()
    return [
        ReportMoney(
            currency=cur[:64] if isinstance(cur, str) and cur else "?",
            count=int(n),
            amount=Decimal(int(milli or 0)) / 1000,
        )
        for cur, n, milli in rows
    ]


def _top_skus(
    conn: sqlite3.Connection, span: Day, seqs: tuple[int, int] | None, limit: int
) -> list[ReportSku]:
    if limit <= 0:
        return []
    rows = conn.execute(
        f"WITH e AS ({_DAY_EVENTS}), l AS (SELECT e.seq, j.value AS v FROM e, json_each(e.b, '$.data.lines') j"  # noqa: S608
        " WHERE json_valid(e.b) AND j.type='object')"
        " SELECT json_extract(v, '$.sku') AS sku, SUM(CAST(json_extract(v, '$.quantity') AS REAL)) AS units,"
        " COUNT(DISTINCT seq) FROM l GROUP BY sku HAVING sku IS NOT NULL ORDER BY units DESC, sku LIMIT ?",
        (*_day_args("pos.sale", span, seqs), limit),
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
    conn: sqlite3.Connection, span: Day, seqs: tuple[int, int] | None, rules: Sequence[RuleDefinition]
) -> list[ReportAlerts]:
    """Per rule type, the alerts raised, cleared and acknowledged during the day (an acknowledgement's rule type
    is its rule's, by the rule id its alert id starts with)."""
    types = {r.id: r.type for r in rules}
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
            name = str(rule) if rule is not None else types.get(str(alert_id).partition("/")[0], "unknown")
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


def _devices(conn: sqlite3.Connection, span: Day, seqs: tuple[int, int] | None) -> list[ReportDevice]:
    """Each device's up time from its ``device.status`` changes: its status before the day (its last change
    before it) holds until the next change; before any, its status is unknown and the time is not counted."""
    lo, hi = seqs if seqs is not None else (1, 0)
    start_iso, end_iso = _iso(span.start), _iso(span.end)
    known: dict[str, tuple[float, bool]] = {}
    """Device -> since when (in the day) it has been in its state, and whether that state is up."""
    rows = conn.execute(
        "SELECT device_id, body, MAX(seq) FROM events WHERE kind='device.status' AND seq<?"
        " AND device_id IS NOT NULL GROUP BY device_id LIMIT ?",
        (lo, MAX_DEVICES),
    ).fetchall()
    rows += conn.execute(
        "SELECT device_id, body, MAX(seq) FROM events WHERE kind='device.status' AND seq BETWEEN ? AND ?"
        " AND recorded_at<? AND device_id IS NOT NULL GROUP BY device_id LIMIT ?",
        (lo, hi, start_iso, MAX_DEVICES),
    ).fetchall()
    for device, body, _ in sorted(rows, key=lambda r: int(r[2])):
        known[str(device)] = (span.start, _status(body) in UP)
    up: dict[str, float] = dict.fromkeys(known, 0.0)
    total: dict[str, float] = dict.fromkeys(known, 0.0)
    changes: dict[str, int] = {}
    cursor = conn.execute(
        "SELECT device_id, recorded_at, body FROM events WHERE kind='device.status'"
        " AND seq BETWEEN ? AND ? AND recorded_at>=? AND recorded_at<? AND device_id IS NOT NULL ORDER BY seq",
        (lo, hi, start_iso, end_iso),
    )
    for device_id, recorded, body in cursor:
        device = str(device_id)
        if device not in known and len(known) >= MAX_DEVICES:
            continue
        at = min(max(_parse_iso(recorded, span.start), span.start), span.end)
        if device in known:
            since, was_up = known[device]
            at = max(at, since)
            total[device] = total.get(device, 0.0) + at - since
            up[device] = up.get(device, 0.0) + (at - since if was_up else 0.0)
        known[device] = (at, _status(body) in UP)
        changes[device] = changes.get(device, 0) + 1
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
        "SELECT body FROM events WHERE kind='attendance.daily' AND json_valid(CAST(body AS TEXT))"
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
                "SELECT recorded_at FROM events WHERE cls=? AND seq>? ORDER BY seq LIMIT 1", (cls, delivered)
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
