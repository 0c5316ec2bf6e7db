"""The rule engine in the real pipeline while the wall clock steps, and HQ's ``rules.set`` in an open window: an MQTT
fridge sensor -> mosquitto -> the gateway (``store-gateway run``, a separate process) -> its journal -> HQ.

The gateway's wall clock is stepped by tests/harness/wall_step.py (the machine's clock is left alone): +1 h in the
middle of one fridge's window must not fire its alert early, -1 h in another's must not delay it by an hour. Each
alert comes when its window ends on the monotonic clock. Then HQ sends the same rule in the middle of a window (the
window goes on), and a changed one while an alert is open (that alert is cleared, ``rule_changed``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.kernel.mqtt_client import MqttClient
from tests.cloud_bridge.test_downlink_e2e import hq_commands
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    GatewayProcess,
    HqView,
    broker_config,
    poll_until,
    running_receiver,
    write_config,
)
from tests.harness.wall_step import step

FOR_S = 12.0
SHIM = Path(__file__).resolve().parents[1] / "harness" / "wall_step.py"
RULE = {"id": "fridge-warm", "type": "temperature", "max_c": 8, "for_s": FOR_S, "clear_for_s": 0}


def events(db: Path, kind: str, device: str | None = None) -> list[dict[str, Any]]:
    """Committed events of a kind (and device, or an alert's subject), as envelopes, in seq order."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT body FROM events WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
    except sqlite3.Error:
        return []
    found = [orjson.loads(body) for (body,) in rows]
    if device is None:
        return found
    return [
        e
        for e in found
        if e["device_id"] == device
        or device in str(e["data"].get("alert_id") or e["data"].get("details", {}).get("alert_id"))
    ]


def wall(envelope: dict[str, Any]) -> float:
    return datetime.fromisoformat(envelope["recorded_at"].replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
async def test_wall_clock_steps_and_rules_set_in_a_window_leave_the_alerts_on_the_monotonic_clock(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    api_port = free_port()
    fridges = ("fridge-a", "fridge-b", "fridge-c")
    config = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=data_dir,
        api_port=api_port,
        devices=(),
        json_sensors=fridges,
        rules=[RULE],
    )
    offset = tmp_path / "wall-offset"
    step(offset, 0)
    gateway = GatewayProcess(config, api_port, tmp_path / "gateway.log", launcher=[str(SHIM), str(offset)])
    journal = data_dir / "journal.db"
    sensor = MqttClient(broker_config(store_broker), "sensor-fridges", clean_start=True)

    async def reading(fridge: str, celsius: float) -> None:
        await sensor.publish(f"store/sensor/{fridge}/state", orjson.dumps({"temperature": celsius}), qos=1)

    async def window(fridge: str, step_to: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """A warm reading opens the fridge's window; a third into it the wall clock steps; the alert comes."""
        await reading(fridge, 9.5)
        await poll_until(lambda: bool(events(journal, "sensor.sample", fridge)), f"{fridge}'s warm reading")
        await asyncio.sleep(FOR_S / 3)
        assert not events(journal, "alert.raised", fridge), (
            "the machine was too slow to step inside the window"
        )
        step(offset, step_to)
        await poll_until(
            lambda: bool(events(journal, "alert.raised", fridge)), f"{fridge}'s alert", within=60
        )
        return events(journal, "sensor.sample", fridge)[0], events(journal, "alert.raised", fridge)[0]

    async with running_receiver(hq_broker, tmp_path / "hq.db"), hq_commands(hq_broker) as hq:
        gateway.start()
        await gateway.wait_healthy()
        await sensor.connect()
        try:
            warm_a, raised_a = await window("fridge-a", 3600)  # +1 h a third into the window
            warm_b, raised_b = await window("fridge-b", 0)  # -1 h a third into the window

            # HQ sends the same rule a third into fridge-c's window: the window goes on.
            await reading("fridge-c", 9.5)
            await poll_until(lambda: bool(events(journal, "sensor.sample", "fridge-c")), "fridge-c warm")
            await asyncio.sleep(FOR_S / 3)
            same = await hq.ask("rs-same", "rules.set", {"rules": [RULE]})
            assert same["status"] == "ok", same
            stored = [e for e in events(journal, "document.updated") if e["data"]["request_id"] == "rs-same"]
            assert len(stored) == 1, "the rules document is committed once"
            await poll_until(lambda: bool(events(journal, "alert.raised", "fridge-c")), "fridge-c", within=60)
            warm_c, raised_c = (
                events(journal, "sensor.sample", "fridge-c")[0],
                events(journal, "alert.raised", "fridge-c")[0],
            )

            # A changed rule while the three alerts are open: each is cleared, rule_changed, and never raised again
            # by the old episode.
            changed = await hq.ask("rs-changed", "rules.set", {"rules": [{**RULE, "max_c": 10}]})
            assert changed["status"] == "ok", changed
            await poll_until(
                lambda: len(events(journal, "alert.cleared")) == 3, "the three clears", within=60
            )
            with HqView(tmp_path / "hq.db") as view:
                await poll_until(lambda: view.count("alert.cleared") == 3, "HQ has the clears", within=60)
                assert view.count("alert.raised") == 3
        finally:
            await sensor.disconnect()
            code = await gateway.terminate()
            gateway.close()
    assert code == 0

    # The steps reached the gateway: fridge-a's alert was stamped an hour after its reading, fridge-b's before it.
    assert wall(raised_a) - wall(warm_a) >= 3600
    assert wall(raised_b) < wall(warm_b)
    # Each alert came when its window ended on the monotonic clock: not before (the +1 h step did not fire it),
    # and not an hour late (the -1 h step did not hold it back: it came within the 60 s waited for it).
    for warm, raised in ((warm_a, raised_a), (warm_b, raised_b), (warm_c, raised_c)):
        assert raised["boot_id"] == warm["boot_id"]
        assert raised["mono_ns"] - warm["mono_ns"] >= FOR_S * 1e9, (warm, raised)
    # HQ's same rule, stored inside fridge-c's window, did not restart it: the alert came before a whole window
    # after rules.set.
    assert warm_c["mono_ns"] < stored[0]["mono_ns"] < raised_c["mono_ns"], (warm_c, stored[0], raised_c)
    assert raised_c["mono_ns"] < stored[0]["mono_ns"] + FOR_S * 1e9, (stored[0], raised_c)
    cleared = events(journal, "alert.cleared")
    assert sorted(c["data"]["alert_id"] for c in cleared) == [
        "fridge-warm/fridge-a/1",
        "fridge-warm/fridge-b/1",
        "fridge-warm/fridge-c/1",
    ]
    assert {c["data"]["reason"] for c in cleared} == {"rule_changed"}
    lags = [
        (r["mono_ns"] - w["mono_ns"]) / 1e9
        for w, r in ((warm_a, raised_a), (warm_b, raised_b), (warm_c, raised_c))
    ]
    print(
        f"\n[figures] rules across wall-clock steps: +1h alert after {lags[0]:.2f} s, -1h after {lags[1]:.2f} s,"
        f" same rules.set mid-window after {lags[2]:.2f} s (window {FOR_S} s)"
    )
