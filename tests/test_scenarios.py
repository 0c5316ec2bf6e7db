"""Each shipped scenario against an in-process gateway, compressed to ~15 s: real mosquitto brokers, pymodbus
fridge controllers (TCP and RTU over a pty line), an RFID reader on a pty behind a by-id style link, MQTT
kiosks and shelves, and BLE advertisement bytes through the BLE driver's detection callback."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from drivers.ble.driver import BleDriver
from gateway.config import GatewayConfig
from gateway.runtime import Gateway
from simulators.scenario import ScenarioRun
from simulators.scenario_model import Scenario, available, load_scenario
from tests.brokers import Mosquitto
from tests.e2e_helpers import API_TOKEN, broker_config, poll_until, running_gateway

REAL_SECONDS = 15.0


def events(data_dir: Path, kind: str, device_id: str | None = None) -> list[dict[str, Any]]:
    sql = (
        "SELECT body FROM events WHERE kind = ?"
        + (" AND device_id = ?" if device_id else "")
        + " ORDER BY seq"
    )
    params = (kind, device_id) if device_id else (kind,)
    with contextlib.closing(sqlite3.connect(data_dir / "journal.db")) as db:
        return [orjson.loads(body) for (body,) in db.execute(sql, params)]


def quarantined(data_dir: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(data_dir / "journal.db")) as db:
        return dict(db.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())


def statuses(data_dir: Path, device_id: str) -> list[str]:
    return [e["data"]["status"] for e in events(data_dir, "device.status", device_id)]


def air_temperatures(data_dir: Path, device_id: str) -> list[float]:
    """The air probe of each poll of the temperatures group (other groups' samples do not carry it)."""
    samples = events(data_dir, "sensor.sample", device_id)
    return [
        float(e["data"]["values"]["air_temperature"])
        for e in samples
        if "air_temperature" in e["data"]["values"]
    ]


def compressed(name: str) -> Scenario:
    scenario = load_scenario(name)
    return scenario.model_copy(update={"time_scale": scenario.duration_s / REAL_SECONDS})


@contextlib.asynccontextmanager
async def scenario_store(
    tmp_path: Path, scenario: Scenario, store_broker: Mosquitto, hq_broker: Mosquitto
) -> AsyncIterator[tuple[ScenarioRun, Gateway]]:
    run = ScenarioRun(scenario, broker_config(store_broker), tmp_path)
    await run.prepare()
    try:
        sections = run.gateway_config()
        config = GatewayConfig.model_validate(
            {
                "gateway_id": "gw-1",
                "store": {"id": "hk-0042", "name": "Scenario store", "timezone": "Asia/Hong_Kong"},
                "data_dir": str(tmp_path / "data"),
                "store_broker": {"host": "127.0.0.1", "port": store_broker.port, "protocol": "3.1.1"},
                "hq": {"host": "127.0.0.1", "port": hq_broker.port},
                "api": {"enabled": True, "host": "127.0.0.1", "port": 0, "token": API_TOKEN},
                **sections,
            }
        )
        async with running_gateway(config, wait_drivers=False) as gateway:
            await poll_until(
                lambda: gateway.health()["drivers"].get("store-mqtt", True), "the MQTT intake to subscribe"
            )
            yield run, gateway
    finally:
        await run.close()


def ble_driver(gateway: Gateway) -> BleDriver | None:
    return next((d for d in gateway.intakes if isinstance(d, BleDriver)), None)


def test_every_shipped_scenario_loads() -> None:
    assert set(available()) >= {"normal-day", "fridge-failure-night", "garbage-flood", "device-unplugged"}
    for name in available():
        assert load_scenario(name).scenario == name


async def test_normal_day(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("normal-day")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        await poll_until(
            lambda: gateway.journal.delivered_seq == gateway.journal.last_seq, "HQ to have every event"
        )
    data = tmp_path / "data"
    assert len(events(data, "pos.sale")) + len(events(data, "pos.return")) == run.published["tills"]
    for device in ("fridge-dairy", "freezer-1", "chiller-probe", "backroom-ruuvi", "drinks-fridge"):
        assert events(data, "sensor.sample", device), f"no sensor.sample from {device}"
    freezer = air_temperatures(data, "freezer-1")
    assert freezer
    assert sorted(freezer)[len(freezer) // 2] < -12, freezer  # it holds, apart from its defrost
    checkins = events(data, "staff.checkin", "kiosk-staff")
    assert len(checkins) == 16
    assert all(
        set(c["data"])
        <= {"employee_id", "direction", "latitude", "longitude", "accuracy_m", "face_match_score"}
        for c in checkins
    )
    shelf = events(data, "rfid.inventory", "shelf-a1")
    # Five items leave the shelf: gone from the later windows (departed is reported after the profile's 30 s).
    assert len(shelf[0]["data"]["tags"]) == 40
    assert len(shelf[-1]["data"]["tags"]) == 35
    backroom = events(data, "rfid.inventory", "rfid-backroom")
    assert sum(len(e["data"]["appeared"]) for e in backroom) >= 40
    assert not quarantined(data)


async def test_fridge_failure_at_night(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("fridge-failure-night")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
    data = tmp_path / "data"
    scale = scenario.time_scale

    def air(event: dict[str, Any]) -> float:
        return float(event["data"]["values"]["air_temperature"])

    dairy = [
        e for e in events(data, "sensor.sample", "fridge-dairy") if "air_temperature" in e["data"]["values"]
    ]
    start_mono = dairy[0]["mono_ns"]

    def store_time(event: dict[str, Any]) -> float:
        return (event["mono_ns"] - start_mono) / 1e9 * scale

    before = [air(e) for e in dairy if store_time(e) < 6000]
    failing = [air(e) for e in dairy if 9000 < store_time(e) < 21000]
    assert before
    assert failing
    assert max(before) < 8
    assert max(failing) > 9, "the temperature did not climb while the compressor was down"
    assert air(dairy[-1]) < max(failing), "the temperature did not come down after the repair"
    assert all(-25 < t < -10 for t in air_temperatures(data, "freezer-1"))
    assert events(data, "sensor.sample", "dairy-logger")
    assert "error" not in statuses(data, "fridge-dairy")


async def test_garbage_flood(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("garbage-flood")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        broken = gateway.devices.get("pos-01")
        assert broken is not None
        await poll_until(
            lambda: sum(quarantined(tmp_path / "data").values()) + broken.health.rate_limited >= 2000,
            "every garbage message quarantined or counted",
        )
    data = tmp_path / "data"
    assert run.published["garbage"] == 2000
    reasons = quarantined(data)
    assert sum(reasons.values()) >= 100  # its burst: enough to debug it, not enough to flood the table
    assert set(reasons) <= {"not_json", "not_utf8", "not_object", "invalid"}
    for device in ("pos-01", "pos-02"):
        assert "rate_limited" in statuses(data, device)
    assert "rate_limited" not in statuses(data, "pos-03")
    sales = events(data, "pos.sale") + events(data, "pos.return")
    assert len(sales) <= run.published["tills"] + run.published["flood"]
    assert any(e["device_id"] == "pos-03" for e in sales)
    assert "error" not in statuses(data, "fridge-dairy")
    assert events(data, "sensor.sample", "fridge-dairy")


async def test_device_unplugged_and_plugged_back(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    scenario = compressed("device-unplugged")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        for device in ("rfid-backroom", "fridge-dairy"):
            await poll_until(
                lambda device=device: (
                    statuses(tmp_path / "data", device)[-1:] == ["online"]
                    and "error" in statuses(tmp_path / "data", device)
                ),
                f"{device} to fail and come back",
            )
    data = tmp_path / "data"
    assert len(events(data, "pos.sale")) + len(events(data, "pos.return")) == run.published["tills"]


def test_demo_runs_the_default_scenario_and_loses_nothing(tmp_path: Path) -> None:
    """The README's first command, bounded: every kind of simulated device reaches the journal and HQ."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "8", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for what in (
        "pos.sale",
        "sample fridge-dairy",
        "sample chiller-probe",
        "rfid   rfid-backroom",
        "checkin ",
    ):
        assert what in out, f"{what!r} missing from the demo's output"
    summary = out.strip().splitlines()[-1]
    assert summary.endswith("seq gaps at HQ: 0"), summary
    committed = int(summary.split("committed ")[1].split(" ")[0])
    received = int(summary.split("HQ received ")[1].split(",")[0])
    assert received == committed
