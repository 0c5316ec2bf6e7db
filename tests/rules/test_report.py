"""``report.daily`` (rules/report.py): one report per store-local day, made at ``report.at`` the day after, from a
real SQLite journal file; exactly once whatever restarts and crashes; a day missed while the gateway was down is
reported at its start; DST days; empty days; bad data."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from pydantic import TypeAdapter

from gateway.api import create_app
from gateway.kernel.events import ReportDaily
from gateway.kernel.journal.store import SCHEMA as JOURNAL_SCHEMA
from gateway.kernel.metrics import Metrics
from gateway.kernel.pipeline import Event, Pipeline
from gateway.kernel.rule_config import RuleDefinition
from gateway.ledger.stock import SCHEMA as STOCK_SCHEMA
from rules import report as report_module
from rules.engine import SCHEMA as RULE_SCHEMA
from rules.haccp import SCHEMA as HACCP_SCHEMA
from rules.report import RETRY_S, DailyReport, ReportConfig
from rules.report_api import report_router
from tests.gateway.test_api import AUTH, TOKEN
from tests.gateway.test_api import running as api_running
from tests.gateway.test_journal import new_journal, query, running, until
from tests.gateway.test_pipeline import Writer

HK = "Asia/Hong_Kong"
PARIS = "Europe/Paris"
RULES = TypeAdapter(list[RuleDefinition]).validate_python(
    [{"id": "dairy-warm", "type": "temperature", "max_c": 8, "select": {"devices": ["fridge-1", "fridge-2"]}}]
)


def at(day: date, hh: int, mm: int = 0, zone: str = HK) -> float:
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=ZoneInfo(zone)).timestamp()


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Rig:
    """A journal file with the tables the report reads, and the report processor as the journal's writer runs it
    (a tick is one transaction; what it emits is inserted into ``events`` in it, as the journal does)."""

    def __init__(self, path: Path, zone: str = HK, report_at: str = "02:00") -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        for script in (JOURNAL_SCHEMA, STOCK_SCHEMA, RULE_SCHEMA, HACCP_SCHEMA):
            self.conn.executescript(script)
        self.zone = zone
        self.report_at = report_at
        self.wall = at(date(2027, 1, 4), 10)
        self.skew = 0.0
        """How far the wall clock stepped from the monotonic one (a clock that jumps)."""
        self.synced = True
        self.start()

    def start(self) -> None:
        self.report = DailyReport(
            ReportConfig(at=self.report_at, top_skus=2),
            self.zone,
            synced=lambda: self.synced,
            rules=lambda: RULES,
            wall=lambda: self.wall,
            monotonic=lambda: self.wall - self.skew,
        )
        self.pipeline = Pipeline([self.report])
        self.pipeline.setup(self.conn)

    @property
    def seq(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def event(
        self, kind: str, data: Any, when: float, device: str | None = None, body: bytes | None = None
    ) -> None:
        """An event committed at ``when`` (by the clock as synchronised or not), seen by the pipeline as the
        journal's writer feeds it."""
        wall, self.wall = self.wall, when  # the commit's clock (the monotonic one moves with it)
        self.conn.execute("BEGIN IMMEDIATE")
        self.insert(kind, data, when, device, body)
        event = Event(self.seq, kind, device, orjson.dumps(data), recorded_at=when, clock_synced=self.synced)  # type: ignore[arg-type]
        self.pipeline.run(self.conn, [event], Writer(self.seq).append)
        self.conn.execute("COMMIT")
        self.pipeline.committed()
        self.wall = wall

    def insert(
        self, kind: str, data: Any, when: float, device: str | None = None, body: bytes | None = None
    ) -> None:
        seq = self.seq + 1
        if body is None:
            body = orjson.dumps(
                {
                    "seq": seq,
                    "kind": kind,
                    "device_id": device,
                    "recorded_at": iso(when),
                    "clock_synced": self.synced,
                    "data": data,
                }
            )
        self.conn.execute(
            "INSERT INTO events VALUES (?,?,?,?,?,?,?,?)",
            (seq, f"id-{seq}", kind, device, iso(when), None, body, 1),
        )

    def tick(self, crash: bool = False) -> list[ReportDaily]:
        if not self.pipeline.wants_ticks:
            return []
        writer = Writer(self.seq)
        self.conn.execute("BEGIN IMMEDIATE")
        self.pipeline.tick(self.conn, self.wall, writer.append)
        for e in writer.emitted:
            self.insert(e.kind, orjson.loads(e.data_json), self.wall, e.device_id)
        if crash:
            self.conn.execute("ROLLBACK")
            return []
        self.conn.execute("COMMIT")
        self.pipeline.committed()
        return [e.model for e in writer.emitted if isinstance(e.model, ReportDaily)]

    def restart(self) -> None:
        self.start()

    def reports(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT body FROM events WHERE kind='report.daily' ORDER BY seq").fetchall()
        return [orjson.loads(body)["data"] for (body,) in rows]

    def run_until(self, when: float, step: float = 600) -> list[ReportDaily]:
        made = []
        while self.wall < when:
            self.wall = min(when, self.wall + step)
            made += self.tick()
        return made


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path / "journal.db")
    yield made
    with contextlib.suppress(sqlite3.Error):
        made.conn.close()


def sale(receipt: str, currency: str, total: str, *lines: tuple[str, str]) -> dict[str, Any]:
    return {
        "receipt_no": receipt,
        "register_id": "till-1",
        "currency": currency,
        "lines": [{"sku": sku, "quantity": qty, "unit_price": "1"} for sku, qty in lines],
        "totals": {"subtotal": total, "total": total},
    }


def fill_day(rig: Rig, day: date) -> None:
    """A day of a store in Hong Kong: sales in two currencies, a return, alerts, a fridge, devices, stock. The events
    are committed in time order (seq order), the day before's and the day after's included."""
    events: list[tuple[Any, ...]] = []

    def add(*args: Any) -> None:
        events.append(args)

    add("pos.sale", sale("r1", "HKD", "100.50", ("A", "2"), ("B", "1")), at(day, 9))
    add("pos.sale", sale("r2", "HKD", "20.25", ("A", "1")), at(day, 12))
    add("pos.sale", sale("r3", "USD", "9.99", ("C", "5")), at(day, 23, 59))
    add("pos.sale", sale("r0", "HKD", "999", ("A", "9")), at(day, 0) - 1)  # the day before
    add("pos.sale", sale("r9", "HKD", "999", ("A", "9")), at(day + timedelta(days=1), 0))  # the day after
    add("pos.return", sale("x1", "HKD", "20.25", ("A", "1")), at(day, 15))
    raised = {"rule": "temperature", "severity": "critical", "subject": "fridge-1", "message": "warm"}
    add("alert.raised", {**raised, "details": {"alert_id": "dairy-warm/fridge-1/1"}}, at(day, 10), "fridge-1")
    add("alert.raised", {**raised, "details": {"alert_id": "dairy-warm/fridge-1/2"}}, at(day, 13), "fridge-1")
    cleared = {"rule": "temperature", "subject": "fridge-1", "reason": "recovered", "message": "ok"}
    add("alert.cleared", {**cleared, "alert_id": "dairy-warm/fridge-1/1"}, at(day, 11), "fridge-1")
    ack = {"alert_id": "dairy-warm/fridge-1/1", "note": "moved stock", "role": "manager", "via": "api"}
    add("alert.acknowledged", ack, at(day, 10, 30))
    add("device.status", {"status": "online"}, at(day, 0) - 3600, "till-1")
    add("device.status", {"status": "offline"}, at(day, 6), "till-1")
    add("device.status", {"status": "online"}, at(day, 12), "till-1")
    add("device.status", {"status": "error"}, at(day, 18), "scale-1")
    add(
        "attendance.daily",
        {
            "rule_id": "staff",
            "date": day.isoformat(),
            "timezone": HK,
            "employees": [
                {"employee_id": "e1", "shifts": [], "minutes_worked": 480, "flags": ["late"]},
                {"employee_id": "e2", "shifts": [], "minutes_worked": 240.5, "flags": []},
            ],
        },
        at(day + timedelta(days=1), 1),
    )
    for args in sorted(events, key=lambda e: float(e[2])):
        rig.event(*args)
    start = int(at(day, 0))
    for n in range(96):  # fridge-1: every interval but the last 8 (2 hours) logged; one interval at 9.5 °C
        if n < 88:
            peak = 9.5 if n == 40 else 4.0
            rig.conn.execute(
                "INSERT INTO haccp_interval VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    "fridge-1",
                    start + 900 * n,
                    3.0,
                    peak,
                    4.0,
                    start + 900 * n + 600,
                    3,
                    0,
                    0,
                    0,
                    "dixell-xr",
                    1,
                    900,
                ),
            )
    rig.conn.execute(
        "INSERT INTO haccp_excursion VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            "dairy-warm/fridge-1/1",
            "fridge-1",
            "dairy-warm",
            8.0,
            at(day, 10),
            at(day, 10),
            at(day, 10, 45),
            9.5,
            "recovered",
            "[]",
            1,
            1,
        ),
    )
    rig.conn.execute(
        "INSERT INTO stock(sku, on_hand, safety_stock, low) VALUES ('A', 1, 5, 1), ('B', 50, 5, 0)"
    )
    rig.conn.execute(
        "INSERT INTO rule_state VALUES ('reorder','A','fp','idle',0,NULL,?)",
        (orjson.dumps({"type": "replenishment", "n": 3, "open": [["4", 1.0], ["12", 2.0]]}),),
    )
    rig.conn.execute("INSERT INTO outbox_state VALUES (1, 3, 40, 4000, 37, 0, 0, 0)")


def test_the_days_report_at_two_in_the_morning(rig: Rig) -> None:
    day = date(2027, 1, 5)
    rig.wall = at(day, 8)
    assert rig.tick() == []  # the first day reported is the one the gateway first runs on
    fill_day(rig, day)
    assert rig.run_until(at(day + timedelta(days=1), 1, 59)) == []
    made = rig.run_until(at(day + timedelta(days=1), 2, 5), step=60)
    assert [r.date for r in made] == ["2027-01-05"]
    report = made[0]
    assert not report.late
    assert report.problems == []
    assert report.day_start.isoformat() == "2027-01-05T00:00:00+08:00"
    assert [(m.currency, m.count, m.amount) for m in report.sales] == [
        ("HKD", 2, Decimal("120.75")),
        ("USD", 1, Decimal("9.99")),
    ]
    assert [(m.currency, m.count, m.amount) for m in report.returns] == [("HKD", 1, Decimal("20.25"))]
    assert report.returns_ratio == round(1 / 3, 4)
    assert [(s.sku, s.units, s.receipts) for s in report.top_skus] == [
        ("C", Decimal(5), 1),
        ("A", Decimal(3), 2),
    ]
    assert [(s.sku, s.on_hand) for s in report.low_stock] == [("A", Decimal(1))]
    assert report.low_stock_total == 1
    assert [(d.draft_id, d.quantity) for d in report.open_drafts] == [
        ("reorder/A/2", Decimal(4)),
        ("reorder/A/3", Decimal(12)),
    ]
    (alerts,) = report.alerts
    assert (alerts.rule, alerts.raised, alerts.cleared, alerts.acknowledged) == ("temperature", 2, 1, 1)
    assert alerts.alert_ids == ["dairy-warm/fridge-1/1", "dairy-warm/fridge-1/2"]
    fridges = {f.device_id: f for f in report.fridges}
    assert set(fridges) == {"fridge-1", "fridge-2"}  # fridge-2: a rule names it; it logged nothing
    one = fridges["fridge-1"]
    assert (one.limit_c, one.minutes_with_data, one.minutes_in_range, one.gap_minutes) == (8, 1320, 1305, 120)
    assert one.max_c == 9.5
    assert [(e.alert_id, e.minutes, e.minutes_in_day) for e in one.excursions] == [
        ("dairy-warm/fridge-1/1", 45, 45)
    ]
    assert (fridges["fridge-2"].minutes_with_data, fridges["fridge-2"].gap_minutes) == (0, 1440)
    (staff,) = report.attendance
    assert (staff.employees, staff.minutes_worked, staff.flags) == (2, 720.5, {"late": 1})
    devices = {d.device_id: d for d in report.devices}
    assert (devices["till-1"].minutes_known, devices["till-1"].minutes_up, devices["till-1"].changes) == (
        1440,
        1080,
        2,
    )
    assert (devices["scale-1"].minutes_known, devices["scale-1"].uptime_pct) == (360, 0)
    (transaction,) = report.outbox
    assert (transaction.class_, transaction.pending) == ("transaction", 37)
    assert transaction.oldest_undelivered is not None
    assert rig.reports()[0]["date"] == "2027-01-05"
    assert rig.run_until(at(day + timedelta(days=2), 1)) == []


def test_exactly_once_across_restarts_and_a_crash_before_the_commit(rig: Rig) -> None:
    day = date(2027, 1, 5)
    rig.wall = at(day, 8)
    rig.tick()
    rig.wall = at(day + timedelta(days=1), 2)
    rig.tick(crash=True)  # the report and its state row roll back together
    rig.restart()
    assert [r.date for r in rig.tick()] == ["2027-01-05"]
    for _ in range(3):
        rig.restart()
        rig.wall += 30
        assert rig.tick() == []
    assert [r["date"] for r in rig.reports()] == ["2027-01-05"]


def test_days_missed_while_the_gateway_was_down_are_reported_at_start_oldest_first(rig: Rig) -> None:
    rig.wall = at(date(2027, 1, 5), 8)
    rig.tick()
    rig.conn.close()
    rig.conn = sqlite3.connect(rig.path, isolation_level=None)
    rig.wall = at(date(2027, 1, 8), 15)  # down from the 5th until the 8th, 15:00
    rig.restart()
    made = [r for _ in range(5) for r in rig.tick()]
    assert [(r.date, r.late) for r in made] == [
        ("2027-01-05", True),
        ("2027-01-06", True),
        ("2027-01-07", True),
    ]
    rig.restart()
    assert rig.run_until(at(date(2027, 1, 9), 1, 59)) == []
    assert [r.date for r in rig.run_until(at(date(2027, 1, 9), 3))] == ["2027-01-08"]


def test_no_report_while_the_clock_is_unsynchronised(rig: Rig) -> None:
    rig.synced = False
    rig.wall = at(date(2027, 1, 5), 8)
    assert rig.run_until(at(date(2027, 1, 7), 8)) == []
    rig.synced = True
    rig.wall += 120
    rig.tick()  # the first synchronised day is the first reported
    rig.run_until(at(date(2027, 1, 8), 3))
    assert [r["date"] for r in rig.reports()] == ["2027-01-07"]


def test_a_23_hour_day_and_a_25_hour_day(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.db", zone=PARIS, report_at="02:30")
    spring, autumn = date(2027, 3, 28), date(2027, 10, 31)
    rig.wall = at(spring - timedelta(days=1), 1, zone=PARIS)
    rig.tick()
    for n in range(92):
        start = int(at(spring, 0, zone=PARIS)) + 900 * n
        rig.conn.execute(
            "INSERT INTO haccp_interval VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ("fridge-1", start, 3.0, 4.0, 4.0, start + 1, 1, 0, 0, 0, "x", 1, 900),
        )
    # 02:30 on the 28th does not exist (02:00 -> 03:00): the 27th is reported at 03:30, as the clock reads then
    assert rig.run_until(at(spring, 3, 25, zone=PARIS), step=60) == []
    assert [r.date for r in rig.run_until(at(spring, 3, 35, zone=PARIS), step=60)] == ["2027-03-27"]
    made = rig.run_until(at(spring + timedelta(days=1), 3, zone=PARIS))
    assert [r.date for r in made] == ["2027-03-28"]
    (report,) = made
    assert (report.day_end.timestamp() - report.day_start.timestamp()) / 3600 == 23
    fridge = next(f for f in report.fridges if f.device_id == "fridge-1")
    assert (fridge.minutes_with_data, fridge.gap_minutes) == (23 * 60, 0)
    rig.conn.execute("INSERT OR REPLACE INTO report_state VALUES ('last_day', '2027-10-30')")
    rig.restart()
    rig.wall = at(autumn, 12, zone=PARIS)
    made = rig.run_until(at(autumn + timedelta(days=1), 3, zone=PARIS))
    assert [r.date for r in made] == ["2027-10-31"]
    assert (made[0].day_end.timestamp() - made[0].day_start.timestamp()) / 3600 == 25
    assert next(f for f in made[0].fridges if f.device_id == "fridge-2").gap_minutes == 25 * 60


def test_an_empty_day_and_an_empty_journal(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.db")
    rig.wall = at(date(2027, 1, 5), 8)
    rig.tick()
    (report,) = rig.run_until(at(date(2027, 1, 6), 3))
    assert report.problems == []
    assert (report.sales, report.returns, report.returns_ratio, report.top_skus) == ([], [], None, [])
    assert (report.low_stock, report.open_drafts, report.alerts, report.devices) == ([], [], [], [])
    assert [f.gap_minutes for f in report.fridges] == [1440, 1440]  # the fridges the rule names
    bare = sqlite3.connect(tmp_path / "bare.db", isolation_level=None)  # no table at all but the report's own
    processor = DailyReport(ReportConfig(), HK, wall=lambda: 0.0)
    processor.setup(bare)
    bare.execute("BEGIN")
    empty = processor.build(bare, date(2027, 1, 5), at(date(2027, 1, 6), 3))
    bare.execute("COMMIT")
    assert empty.fridges == []
    assert empty.outbox == []
    assert empty.low_stock == []
    bare.close()


def test_bad_data_never_stops_the_report(rig: Rig) -> None:
    day = date(2027, 1, 5)
    rig.wall = at(day, 8)
    rig.tick()
    rig.event("pos.sale", None, at(day, 9), body=b"{not json")
    rig.event("pos.sale", {"currency": 7, "totals": {"total": "lots"}, "lines": "A"}, at(day, 9))
    rig.event(
        "pos.sale",
        {"currency": "HKD", "totals": "x", "lines": [1, {"quantity": "x"}, {"sku": ""}]},
        at(day, 9),
    )
    rig.event("pos.return", [1, 2], at(day, 9))
    rig.event("alert.raised", {"rule": None, "details": {"alert_id": 5}}, at(day, 9))
    rig.event("alert.acknowledged", {"alert_id": ["x"]}, at(day, 9))
    rig.event("device.status", "offline", at(day, 9), "till-1")
    rig.event("device.status", None, at(day, 9), "till-2", body=b"\xff\xfe")
    rig.event(
        "attendance.daily", {"date": day.isoformat(), "employees": [1, {"minutes_worked": "x"}]}, at(day, 23)
    )
    rig.conn.execute("INSERT INTO stock(sku, on_hand, safety_stock, low) VALUES ('', 'x', NULL, 1)")
    rig.conn.execute("INSERT INTO rule_state VALUES ('r','A','fp','idle',0,NULL,'{bad')")
    rig.conn.execute(
        "INSERT INTO rule_state VALUES ('r','B','fp','idle',0,NULL,?)",
        (orjson.dumps({"type": "replenishment", "n": "x", "open": [["q", 1]]}),),
    )
    rig.conn.execute(
        "INSERT INTO haccp_interval VALUES ('fridge-1', ?, NULL, 'hot', NULL, NULL, 1, 0, 0, 0, NULL, 1, 900)",
        (int(at(day, 3)),),
    )
    rig.conn.execute("INSERT INTO outbox_state VALUES (9, 0, 1, 1, 1, 0, 0, 0)")
    made = rig.run_until(at(day + timedelta(days=1), 3))
    assert [r.date for r in made] == ["2027-01-05"]  # what could be read; the damaged rows are left out
    assert made[0].problems == []
    assert [(m.currency, m.count) for m in made[0].sales] == [("?", 1), ("HKD", 1)]
    rig.conn.execute("UPDATE report_state SET value='garbage'")
    rig.restart()
    rig.tick()  # a damaged state row: the gateway starts over from today, and does not crash
    assert [r["date"] for r in rig.reports()] == ["2027-01-05"]


async def test_in_a_real_journal_a_missed_day_is_reported_at_start_once_and_served_by_the_api(
    tmp_path: Path,
) -> None:
    """The journal's own writer and ticks: the first start marks yesterday as reported; the gateway is then
    "down" two days (the state row set back), so the next start reports both, once, and a third start nothing."""

    def report() -> DailyReport:
        return DailyReport(ReportConfig(at="00:00"), "UTC")

    today = datetime.now(UTC).date()
    journal = new_journal(tmp_path, processors=[report()])
    async with running(journal):
        await until(
            lambda: bool(query(journal, "SELECT 1 FROM report_state")), "the first tick notes the first day"
        )
    assert query(journal, "SELECT value FROM report_state WHERE key='last_day'") == [
        ((today - timedelta(days=1)).isoformat(),)
    ]
    with contextlib.closing(sqlite3.connect(journal.path, isolation_level=None)) as conn:
        conn.execute("UPDATE report_state SET value=?", ((today - timedelta(days=3)).isoformat(),))
    for _ in range(2):
        reopened = new_journal(tmp_path, processors=[report()])
        async with running(reopened):
            await until(
                lambda: len(query(reopened, "SELECT 1 FROM events WHERE kind='report.daily'")) >= 2,  # noqa: B023
                "the missed days are reported",
            )
            await asyncio.sleep(1.5)  # ticks go on: nothing more
    rows = query(reopened, "SELECT body, cls FROM events WHERE kind='report.daily' ORDER BY seq")
    dates = [orjson.loads(body)["data"]["date"] for body, _ in rows]
    assert dates == [(today - timedelta(days=2)).isoformat(), (today - timedelta(days=1)).isoformat()]
    assert {cls for _, cls in rows} == {1}  # transaction
    app = create_app(
        reopened.path, TOKEN, Metrics(), lambda: {"status": "ok"}, routers=[report_router(reopened.path)]
    )
    async with api_running(app) as (base, _), httpx.AsyncClient(base_url=base, timeout=10) as client:
        url = f"/api/reports/daily?date={dates[0]}"
        assert (await client.get(url)).status_code == 401
        answer = await client.get(url, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["date"] == dates[0]
        assert (await client.get("/api/reports/daily?date=2001-01-01", headers=AUTH)).status_code == 404
        assert (await client.get("/api/reports/daily?date=2001-02-30", headers=AUTH)).status_code == 422
        for far in ("9999-12-31", "0001-01-01"):
            assert (await client.get(f"/api/reports/daily?date={far}", headers=AUTH)).status_code == 422


def test_a_reboot_without_a_real_time_clock_keeps_the_days_events(rig: Rig) -> None:
    """Events stamped 1970 by a clock not yet synchronised (a box without a real-time clock, rebooted) neither
    empty the day nor are counted in it: the day is its seqs, from its first to the next day's."""
    day = date(2027, 1, 4)
    rig.tick()
    for k in range(200):
        rig.event("pos.sale", sale(f"r{k}", "HKD", "10", ("A", "1")), at(day, 10) + k * 60)
    rig.run_until(at(day, 23, 50))
    rig.restart()  # rebooted at 23:50; NTP answers at 00:40
    rig.synced = False
    for k in range(600):
        rig.event("sensor.sample", {"x": 1}, 1000.0 + k)
    rig.event("pos.sale", sale("lost", "HKD", "5", ("A", "1")), 2000.0)
    rig.wall = 3000.0
    rig.tick()
    rig.synced = True
    rig.wall = at(day + timedelta(days=1), 0, 40)
    rig.event("pos.sale", sale("next", "HKD", "7", ("A", "1")), at(day + timedelta(days=1), 0, 41))
    made = rig.run_until(at(day + timedelta(days=1), 3))
    assert [r.date for r in made] == ["2027-01-04"]
    assert [(m.currency, m.count, m.amount) for m in made[0].sales] == [("HKD", 200, Decimal(2000))]
    rig.restart()  # rebooted again after midnight, the clock at 1970 again
    rig.synced = False
    rig.event("pos.sale", sale("old", "HKD", "1", ("A", "1")), 5000.0)
    rig.synced = True
    made = rig.run_until(at(day + timedelta(days=2), 3))
    assert [(r.date, [m.count for m in r.sales]) for r in made] == [("2027-01-05", [1])]


def test_a_clock_that_steps_a_year_ahead_for_a_minute_reports_nothing_wrong(rig: Rig) -> None:
    day = date(2027, 1, 4)
    rig.wall = at(day, 12)
    rig.tick()
    rig.event("pos.sale", sale("r1", "HKD", "10", ("A", "1")), at(day, 11))
    ahead = at(date(2028, 1, 4), 12) - rig.wall
    rig.wall += ahead
    rig.skew += ahead  # the wall clock stepped; the monotonic one did not
    made = []
    for _ in range(40):
        made += rig.tick()
        rig.event("sensor.sample", {"x": 1}, rig.wall)  # committed meanwhile, stamped a year ahead
        rig.wall += 1
    assert made == []
    rig.wall -= ahead
    rig.skew -= ahead
    rig.event("pos.sale", sale("r2", "HKD", "10", ("A", "1")), at(day, 14))
    made = rig.run_until(at(day + timedelta(days=3), 3))
    assert [(r.date, [m.count for m in r.sales]) for r in made] == [
        ("2027-01-04", [2]),
        ("2027-01-05", []),
        ("2027-01-06", []),
    ]


def test_a_clock_ahead_after_a_start_reports_no_future_day_and_purges_no_copy(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart with a clock a year ahead (trusted: nothing to compare it with) may report days of a future
    the journal has events of; once the clock is right again, no day is reported until it reaches them, and the
    stored copies of the real days are kept."""
    day = date(2027, 1, 4)
    rig.wall = at(day, 12)
    rig.tick()
    rig.event("pos.sale", sale("r1", "HKD", "10", ("A", "1")), at(day, 13))
    rig.run_until(at(day + timedelta(days=1), 3))
    assert [r["date"] for r in rig.reports()] == ["2027-01-04"]
    rig.restart()
    rig.wall = at(date(2028, 1, 4), 12)
    rig.event("sensor.sample", {"x": 1}, rig.wall)
    rig.run_until(rig.wall + 60, step=1)
    rig.restart()
    rig.wall = at(day + timedelta(days=1), 12)
    rig.skew = 0.0
    rig.event("sensor.sample", {"x": 1}, rig.wall)
    with caplog.at_level(logging.ERROR):
        assert rig.run_until(at(day + timedelta(days=3), 3)) == []
    assert "one of them was wrong" in caplog.text
    stored = [d for (d,) in rig.conn.execute("SELECT day FROM report_daily ORDER BY day")]
    assert stored[0] == "2027-01-04"


def test_more_than_1000_devices_are_reported_capped_and_no_day_stalls(rig: Rig) -> None:
    day = date(2027, 1, 4)
    rig.tick()
    for k in range(1000):
        rig.event("device.status", {"status": "online"}, at(day, 0) - 3 * 86400, f"a-{k:04d}")
    rig.event("device.status", {"status": "online"}, at(day, 8), "z-new")
    made = rig.run_until(at(day + timedelta(days=3), 12))
    assert [r.date for r in made] == ["2027-01-04", "2027-01-05", "2027-01-06"]
    assert len(made[0].devices) == 1000
    assert made[0].problems == ["devices: more than 1000; 1000 listed"]


def test_a_report_that_keeps_failing_is_made_with_empty_sections(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    day = date(2027, 1, 4)
    rig.tick()

    def broken(*_: Any) -> ReportDaily:
        raise RuntimeError("a bug")

    monkeypatch.setattr(rig.report, "build", broken)
    rig.wall = at(day + timedelta(days=1), 2)
    made = []
    for _ in range(3):
        made += rig.tick()
        rig.wall += RETRY_S
    assert [(r.date, r.sales, r.problems) for r in made] == [
        ("2027-01-04", [], ["report: RuntimeError: a bug"])
    ]
    monkeypatch.undo()
    assert [r.date for r in rig.run_until(at(day + timedelta(days=2), 3))] == ["2027-01-05"]


def test_a_sqlite_error_fails_the_commit_and_the_day_is_reported_after(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk or the file failing is not a damaged row: no section is left empty and the day marked reported;
    the tick's transaction fails, as every processor's does, and the report is made when the error is gone."""
    day = date(2027, 1, 4)
    rig.tick()
    rig.event("pos.sale", sale("r1", "HKD", "10", ("A", "1")), at(day, 13))
    real = report_module._low_stock

    def failing(*_: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(report_module, "_low_stock", failing)
    rig.wall = at(day + timedelta(days=1), 2)
    with pytest.raises(sqlite3.OperationalError):
        rig.tick()
    rig.conn.execute("ROLLBACK")
    rig.pipeline.rollback(rig.conn)
    assert rig.reports() == []
    monkeypatch.setattr(report_module, "_low_stock", real)
    made = rig.run_until(rig.wall + 60)
    assert [(r.date, r.problems, [m.count for m in r.sales]) for r in made] == [("2027-01-04", [], [1])]


def test_a_lost_state_row_goes_on_from_the_newest_report(rig: Rig) -> None:
    day = date(2027, 1, 4)
    rig.tick()
    rig.run_until(at(day + timedelta(days=2), 3))
    assert [r["date"] for r in rig.reports()] == ["2027-01-04", "2027-01-05"]
    rig.conn.execute("DELETE FROM report_state")
    rig.restart()
    rig.run_until(at(day + timedelta(days=3), 3))
    assert [r["date"] for r in rig.reports()] == ["2027-01-04", "2027-01-05", "2027-01-06"]


def test_absurd_amounts_are_left_out_and_stock_low_acknowledgements_have_their_type(rig: Rig) -> None:
    day = date(2027, 1, 4)
    rig.tick()
    rig.event("pos.sale", sale("r1", "HKD", "10", ("A", "1")), at(day, 13))
    rig.event("pos.sale", sale("r2", "HKD", "1e300", ("A", "1e300"), ("B", "2")), at(day, 14))
    ack = {"alert_id": "stock.low/A/1", "note": "ordered", "role": "manager", "via": "api"}
    rig.event("alert.acknowledged", ack, at(day, 15))
    (report,) = rig.run_until(at(day + timedelta(days=1), 3))
    assert report.problems == []
    assert [(m.count, m.amount) for m in report.sales] == [(2, Decimal(10))]
    assert [(s.sku, s.units) for s in report.top_skus] == [("B", Decimal(2)), ("A", Decimal(1))]
    assert [(a.rule, a.acknowledged) for a in report.alerts] == [("stock.low", 1)]
