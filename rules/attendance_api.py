"""``GET /api/attendance.csv?date=YYYY-MM-DD``: a store-local day's attendance, for payroll (docs/API.md).

It is read from the day's committed ``attendance.daily`` events (a read-only snapshot of the journal), so it says
exactly what HQ received, and a day is there once the attendance rules reported it (after the day ended). Names
come from HQ's roster in force, when it has the employee; biometrics are never in it (the events have none).
"""

from __future__ import annotations

import csv
import io
import sqlite3
from datetime import date
from typing import Annotated, Any, Final

import orjson
from fastapi import APIRouter, HTTPException, Query, Response

from gateway.kernel.journal import Journal
from gateway.kernel.journal.reader import events_page
from rules.engine import RuleEngine

COLUMNS: Final = (
    "date",
    "employee_id",
    "name",
    "shift_start",
    "shift_end",
    "first_in",
    "last_out",
    "minutes_worked",
    "flags",
    "rule_id",
)
PAGE: Final = 200
PAGE_BYTES: Final = 8 * 1024 * 1024
FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
"""A cell starting with one of these is a formula to a spreadsheet: it is written with a leading quote."""


def attendance_router(journal: Journal, engine: RuleEngine) -> APIRouter:
    router = APIRouter()
    db_uri = journal.path.absolute().as_uri() + "?mode=ro"

    @router.get("/api/attendance.csv")
    def get_attendance(
        date_: Annotated[str, Query(alias="date", pattern=r"^\d{4}-\d{2}-\d{2}$")],
    ) -> Response:
        """One row per employee and shift of the day (and one for check-ins outside any shift)."""
        try:
            day = date.fromisoformat(date_).isoformat()
        except ValueError as err:
            raise HTTPException(status_code=422, detail="date: not a calendar date (YYYY-MM-DD)") from err
        try:
            reports = daily_reports(db_uri, day)
        except sqlite3.Error as err:
            raise HTTPException(status_code=503, detail="journal not available") from err
        if not reports:
            raise HTTPException(
                status_code=404, detail=f"no attendance reported for {day} (a day is reported after it ends)"
            )
        roster = engine.roster
        names = {s.staff_id: s.name for s in roster.staff} if roster is not None else {}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        for report in reports:
            for employee in report.get("employees", []):
                employee_id = str(employee.get("employee_id", ""))
                for shift in employee.get("shifts", []):
                    writer.writerow(
                        _cell(value)
                        for value in (
                            day,
                            employee_id,
                            names.get(employee_id, ""),
                            shift.get("start") or "",
                            shift.get("end") or "",
                            shift.get("first_in") or "",
                            shift.get("last_out") or "",
                            shift.get("minutes_worked", 0),
                            ";".join(shift.get("flags", [])),
                            report.get("rule_id", ""),
                        )
                    )
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="attendance-{day}.csv"'},
        )

    return router


def daily_reports(db_uri: str, day: str) -> list[dict[str, Any]]:
    """The committed ``attendance.daily`` events' data for a store-local day, in seq order."""
    found = []
    after = 0
    while True:
        bodies = events_page(db_uri, "attendance.daily", None, after, PAGE, PAGE_BYTES)
        for body in bodies:
            envelope = orjson.loads(body)
            after = max(after, int(envelope.get("seq", after)))
            data = envelope.get("data")
            if isinstance(data, dict) and data.get("date") == day:
                found.append(data)
        if not bodies:
            return found


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text
