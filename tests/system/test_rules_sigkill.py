"""The rule engine in the real pipeline, with crashes: an MQTT fridge sensor -> mosquitto -> the gateway
(``store-gateway run``, a separate process) -> its journal -> HQ. SIGKILL in the middle of a duration window:
the alert fires once, at its original due time (not a full window after the restart); SIGKILL while the alert
is open: no second alert.raised, and the clear still comes."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.kernel.mqtt_client import MqttClient
from tests.gateway.test_cli import SCRIPT
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    STORE_ID,
    GatewayProcess,
    HqView,
    broker_config,
    poll_until,
    running_receiver,
    write_config,
)

FRIDGE = "fridge-dairy"
FOR_S = 8.0


def alerts(db: Path) -> list[tuple[int, str, dict[str, object]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT seq, kind, body FROM events WHERE kind LIKE 'alert.%' ORDER BY seq"
        ).fetchall()
    return [(seq, kind, orjson.loads(body)["data"]) for seq, kind, body in rows]


@pytest.mark.slow
async def test_sigkill_mid_window_and_while_open_raises_once_on_time_and_still_clears(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    data_dir = tmp_path / "data"
    api_port = free_port()
    rule = {
        "id": "dairy-warm",
        "type": "temperature",
        "max_c": 8,
        "for_s": FOR_S,
        "clear_for_s": 0,
        "notify": ["ops"],
    }
    # A chat channel that cannot be reached: its consumer retries all along, and must not hold up a stop.
    channel = {"id": "ops", "type": "slack", "url": f"http://127.0.0.1:{free_port()}/hook"}
    config = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=data_dir,
        api_port=api_port,
        devices=(),
        json_sensors=(FRIDGE,),
        rules=[rule],
        notifications={"channels": [channel]},
    )
    gateway = GatewayProcess(config, api_port, tmp_path / "gateway.log")
    journal = data_dir / "journal.db"
    sensor = MqttClient(broker_config(store_broker), "sensor-fridge-dairy", clean_start=True)
    topic = f"store/sensor/{FRIDGE}/state"

    async def reading(celsius: float) -> None:
        await sensor.publish(topic, orjson.dumps({"temperature": celsius}), qos=1)

    async with running_receiver(hq_broker, tmp_path / "hq.db"):
        gateway.start()
        await gateway.wait_healthy()
        await sensor.connect()
        try:
            await reading(9.5)  # too warm: the window opens
            await poll_until(
                lambda: bool(_kinds(journal, "sensor.sample")), "the first warm reading is committed"
            )
            window_opened = time.monotonic()
            await asyncio.sleep(FOR_S / 3)
            gateway.kill()  # SIGKILL, a third into the window
            gateway.start()
            await gateway.wait_healthy()
            healthy_after = time.monotonic() - window_opened
            await poll_until(lambda: bool(_kinds(journal, "alert.raised")), "the alert", within=60)
            raised_after = time.monotonic() - window_opened
            record_property("raised_after_s", round(raised_after, 2))
            # The chat channel cannot be reached: /health names why its message waits (status stays ok).
            async with httpx.AsyncClient() as client:

                async def held_up() -> bool:
                    health = (await client.get(f"{gateway.base_url}/health")).json()
                    return bool(health["consumers"]["notify-ops"]["error"] == "ConnectError")

                await poll_until(held_up, "/health shows the channel held up", within=60)
            gateway.kill()  # SIGKILL while the alert is open
            gateway.start()
            await gateway.wait_healthy()
            await reading(9.8)
            await reading(4.0)  # recovered
            await poll_until(lambda: bool(_kinds(journal, "alert.cleared")), "the clear", within=60)
            with HqView(tmp_path / "hq.db") as view:
                await poll_until(lambda: view.count("alert.cleared") >= 1, "HQ has the clear", within=60)
                assert view.count("alert.raised") == 1
                samples = len(_kinds(journal, "sensor.sample"))
                await poll_until(
                    lambda: view.count("sensor.sample") >= samples, "HQ has every reading", within=60
                )
        finally:
            await sensor.disconnect()
            code = await gateway.terminate()
            gateway.close()
    assert code == 0, "a stop with a channel still retrying must be clean"
    assert "stopped cleanly" in (tmp_path / "gateway.log").read_text()
    found = alerts(journal)
    assert [kind for _, kind, _ in found] == ["alert.raised", "alert.cleared"], found
    raised = found[0][2]
    assert raised["details"]["alert_id"] == "dairy-warm/fridge-dairy/1"  # type: ignore[index]
    assert found[1][2]["alert_id"] == "dairy-warm/fridge-dairy/1"
    # The timer carried on across the kill: the alert came before a whole window had passed since the restart
    # was up (a timer started afresh would need FOR_S after it). An ordering, not a timing bound.
    assert raised_after < healthy_after + FOR_S, (raised_after, healthy_after)
    print(f"\n[figures] rules across SIGKILL: raised_after_s={raised_after:.2f} (window {FOR_S} s)")

    # Live equals replay, from HQ's copy: the alerts the rules make of the store's events as HQ holds them
    # (crashes and restarts included) are the ones the store raised and cleared.
    exported = subprocess.run(  # noqa: ASYNC221 - the test is over; nothing else runs
        [SCRIPT, "hq-receiver", "export", "--store", STORE_ID, "--db", str(tmp_path / "hq.db")],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    (tmp_path / "events.jsonl").write_bytes(exported)
    (tmp_path / "rules.yaml").write_text(orjson.dumps({"rules": [rule]}).decode())
    replayed = subprocess.run(  # noqa: ASYNC221
        [SCRIPT, "rules", "test", str(tmp_path / "rules.yaml"), "--events", str(tmp_path / "events.jsonl")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert [line.split()[1:3] for line in replayed] == [
        ["raised", "dairy-warm/fridge-dairy/1"],
        ["cleared", "dairy-warm/fridge-dairy/1"],
    ], replayed


def _kinds(db: Path, kind: str) -> list[int]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [r[0] for r in conn.execute("SELECT seq FROM events WHERE kind = ?", (kind,))]
    except sqlite3.Error:
        return []
