"""The demo's chat robot over real HTTP, signed by the gateway's own DingTalk signer, and the demo's live view of
alerts raised and cleared and of the robot's messages."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping

import httpx
import orjson

from gateway.kernel.journal import Committed
from rules.notify import dingtalk_url
from simulators.chat import ChatRobot, signature_problem
from simulators.demo import LiveView
from simulators.scenario_model import load_scenario

TEXT = {"msgtype": "text", "text": {"content": "[ALERT·critical] fridge-dairy: above 8 °C (Demo Store)"}}


async def test_the_robot_takes_what_the_gateway_signs_and_refuses_the_rest() -> None:
    shown: list[str] = []
    async with ChatRobot(shown.append).serving() as robot, httpx.AsyncClient(timeout=10) as client:
        now_ms = int(time.time() * 1000)

        async def post(url: str, body: bytes = orjson.dumps(TEXT)) -> httpx.Response:
            return await client.post(url, content=body, headers={"Content-Type": "application/json"})

        answer = await post(dingtalk_url(robot.url, robot.secret, now_ms))
        assert answer.status_code == 200
        assert answer.json() == {"errcode": 0, "errmsg": "ok"}
        assert shown == [TEXT["text"]["content"]]  # type: ignore[index]

        wrong_secret = await post(dingtalk_url(robot.url, "SEC-not-the-robots", now_ms))
        two_hours_old = await post(dingtalk_url(robot.url, robot.secret, now_ms - 2 * 3600 * 1000))
        unsigned = await post(robot.url)
        wrong_token = await post(dingtalk_url(robot.url.replace("=", "=x"), robot.secret, now_ms))
        assert [r.json()["errcode"] for r in (wrong_secret, two_hours_old, unsigned, wrong_token)] == [
            310000,
            310000,
            310000,
            300001,
        ]
        signed = dingtalk_url(robot.url, robot.secret, now_ms)
        for body in (b"\xff not json", b"[]", b'{"msgtype": "markdown"}', b'{"msgtype": "text", "text": 5}'):
            assert (await post(signed, body)).status_code == 400
        assert len(shown) == 1
        assert robot.refused == {
            "sign does not match": 1,
            "timestamp is more than an hour from the robot's clock": 1,
            "timestamp is not milliseconds": 1,
            "token is not exist": 1,
            "not a text message": 4,
        }


def test_a_signature_within_the_hour_matches_only_with_the_secret() -> None:
    url = dingtalk_url("http://127.0.0.1/robot/send?access_token=t", "SECabc", 1_700_000_000_000)
    query = httpx.URL(url).params
    stamp, sign = query["timestamp"], query["sign"]
    assert signature_problem("SECabc", stamp, sign, 1_700_000_000_000 + 3_599_000) is None
    assert signature_problem("SECabc", stamp, sign, 1_700_000_000_000 + 3_601_000) is not None
    assert signature_problem("SECabd", stamp, sign, 1_700_000_000_000) == "sign does not match"
    assert signature_problem("SECabc", "12e3", sign, 1_700_000_000_000) == "timestamp is not milliseconds"


def envelope(seq: int, kind: str, data: Mapping[str, object]) -> bytes:
    return orjson.dumps({"seq": seq, "kind": kind, "device_id": None, "data": data})


def test_the_view_shows_alerts_raised_and_cleared_and_the_chat() -> None:
    out = io.StringIO()
    view = LiveView(out, load_scenario("fridge-failure-night"), verbose=True)
    raised = {
        "rule": "temperature",
        "severity": "warning",
        "subject": "fridge-dairy",
        "message": "fridge-dairy: above 8 °C for 15 min",
        "details": {"alert_id": "dairy-warm/fridge-dairy/1"},
    }
    view.gateway(Committed(1, 1, bodies=[envelope(1, "alert.raised", raised)]))
    view.chat("[ALERT·warning] fridge-dairy: above 8 °C for 15 min (Demo Store)")
    assert "1 alert(s) open" in "\n".join(view.screen())
    cleared = {
        "rule": "temperature",
        "subject": "fridge-dairy",
        "alert_id": "dairy-warm/fridge-dairy/1",
        "reason": "recovered",
        "message": "fridge-dairy: back below 6 °C",
    }
    view.gateway(Committed(2, 2, bodies=[envelope(2, "alert.cleared", cleared)]))
    lines = out.getvalue()
    assert "ALERT  temperature: fridge-dairy: above 8 °C for 15 min" in lines
    assert "CLEARED temperature: fridge-dairy: back below 6 °C" in lines
    assert "chat     [ALERT·warning] fridge-dairy" in lines
    screen = "\n".join(view.screen())
    assert "temperature cleared: fridge-dairy: back below 6 °C" in screen
    assert "alert(s) open" not in screen
    assert "[ALERT·warning] fridge-dairy: above 8 °C for 15 min (Demo Store)" in screen.split("Chat")[1]
    assert "1 alert(s) raised and 1 cleared" in view.summary(2, 0)
