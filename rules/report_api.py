"""``GET /api/reports/daily?date=YYYY-MM-DD``: the ``report.daily`` made for a store-local day (docs/REPORTS.md),
as it was emitted, read from a snapshot of the journal (the last :data:`rules.report.KEEP_DAYS` days)."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, HTTPException, Query, Response

from gateway.kernel.journal.reader import snapshot
from rules.haccp_report import check_day
from rules.report import stored_report

DATE: Final = r"^\d{4}-\d{2}-\d{2}$"


def report_router(journal_path: Path) -> APIRouter:
    router = APIRouter()
    db_uri = journal_path.absolute().as_uri() + "?mode=ro"

    @router.get("/api/reports/daily")
    def get_daily_report(date_: Annotated[str, Query(alias="date", pattern=DATE)]) -> Response:
        """The day's report (JSON, the event's ``data``); 404 for a day not (yet) reported."""
        try:
            day = check_day(date.fromisoformat(date_)).isoformat()
        except ValueError as err:
            raise HTTPException(
                status_code=422, detail=f"not a date a report can have: {date_} ({err})"
            ) from err
        try:
            with snapshot(db_uri) as conn:
                body = stored_report(conn, day)
        except sqlite3.Error as err:
            raise HTTPException(status_code=503, detail="journal not available") from err
        if body is None:
            raise HTTPException(
                status_code=404, detail=f"no report of {day} (a day is reported at report.at the day after)"
            )
        return Response(body, media_type="application/json")

    return router
