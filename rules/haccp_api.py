"""``GET /api/haccp?device=&date=YYYY-MM-DD&format=json|csv``: one fridge's HACCP temperature log for one
store-local day (docs/HACCP.md), read from a snapshot of the journal."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Annotated, Final, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from gateway.kernel.journal.reader import snapshot
from gateway.kernel.rule_config import RuleDefinition
from rules.haccp import HaccpConfig
from rules.haccp_report import as_csv, as_json, build_report, check_day

DEVICE: Final = r"^[\x21-\x7e]{1,64}$"
DATE: Final = r"^\d{4}-\d{2}-\d{2}$"


def haccp_router(
    journal_path: Path,
    *,
    store_id: str,
    store_name: str,
    timezone: str,
    config: HaccpConfig,
    rules: Callable[[], Sequence[RuleDefinition]],
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """``rules``: the rules in force now (the engine's), for the limit printed in the log's header."""
    router = APIRouter()
    db_uri = journal_path.absolute().as_uri() + "?mode=ro"

    @router.get("/api/haccp")
    def get_haccp(
        device: Annotated[str, Query(pattern=DEVICE)],
        date_: Annotated[str, Query(alias="date", pattern=DATE)],
        format_: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
    ) -> Response:
        """The log: JSON (default) or CSV; 404 for a device the log knows nothing of."""
        try:
            day = check_day(date.fromisoformat(date_))
        except ValueError as err:
            raise HTTPException(
                status_code=422, detail=f"not a date the log can have: {date_} ({err})"
            ) from err
        try:
            with snapshot(db_uri) as conn:
                conn.execute("BEGIN")  # one snapshot for intervals and excursions
                report = build_report(
                    conn,
                    device,
                    day,
                    store_id=store_id,
                    store_name=store_name,
                    timezone=timezone,
                    config=config,
                    rules=rules(),
                    now=clock(),
                )
        except sqlite3.Error as err:
            raise HTTPException(status_code=503, detail="journal not available") from err
        if report is None:
            raise HTTPException(status_code=404, detail=f"no temperature log of device {device}")
        if format_ == "csv":
            name = f"haccp-{device}-{day.isoformat()}.csv".replace('"', "")
            return Response(
                as_csv(report).encode(),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{name}"'},
            )
        return Response(as_json(report), media_type="application/json")

    return router
