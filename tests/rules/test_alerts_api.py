"""Open alerts in the local API over real HTTP, their acknowledgement (API and the HQ command handler), and what
the rule engine keeps of it; on a real journal with its writer running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest

from cloud_bridge.commands import AlertAck, CommandError, Request
from gateway.api import create_app
from gateway.kernel.metrics import Metrics
from rules.alerts import alerts_router
from rules.clock import RuleClock
from rules.commands import rule_handlers
from rules.engine import RuleEngine
from tests.gateway.test_api import AUTH, TOKEN, running
from tests.gateway.test_journal import new_journal, query, until
from tests.gateway.test_journal import running as journal_running
from tests.rules.test_in_journal import RULES, sample


async def test_open_alerts_are_listed_and_acknowledged_once_committed(tmp_path: Path) -> None:
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal):
        journal.submit(sample(9.0))
        await until(lambda: journal.last_seq >= 2, "the alert commits")
        app = create_app(
            journal.path, TOKEN, Metrics(), lambda: {"status": "ok"}, routers=[alerts_router(journal, engine)]
        )
        async with running(app) as (base, _), httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get("/api/alerts")).status_code == 401
            [alert] = (await client.get("/api/alerts", headers=AUTH)).json()
            assert alert == {
                "alert_id": "dairy-warm/fridge-1/1",
                "rule_id": "dairy-warm",
                "rule": "temperature",
                "subject": "fridge-1",
                "episode": 1,
                "recovering": False,
                "acknowledged": None,
                "severity": "warning",
            }
            missing = await client.post(
                "/api/alerts/dairy-warm/fridge-1/7/ack", json={"role": "manager"}, headers=AUTH
            )
            assert missing.status_code == 404
            body = {"note": "moved the milk to the walk-in", "role": "manager"}
            done = await client.post("/api/alerts/dairy-warm/fridge-1/1/ack", json=body, headers=AUTH)
            assert done.status_code == 200, done.text
            assert done.json() == {"alert_id": "dairy-warm/fridge-1/1", "seq": 3}
            await until(lambda: bool(engine._tracks[("dairy-warm", "fridge-1")].data.get("ack")), "noted")
            [alert] = (await client.get("/api/alerts", headers=AUTH)).json()
            assert alert["acknowledged"] == {
                "seq": 3,
                "note": "moved the milk to the walk-in",
                "role": "manager",
                "via": "api",
                "by": None,
            }
            bad = await client.post(
                "/api/alerts/dairy-warm/fridge-1/1/ack", json={"role": "", "x": 1}, headers=AUTH
            )
            assert bad.status_code == 422
    event = orjson.loads(query(journal, "SELECT body FROM events WHERE seq=3")[0][0])
    assert (event["kind"], event["data"]["via"]) == ("alert.acknowledged", "api")


async def test_hq_acknowledges_with_the_alert_ack_command(tmp_path: Path) -> None:
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal):
        journal.submit(sample(9.0))
        await until(lambda: journal.last_seq >= 2, "the alert commits")
        handler = rule_handlers(journal)["alert.ack"]

        def request(alert_id: str) -> Request:
            return Request("req-1", "alert.ack", AlertAck(alert_id=alert_id, note="door shut"), "hq-a", 0, 1)

        assert await handler.run(request("dairy-warm/fridge-1/1")) == (
            "ok",
            {"alert_id": "dairy-warm/fridge-1/1", "seq": 3},
        )
        with pytest.raises(CommandError) as refused:
            await handler.run(request("dairy-warm/fridge-1/2"))
        assert refused.value.code == "invalid_args"
        await asyncio.sleep(0)
    event = orjson.loads(query(journal, "SELECT body FROM events WHERE seq=3")[0][0])["data"]
    assert (event["role"], event["via"], event["note"]) == ("hq", "hq", "door shut")


async def test_an_acknowledgement_ends_with_its_episode_and_a_replayed_command_is_a_duplicate(
    tmp_path: Path,
) -> None:
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal):
        journal.submit(sample(9.0))
        await until(lambda: journal.last_seq >= 2, "raised")
        handler = rule_handlers(journal)["alert.ack"]
        ack = Request(
            "req-9", "alert.ack", AlertAck(alert_id="dairy-warm/fridge-1/1", note="n"), "hq-a", 0, 1
        )
        assert (await handler.run(ack))[0] == "ok"
        assert await handler.run(ack) == ("duplicate", {"alert_id": "dairy-warm/fridge-1/1", "seq": None})
        journal.submit(sample(5.0))
        journal.submit(sample(9.0))
        await until(
            lambda: (
                ("dairy-warm", "fridge-1") in engine._tracks
                and engine._tracks[("dairy-warm", "fridge-1")].episode == 2
            ),
            "next",
        )
        assert "ack" not in engine._tracks[("dairy-warm", "fridge-1")].data
    assert len(query(journal, "SELECT 1 FROM events WHERE kind='alert.acknowledged'")) == 1
