"""The alerts in the local API: ``GET /api/alerts`` lists the open ones, ``POST /api/alerts/{id}/ack``
acknowledges one (the note is the corrective action, for the HACCP log).

An acknowledgement is an ``alert.acknowledged`` event: it commits like any event, goes to HQ, and reaches the rule
engine through the pipeline, which notes it on the open alert.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Response
from fastapi import Path as PathParam
from pydantic import Field

from gateway.kernel.events import AlertAcknowledged
from gateway.kernel.journal import Journal
from gateway.kernel.journal.reader import snapshot
from gateway.kernel.model import StrictModel
from rules.acks import acknowledge
from rules.engine import RuleEngine, open_alerts

ALERT_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[^\x00-\x1f\x7f]{1,150}/[0-9]{1,9}$"
"""<rule id>/<subject>/<episode>; subjects may hold spaces and any script (an employee id, a shelf): percent-encode
them in the URL."""


class Acknowledgement(StrictModel):
    """The body of ``POST /api/alerts/{id}/ack``."""

    note: Annotated[str, Field(max_length=1000)] = ""
    role: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]


def alerts_router(journal: Journal, engine: RuleEngine) -> APIRouter:
    router = APIRouter()
    db_uri = journal.path.absolute().as_uri() + "?mode=ro"

    @router.get("/api/alerts")
    def get_alerts() -> Response:
        """The open alerts, with their rule's severity and any acknowledgement."""
        with _read(), snapshot(db_uri) as conn:
            alerts = open_alerts(conn)
        for alert in alerts:
            rule = engine.rules.get(alert["rule_id"])
            alert["severity"] = rule.severity if rule is not None else None
        return Response(orjson.dumps(alerts), media_type="application/json")

    @router.post("/api/alerts/{alert_id:path}/ack")
    async def post_ack(
        alert_id: Annotated[str, PathParam(max_length=200, pattern=ALERT_ID)], body: Acknowledgement
    ) -> Response:
        """Acknowledge an open alert: 200 with the event's seq once committed; 404 if no such alert is open."""
        with _read(), snapshot(db_uri) as conn:
            found = any(a["alert_id"] == alert_id for a in open_alerts(conn))
        if not found:
            raise HTTPException(status_code=404, detail=f"no open alert {alert_id}")
        ack = AlertAcknowledged(alert_id=alert_id, note=body.note, role=body.role, via="api")
        seq = await acknowledge(journal, ack)
        return Response(orjson.dumps({"alert_id": alert_id, "seq": seq}), media_type="application/json")

    return router


@contextlib.contextmanager
def _read() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as err:
        raise HTTPException(status_code=503, detail="journal not available") from err
