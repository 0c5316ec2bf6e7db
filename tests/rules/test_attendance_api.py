"""``GET /api/attendance.csv`` over real HTTP, on a real journal with its writer running: HQ's roster stored as a
``roster.set`` stores it, check-ins committed, the rules' clock moved past the day's end, and the day's
``attendance.daily`` read back as CSV for payroll."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx
import orjson

from cloud_bridge.documents import Roster
from gateway.api import create_app
from gateway.config_loader import load_config
from gateway.kernel.journal import Draft
from gateway.kernel.metrics import Metrics
from gateway.kernel.store_hours import StoreHours
from gateway.ledger.documents import roster, store_work
from rules.attendance_api import COLUMNS, attendance_router
from rules.engine import RuleEngine
from tests.gateway.test_api import AUTH, TOKEN, running
from tests.gateway.test_journal import new_journal, query, until
from tests.gateway.test_journal import running as journal_running
from tests.harness.e2e_helpers import running_gateway
from tests.rules.conftest import RULE, Time
from tests.rules.test_attendance import HK, RULE_DEF, STORE, local


def checkin(employee: str, direction: str, score: float = 0.95) -> Draft:
    body = {
        "employee_id": employee,
        "direction": direction,
        "latitude": STORE.latitude,
        "longitude": STORE.longitude,
        "accuracy_m": 8,
        "face_match_score": score,
    }
    return Draft("staff.checkin", "kiosk-1", orjson.dumps(body), driver="mqtt")


ROSTER = Roster.model_validate(
    {
        "staff": [
            {
                "staff_id": "e1",
                "name": "Chan Tai Man",
                "role": "sales",
                "shifts": [{"start": local(15, 17).isoformat(), "end": local(15, 21).isoformat()}],
            },
            {
                "staff_id": "e2",
                "name": "=HYPERLINK(1)",
                "role": "sales",
                "shifts": [{"start": local(15, 17).isoformat(), "end": local(15, 21).isoformat()}],
            },
        ]
    }
)


async def test_a_reported_day_is_served_as_csv(tmp_path: Path) -> None:
    time = Time()  # 2027-01-15 16:00 in Hong Kong
    engine = RuleEngine(
        [RULE.validate_python(RULE_DEF)],
        time.clock(),
        wall=lambda: time.wall,
        hours=StoreHours(HK),
        roster=roster,
        location=STORE,
    )
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal):
        await journal.transact(store_work("roster", ROSTER, "req-1", "roster:req-1"))
        await until(lambda: engine.roster is not None, "the engine reads the stored roster")
        time.advance(3600 + 10 * 60)  # 17:10: late
        journal.submit(checkin("e1", "in"))
        journal.submit(checkin("e1", "out", score=0.3))  # not accepted
        await until(
            lambda: journal.last_seq >= 5, "the check-ins and their alerts (late, needs_review) commit"
        )
        time.advance(3 * 3600 + 50 * 60)  # 21:00
        journal.submit(checkin("e1", "out"))
        await until(lambda: journal.last_seq >= 6, "committed")
        time.advance(4 * 3600 + 60)  # 01:01 the next day: the report is due

        def reported() -> bool:
            return bool(query(journal, "SELECT 1 FROM events WHERE kind='attendance.daily'"))

        await until(reported, "the day's summary commits")
        app = create_app(
            journal.path,
            TOKEN,
            Metrics(),
            lambda: {"status": "ok"},
            routers=[attendance_router(journal, engine)],
        )
        async with running(app) as (base, _), httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get("/api/attendance.csv?date=2027-01-15")).status_code == 401
            answer = await client.get("/api/attendance.csv", params={"date": "2027-01-15"}, headers=AUTH)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("text/csv")
            assert 'filename="attendance-2027-01-15.csv"' in answer.headers["content-disposition"]
            rows = list(csv.reader(io.StringIO(answer.text)))
            assert tuple(rows[0]) == COLUMNS
            assert rows[1:] == [
                [
                    "2027-01-15",
                    "e1",
                    "Chan Tai Man",
                    "2027-01-15T17:00:00+08:00",
                    "2027-01-15T21:00:00+08:00",
                    "2027-01-15T17:10:00+08:00",
                    "2027-01-15T21:00:00+08:00",
                    "230.0",
                    "late;needs_review",
                    "att",
                ],
                [
                    "2027-01-15",
                    "e2",
                    "'=HYPERLINK(1)",  # a name a spreadsheet would run as a formula is quoted
                    "2027-01-15T17:00:00+08:00",
                    "2027-01-15T21:00:00+08:00",
                    "",
                    "",
                    "0.0",
                    "no_show",
                    "att",
                ],
            ]
            assert "face" not in answer.text
            assert "latitude" not in answer.text
            missing = await client.get("/api/attendance.csv", params={"date": "2027-01-16"}, headers=AUTH)
            assert missing.status_code == 404
            for bad in ("2027-02-30", "yesterday", "2027-1-5", ""):
                refused = await client.get("/api/attendance.csv", params={"date": bad}, headers=AUTH)
                assert refused.status_code == 422, bad
            assert (await client.get("/api/attendance.csv", headers=AUTH)).status_code == 422


async def test_the_gateway_wires_the_rule_its_geofence_roster_and_route(tmp_path: Path) -> None:
    token = "t" * 24
    config_path = tmp_path / "store.yaml"
    config_path.write_text(
        "gateway_id: gw-01\n"
        "store: {id: hk-001, name: Shop, timezone: Asia/Hong_Kong,"
        " location: {latitude: 22.28, longitude: 114.184, geofence_radius_m: 60}}\n"
        "hq: {host: 127.0.0.1, port: 1}\n"  # no HQ: the gateway goes on without it
        f"data_dir: {tmp_path / 'data'}\n"
        "api: {port: 0, token: {env: TOKEN}}\n"
        "rules:\n  - {id: att, type: attendance}\n",
        encoding="utf-8",
    )
    config = load_config(config_path, env={"TOKEN": token})
    async with running_gateway(config, wait_drivers=False) as gateway:
        assert gateway.rules.location == config.store.location
        assert gateway.rules.hours.timezone == HK
        port = await gateway.wait_api()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            answer = await client.get(
                "/api/attendance.csv",
                params={"date": "2027-01-14"},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert answer.status_code == 404
        await gateway.journal.transact(store_work("roster", ROSTER, "req-1", "roster:req-1"))
        await until(lambda: gateway.rules.roster == ROSTER, "the engine reads HQ's roster")
