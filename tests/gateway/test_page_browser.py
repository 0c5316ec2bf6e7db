"""The local page in a real browser (headless Chromium, Debian's, driven by Playwright) against a real gateway process:
a fridge's failure appears as an alert without a reload, a manager acknowledges it with a note that the HACCP log
download carries; a viewer's acknowledgement is refused by the server; the page reconnects by itself across a
gateway restart. And the normal-day scenario's store: every simulated device on the page, and the screenshots at
phone and desktop sizes that README shows (docs/screenshots/: ``STOREGW_SCREENSHOTS=1 pytest -k normal_day``
writes them there)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest

from gateway.api.session import token_sha256
from gateway.kernel.mqtt_client import MqttClient
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import API_TOKEN, GatewayProcess, broker_config, gateway_process, poll_until

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
MANAGER, VIEWER = "manager-token-0123456789abcdef", "viewer-token-0123456789abcdef"
USERS = [
    {"name": "May Chan", "role": "manager", "token_sha256": token_sha256(MANAGER)},
    {"name": "Vic Lee", "role": "viewer", "token_sha256": token_sha256(VIEWER)},
]
WARM = {"id": "dairy-warm", "type": "temperature", "max_c": 8, "for_s": 3, "clear_for_s": 0}
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1366, "height": 900}


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.skip("no chromium: run .ci/run, or apt-get install chromium")
    async with playwright_api.async_playwright() as play:
        launched = await play.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


async def log_in(browser: Any, base: str, token: str, viewport: dict[str, int] = DESKTOP) -> Any:
    context = await browser.new_context(viewport=viewport, locale="en-GB")
    page = await context.new_page()
    await page.goto(f"{base}/ui")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_selector("body[data-ready='1']")
    return page


def store_gateway(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto, **config: Any
) -> GatewayProcess:
    """A gateway process (not started yet) with the page's users, on brokers of this test."""
    return gateway_process(tmp_path, store_broker, hq_broker, api_users=USERS, **config)


@pytest.mark.slow
async def test_a_fridge_alert_appears_is_acknowledged_and_the_page_survives_a_restart(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path, browser: Any
) -> None:
    gateway = store_gateway(
        tmp_path, store_broker, hq_broker, devices=(), json_sensors=("fridge-dairy",), rules=[WARM]
    )
    sensor = MqttClient(broker_config(store_broker), "sensor-fridge", clean_start=True)

    async def reading(celsius: float) -> None:
        payload = orjson.dumps({"temperature": celsius})
        await sensor.publish("store/sensor/fridge-dairy/state", payload, qos=1)

    gateway.start()
    try:
        await gateway.wait_healthy()
        await sensor.connect()
        manager = await log_in(browser, gateway.base_url, MANAGER)
        viewer = await log_in(browser, gateway.base_url, VIEWER)
        await manager.evaluate("window.sameDocument = true")  # gone if the page reloads
        assert await manager.locator("#alerts").inner_text()

        # The fridge warms up: the alert comes to the open page by itself.
        await reading(4.0)
        await reading(9.5)
        card = manager.locator("article.alert[data-alert-id='dairy-warm/fridge-dairy/1']")
        await card.wait_for(timeout=60_000)
        assert await manager.evaluate("window.sameDocument") is True

        # A viewer sees it, has no form, and the server refuses the viewer's acknowledgement anyway.
        await viewer.locator("article.alert[data-alert-id='dairy-warm/fridge-dairy/1']").wait_for(
            timeout=30_000
        )
        assert await viewer.locator("form.ack").count() == 0
        refused = await viewer.evaluate(
            """async () => {
                const csrf = JSON.parse(document.getElementById('boot').textContent).csrf;
                const r = await fetch('/ui/alerts/dairy-warm/fridge-dairy/1/ack', {method: 'POST',
                    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
                    body: JSON.stringify({note: 'not mine to say'})});
                return r.status;
            }"""
        )
        assert refused == 403
        forged = await manager.evaluate(
            """async () => (await fetch('/ui/alerts/dairy-warm/fridge-dairy/1/ack', {method: 'POST',
                headers: {'Content-Type': 'application/json'}, body: '{"note": "no csrf"}'})).status"""
        )
        assert forged == 403, "a POST without the CSRF token is refused"

        # The manager acknowledges it with the corrective action.
        note = "Moved the milk to the walk-in; service called"
        await card.locator("textarea").fill(note)
        await card.locator("button[type=submit]").click()
        await manager.locator("article.alert.acked[data-alert-id='dairy-warm/fridge-dairy/1']").wait_for()
        audit = manager.locator("#audit")
        await audit.get_by_text("May Chan").first.wait_for()

        # The note is in the HACCP log the page offers for today (the store's day).
        today = datetime.now(ZoneInfo("Asia/Hong_Kong")).date().isoformat()
        await manager.fill("#day", today)
        await manager.dispatch_event("#day", "change")
        await poll_until(
            lambda: manager.locator("#fridge option[value='fridge-dairy']").count(),
            "the fridge in the downloads",
        )
        await manager.select_option("#fridge", "fridge-dairy")
        async with manager.expect_download() as info:
            await manager.click("#haccp-link")
        download = await info.value
        saved = tmp_path / "haccp.csv"
        await download.save_as(saved)
        csv_text = await asyncio.to_thread(saved.read_text, encoding="utf-8")
        assert note in csv_text
        assert "May Chan (manager)" in csv_text, "who acknowledged it, by name and role"

        # A restart: the page says it lost the gateway, then carries on by itself, same document, same login.
        assert await gateway.terminate() == 0
        await manager.locator("#offline").wait_for(timeout=30_000)
        gateway.start()
        await gateway.wait_healthy()
        await manager.locator("#offline").wait_for(state="detached", timeout=60_000)
        assert await manager.evaluate("window.sameDocument") is True
        await manager.locator("article.alert.acked[data-alert-id='dairy-warm/fridge-dairy/1']").wait_for()
    finally:
        await sensor.disconnect()
        if gateway.running:
            await gateway.terminate()
        gateway.close()


async def test_login_refuses_a_wrong_token_and_only_an_admin_sees_the_config(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path, browser: Any
) -> None:
    gateway = store_gateway(tmp_path, store_broker, hq_broker)
    gateway.start()
    try:
        await gateway.wait_healthy()
        context = await browser.new_context(locale="zh-HK")
        page = await context.new_page()
        await page.goto(f"{gateway.base_url}/ui")
        assert await page.locator("html").get_attribute("lang") == "zh-Hant", (
            "a Hong Kong browser reads Chinese"
        )
        await page.fill("#token", "not-a-token-anyone-has")
        await page.click("button[type=submit]")
        await page.locator(".error").wait_for()
        cookies = await context.cookies()
        assert not any(c["name"] == "sg_session" for c in cookies)
        await page.click("a[href='/ui/lang/en']")
        assert await page.locator("html").get_attribute("lang") == "en"

        manager = await log_in(browser, gateway.base_url, MANAGER)
        assert await manager.locator("#config").count() == 0
        assert (await manager.request.get(f"{gateway.base_url}/ui/config")).status == 403
        cookie = next(c for c in await manager.context.cookies() if c["name"] == "sg_session")
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"

        # A POST from another site is refused even with the cookie and the CSRF token; so is a login from there.
        csrf = await manager.evaluate("JSON.parse(document.getElementById('boot').textContent).csrf")
        sent = {"Cookie": f"sg_session={cookie['value']}", "X-CSRF-Token": csrf}
        async with httpx.AsyncClient(base_url=gateway.base_url) as client:
            cross = await client.post("/ui/logout", headers={**sent, "Origin": "http://evil.example"})
            assert cross.status_code == 403
            login = await client.post(
                "/ui/login", data={"token": MANAGER}, headers={"Origin": "http://evil.example"}
            )
            assert login.status_code == 403
            assert (
                await client.post("/ui/logout", headers={**sent, "Origin": gateway.base_url})
            ).status_code == 204
            assert (await client.get("/ui/state", headers=sent)).status_code == 401, "logged out for good"

        admin = await log_in(browser, gateway.base_url, API_TOKEN)
        await admin.click("#config button")
        await admin.locator("#config-report.ok").wait_for()
        assert "OK:" in await admin.locator("#config-report").inner_text()
    finally:
        await gateway.terminate()
        gateway.close()


async def scenario_page(browser: Any, base: str, viewport: dict[str, int]) -> Any:
    return await log_in(browser, base, API_TOKEN, viewport)


@pytest.mark.slow
async def test_the_normal_day_store_shows_every_device_and_the_screenshots_are_taken(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto, browser: Any
) -> None:
    from tests.simulators.test_scenarios import ble_driver, compressed, scenario_store

    scenario = compressed("normal-day")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        base = f"http://127.0.0.1:{gateway.api_port}"
        playing = asyncio.create_task(run.run(ble_driver(gateway)))
        try:
            page = await scenario_page(browser, base, DESKTOP)
            expected = {d["device_id"] for d in gateway.devices.snapshot()}
            assert len(expected) >= 8
            for device in sorted(expected):
                await page.locator(f"#devices button.device[data-device='{device}']").wait_for()
            await poll_until(
                lambda: page.locator("#coldchain .fridge").count(), "a fridge on the page", within=120
            )
            await playing
            # README's screenshots, when asked for (STOREGW_SCREENSHOTS=1); otherwise the test's own folder.
            shots = SCREENSHOTS if os.environ.get("STOREGW_SCREENSHOTS") == "1" else tmp_path
            await page.screenshot(path=str(shots / "desktop.png"), full_page=True)
            phone = await scenario_page(browser, base, PHONE)
            await phone.locator("#coldchain .fridge").first.wait_for()
            await phone.screenshot(path=str(shots / "phone.png"), full_page=False)
        finally:
            if not playing.done():
                playing.cancel()
