"""Each shipped scenario against an in-process gateway, compressed to ~15 s: real mosquitto brokers, pymodbus
fridge controllers (TCP and RTU over a pty line), an RFID reader on a pty behind a by-id style link, MQTT
kiosks and shelves, and BLE advertisement bytes through the BLE driver's detection callback. A scenario's
alert expectations are checked against the alerts its rules raised and cleared in the journal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from drivers.ble.driver import BleDriver
from drivers.sink import QUOTA_ROWS
from gateway.config import GatewayConfig
from gateway.config_loader import config_hash
from gateway.kernel.clock import ClockState
from gateway.runtime import Gateway
from simulators.hq import SimulatedHq
from simulators.scenario import ScenarioRun
from simulators.scenario_model import (
    AlertExpectation,
    Scenario,
    ScenarioError,
    alert_outcome,
    available,
    load_scenario,
    reached,
    scenario_dir,
)
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import (
    API_TOKEN,
    HQ_SIGNER,
    broker_config,
    hq_command_keys,
    poll_until,
)

REAL_SECONDS = 15.0
LOCATION = {"latitude": 22.2800, "longitude": 114.1830, "geofence_radius_m": 100}
"""The scenario store's location, as the demo's: the kiosks check staff in around it."""


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


def compressed(name: str, real_s: float = REAL_SECONDS) -> Scenario:
    """The scenario played in about ``real_s``; at its own time_scale when its rules' durations, divided by
    that much, would fall below their rules' minimums (those in real time)."""
    scenario = load_scenario(name)
    scale = scenario.duration_s / real_s
    if scenario.scale_problems(scale):
        return scenario
    return scenario.model_copy(update={"time_scale": scale})


@contextlib.asynccontextmanager
async def running_store_gateway(config: GatewayConfig) -> AsyncIterator[Gateway]:
    """The gateway as a task, trusting this machine's wall clock (a store's synchronised box): the attendance
    rule reads times of day only from a synchronised clock."""
    gateway = Gateway(config, config_hash(config), clock=ClockState(override=True))
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop), name="scenario-gateway")
    try:
        await poll_until(lambda: task.done() or gateway.started.is_set(), "the gateway to start")
        if task.done():
            task.result()
            raise AssertionError("the gateway returned before it started")
        yield gateway
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


def alert_events(data_dir: Path) -> list[dict[str, Any]]:
    return events(data_dir, "alert.raised") + events(data_dir, "alert.cleared")


async def expected_alerts(scenario: Scenario, data_dir: Path) -> None:
    """Wait until each expected alert count is reached (the journal may still be committing the last of them),
    then check every expectation holds exactly, and no rule of the scenario raised anything unexpected."""
    for expected in scenario.alert_expectations():

        def counted(expected: AlertExpectation = expected) -> bool:
            return reached(expected, alert_events(data_dir))

        await poll_until(
            counted, expected.text(), state=lambda: alert_outcome(scenario, alert_events(data_dir))
        )
    assert alert_outcome(scenario, alert_events(data_dir)) == []
    assert not [
        e for e in events(data_dir, "alert.raised") if e["data"]["rule"] == "gateway.processor_failed"
    ]


@contextlib.asynccontextmanager
async def scenario_store(
    tmp_path: Path, scenario: Scenario, store_broker: Mosquitto, hq_broker: Mosquitto
) -> AsyncIterator[tuple[ScenarioRun, Gateway]]:
    """The scenario's store, its gateway, and a simulated HQ that books the store's deliveries and sends its
    documents."""
    run = ScenarioRun(scenario, broker_config(store_broker), tmp_path)
    await run.prepare()
    hq: SimulatedHq | None = None
    try:
        sections = run.gateway_config()
        config = GatewayConfig.model_validate(
            {
                "gateway_id": "gw-1",
                "store": {
                    "id": "hk-0042",
                    "name": "Scenario store",
                    "timezone": "Asia/Hong_Kong",
                    "location": LOCATION,
                },
                "data_dir": str(tmp_path / "data"),
                "store_broker": {"host": "127.0.0.1", "port": store_broker.port, "protocol": "3.1.1"},
                "hq": {"host": "127.0.0.1", "port": hq_broker.port, "command_keys": hq_command_keys()},
                "api": {"enabled": True, "host": "127.0.0.1", "port": 0, "token": API_TOKEN},
                "stock": {
                    "items": [
                        {"sku": f"SKU-{n:04d}", "on_hand": 60, "safety_stock": 20} for n in range(1, 21)
                    ]
                },
                **sections,
            }
        )
        hq = SimulatedHq(
            broker_config(hq_broker),
            config.hq.topic_prefix,
            config.store.id,
            config.gateway_id,
            lead_time_s=1800 / scenario.time_scale,
            signer=HQ_SIGNER,
        )
        run.hq = hq
        run.store_location = config.store.location  # the kiosks check staff in around it
        async with running_store_gateway(config) as gateway:

            def on_commit(committed: Any) -> None:
                for body in committed.bodies:
                    hq.observe(orjson.loads(body))

            gateway.journal.add_listener(on_commit)
            await hq.start()
            await poll_until(
                lambda: gateway.health()["drivers"].get("store-mqtt", True), "the MQTT intake to subscribe"
            )
            yield run, gateway
            await hq.close()
    finally:
        if hq is not None:
            await hq.close()
        await run.close()


def ble_driver(gateway: Gateway) -> BleDriver | None:
    return next((d for d in gateway.intakes if isinstance(d, BleDriver)), None)


def test_every_shipped_scenario_loads() -> None:
    assert set(available()) >= {
        "normal-day",
        "fridge-failure-night",
        "garbage-flood",
        "device-unplugged",
        "returns-spike",
        "shelf-shrink",
        "late-and-absent",
        "defrost-cycle",
    }
    for name in available():
        assert load_scenario(name).scenario == name


def test_the_demos_help_names_every_shipped_scenario() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "400"},  # one line per option: no name is cut at a hyphen
    )
    for name in available():
        assert name in result.stdout, f"{name} missing from demo --help"


def test_a_scenario_with_an_unknown_key_says_where_and_what_was_meant(tmp_path: Path) -> None:
    text = (scenario_dir() / "normal-day.yaml").read_text(encoding="utf-8")
    assert "\ntime_scale:" in text
    path = tmp_path / "my-day.yaml"
    path.write_text(text.replace("\ntime_scale:", "\ntime_scael:", 1), encoding="utf-8")
    line = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("time_scale:"))) + 1
    with pytest.raises(ValueError) as info:  # what the demo catches, as it did for the validation error
        load_scenario(str(path))
    error = info.value
    assert isinstance(error, ScenarioError)
    [issue] = error.issues
    assert (issue.file, issue.line, issue.column, issue.key_path) == (str(path), line, 1, "time_scael")
    assert issue.message == "Extra inputs are not permitted"
    assert issue.hint == "did you mean 'time_scale'?"
    assert str(error).startswith(f"{path}:{line}:1: time_scael: ")


def test_every_problem_in_a_scenario_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "scenario: broken\n"
        "description: two mistakes\n"
        "duration_s: 60\n"
        "devices:\n"
        "  fridges:\n"
        "    - {id: fridge-1, transport: usb}\n"
        "steps:\n"
        "  - {at_s: soon, action: defrost, device: fridge-1}\n",
        encoding="utf-8",
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(path))
    error = info.value
    assert [(i.line, i.key_path, i.value_repr) for i in error.issues] == [
        (6, "devices.fridges[0].transport", "'usb'"),
        (8, "steps[0].at_s", "'soon'"),
    ]
    assert error.issues[0].hint == "allowed values: 'tcp', 'rtu'"
    assert error.issues[1].hint == "Scenario time (simulated seconds from the start)."


def test_a_scenarios_rules_reach_the_gateway_in_real_time() -> None:
    """Durations are store time in the scenario; the gateway's timers run on its real clock, so it gets them
    divided by the time scale: defaults too."""
    scenario = load_scenario("fridge-failure-night")
    [rule] = scenario.gateway_rules()
    assert rule["for_s"] == 900 / 480
    assert rule["clear_for_s"] == 300 / 480
    assert rule["post_defrost_grace_s"] == 1800 / 480  # the rule's default, in store time too
    assert rule["max_c"] == 8
    renotifying = {**scenario.rules[0].model_dump(), "renotify_s": 600}
    faster = Scenario.model_validate({**scenario.model_dump(), "time_scale": 10, "rules": [renotifying]})
    [rule] = faster.gateway_rules()
    assert (rule["renotify_s"], rule["for_s"]) == (60, 90)


def test_a_rule_too_short_in_real_time_is_refused_with_its_line(tmp_path: Path) -> None:
    text = (scenario_dir() / "returns-spike.yaml").read_text(encoding="utf-8")
    path = tmp_path / "fast.yaml"
    path.write_text(text.replace("time_scale: 10\n", "time_scale: 120\n", 1), encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(path))
    [issue] = info.value.issues
    assert "rules[0].window_s: 30.0 s of real time at time_scale 120" in issue.message
    assert "greater than or equal to 60" in issue.message


async def test_normal_day(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("normal-day")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        await poll_until(
            lambda: any(
                "delivery of 40" in (e["data"].get("note") or "")
                for e in events(tmp_path / "data", "stock.adjusted")
            ),
            "HQ's booking of the delivery to be applied",
        )
        await poll_until(
            lambda: gateway.journal.delivered_seq == gateway.journal.last_seq,
            "HQ to have every event",
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
    # A normal day's defrosts and door openings stay within the controllers' alarm delays.
    assert not [
        e["data"]["values"]
        for e in events(data, "sensor.sample")
        if e["data"]["values"].get("high_temp_alarm") or e["data"]["values"].get("low_temp_alarm")
    ]
    # The delivery of 40 cases is booked in by HQ (stock.adjust receiving, 12 units a case), and no level goes
    # below zero: stock arrives the way a real store's does.
    receiving = [e["data"] for e in events(data, "stock.adjusted") if e["data"]["reason"] == "receiving"]
    deliveries = [r for r in receiving if "delivery of 40 case(s)" in (r.get("note") or "")]
    assert sum(float(r["delta"]) for r in deliveries) == 40 * 12
    levels = events(data, "stock.level")
    assert levels
    assert all(float(e["data"]["on_hand"]) >= 0 for e in levels), [
        e["data"] for e in levels if float(e["data"]["on_hand"]) < 0
    ]


async def test_fridge_failure_at_night(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("fridge-failure-night")
    # A logger advertises every 5 real seconds; at this compression that is three readings a night: more.
    loggers = [b.model_copy(update={"interval_s": 0.5}) for b in scenario.devices.ble]
    scenario = scenario.model_copy(update={"devices": scenario.devices.model_copy(update={"ble": loggers})})
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        # One temperature alert: raised while the compressor is down, cleared once the cabinet is cold again.
        await expected_alerts(scenario, tmp_path / "data")
    data = tmp_path / "data"
    scale = scenario.time_scale

    def air(event: dict[str, Any]) -> float:
        return float(event["data"]["values"]["air_temperature"])

    dairy = [
        e for e in events(data, "sensor.sample", "fridge-dairy") if "air_temperature" in e["data"]["values"]
    ]
    assert run.started_at is not None
    start_mono = run.started_at  # the gateway stamps mono_ns from the same clock, in this process

    def store_time(event: dict[str, Any]) -> float:
        return (float(event["mono_ns"]) / 1e9 - start_mono) * scale

    before = [air(e) for e in dairy if store_time(e) < 6000]
    failing = [air(e) for e in dairy if 9000 < store_time(e) < 21000]
    assert before
    assert failing
    assert max(before) < 8
    assert max(failing) > 9, "the temperature did not climb while the compressor was down"
    assert air(dairy[-1]) < max(failing), "the temperature did not come down after the repair"
    assert all(-25 < t < -10 for t in air_temperatures(data, "freezer-1"))
    # The controller's own alarm bit: set while the cabinet is too warm, cleared once it is cold again.
    alarm = [
        (store_time(e), e["data"]["values"]["high_temp_alarm"])
        for e in events(data, "sensor.sample", "fridge-dairy")
        if "high_temp_alarm" in e["data"]["values"]
    ]
    assert not any(bit for t, bit in alarm if t < 6000)
    assert any(bit for t, bit in alarm if 9000 < t < 21600), "the high-temperature alarm bit never went on"
    assert alarm[-1][1] == 0, "the alarm bit did not clear after the repair"
    # The BLE logger inside the fridge follows its air: cold, warm while the compressor is down, cold again.
    logger = [
        (store_time(e), e["data"]["values"]["temperature"])
        for e in events(data, "sensor.sample", "dairy-logger")
    ]
    assert max(t for at, t in logger if at < 6000) < 8
    assert max(t for at, t in logger if 9000 < at < 21600) > 9
    assert logger[-1][1] < max(t for _, t in logger)
    assert "error" not in statuses(data, "fridge-dairy")


async def test_garbage_flood(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("garbage-flood")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        broken = gateway.devices.get("pos-01")
        assert broken is not None
        await poll_until(
            lambda: broken.health.quarantined + broken.health.rate_limited >= 2000,
            "every garbage message quarantined or counted",
        )
    data = tmp_path / "data"
    assert run.published["garbage"] == 2000
    reasons = quarantined(data)
    # A few rows and a counted summary: enough to debug it, never enough to push other devices' evidence out.
    assert 1 <= sum(reasons.values()) <= QUOTA_ROWS + 2
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

            def back(device: str = device) -> bool:
                seen = statuses(tmp_path / "data", device)
                return seen[-1:] == ["online"] and "error" in seen

            await poll_until(
                back,
                f"{device} to fail and come back",
            )
    data = tmp_path / "data"
    assert len(events(data, "pos.sale")) + len(events(data, "pos.return")) == run.published["tills"]


async def test_returns_spike(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("returns-spike")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        await expected_alerts(scenario, tmp_path / "data")
    data = tmp_path / "data"
    assert (len(events(data, "pos.sale")), len(events(data, "pos.return"))) == (24, 8)
    [spike] = [e["data"] for e in events(data, "alert.raised") if e["data"]["rule"] == "returns_spike"]
    # Raised by the return that took the ratio past 15 % (by count or amount), with every sale in the window.
    assert spike["details"]["sales"] == 24
    assert 1 <= spike["details"]["returns"] <= 8


async def test_shelf_shrink(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("shelf-shrink")
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        await expected_alerts(scenario, tmp_path / "data")
    data = tmp_path / "data"
    assert [e["data"]["name"] for e in events(data, "document.updated")] == ["planogram"]
    departed = [epc for e in events(data, "rfid.inventory", "rfid-shelf-a7") for epc in e["data"]["departed"]]
    assert len(departed) == 5
    [shrink] = [
        e["data"]["details"] for e in events(data, "alert.raised") if e["data"]["rule"] == "possible_shrink"
    ]
    assert (shrink["sku"], shrink["count"]) == ("SKU-0009", 3)
    assert set(shrink["epcs"]) < set(departed)


async def test_late_and_absent(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    scenario = compressed("late-and-absent")  # its own time_scale: no_show_after_s is at its minimum there
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        await expected_alerts(scenario, tmp_path / "data")
    data = tmp_path / "data"
    assert len(events(data, "staff.checkin", "kiosk-staff")) == 4
    [review] = [
        e["data"]["details"]
        for e in events(data, "alert.raised")
        if e["data"]["subject"] == "needs_review:E1004"
    ]
    assert "outside_geofence" in review["reasons"]
    assert 290 < review["distance_m"] < 310
    assert [e["data"]["name"] for e in events(data, "document.updated")] == ["roster"]


async def test_defrost_cycle(tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto) -> None:
    # 30 s, not 15: the controller is polled every 2 s of real time, and the defrost must span several polls.
    scenario = compressed("defrost-cycle", real_s=30)
    async with scenario_store(tmp_path, scenario, store_broker, hq_broker) as (run, gateway):
        await run.run(ble_driver(gateway))
        await expected_alerts(scenario, tmp_path / "data")
    data = tmp_path / "data"
    dairy = [e["data"]["values"] for e in events(data, "sensor.sample", "fridge-dairy")]
    assert any(v.get("defrost_active") == 1 for v in dairy), "no poll saw the defrost"
    assert max(v["air_temperature"] for v in dairy if "air_temperature" in v) > 8, (
        "the defrost did not warm it"
    )
    assert not events(data, "alert.raised")


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def demo_summary(out: str) -> tuple[int, int]:
    """Committed and received counts from the demo's last line, which must report no gap at HQ."""
    summary = out.strip().splitlines()[-1]
    assert summary.endswith("seq gaps at HQ: 0"), summary
    assert "negative stock" not in summary, summary
    committed = int(summary.split("committed ")[1].split(" ")[0])
    received = int(summary.split("HQ received ")[1].split(",")[0])
    return committed, received


def test_demo_shows_a_calm_view_and_loses_nothing(tmp_path: Path) -> None:
    """The README's first command, bounded: a view of every simulated device, the stock, and what HQ has."""
    result = run_demo(tmp_path, "--duration", "8")
    out = result.stdout
    # No alarm about the host's Bluetooth adapter: the demo feeds the BLE driver through a simulated radio.
    assert "Bluetooth" not in out + result.stderr, result.stderr[-3000:]
    for what in ("Devices (last", "Stock that moved", "Alerts", "HQ has everything up to seq "):
        assert what in out, f"{what!r} missing from the demo's view"
    view = out.split("Devices (last")[-1]
    for device in ("pos-01", "fridge-dairy", "chiller-probe", "rfid-backroom", "shelf-a1", "kiosk-staff"):
        assert f"  {device} " in view, f"{device} missing from the demo's last view"
    committed, received = demo_summary(out)
    assert received == committed


def test_demo_verbose_streams_every_commit(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "--duration", "6", "--verbose").stdout
    for what in (
        "pos.sale",
        "sample fridge-dairy",
        "sample chiller-probe",
        "rfid   rfid-backroom",
        "checkin ",
    ):
        assert what in out, f"{what!r} missing from the demo's output"
    committed, received = demo_summary(out)
    assert received == committed


def test_demo_shows_the_fridge_controllers_alarm(tmp_path: Path) -> None:
    """fridge-failure-night: once the dairy fridge's own high-temperature alarm bit is in the journal, and the
    temperature rule's alert has reached the demo's chat robot, the demo shows both (its last view, printed
    when it is stopped)."""
    command = [sys.executable, "-m", "gateway.cli", "demo", "--scenario", "fridge-failure-night"]
    demo = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def alarm_committed() -> bool:
            if not (tmp_path / "journal.db").exists():
                return False
            try:
                samples = events(tmp_path, "sensor.sample", "fridge-dairy")
            except sqlite3.OperationalError:  # the journal is being created
                return False
            return any(e["data"]["values"].get("high_temp_alarm") == 1 for e in samples)

        def alert_sent() -> bool:
            return any(e["data"]["level"] == "raised" for e in events(tmp_path, "notification.sent"))

        wait_for(alarm_committed, "the controller's alarm bit in the journal", demo)
        wait_for(alert_sent, "the temperature alert sent to the chat robot", demo)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, err[-3000:]
    view = out.split("Devices (last")[-1]
    assert "fridge-dairy controller ALARM high_temp_alarm" in view
    assert "temperature: fridge-dairy: above 8 °C" in view.split("Alerts")[1]
    assert "[ALERT·warning] fridge-dairy: above 8 °C" in view.split("Chat")[1]  # its signature was checked
    summary = out.strip().splitlines()[-1]
    assert "controller alarm(s)" in summary
    assert "the chat robot took 0 message(s)" not in summary


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[str]) -> None:
    """Poll ``condition`` until it holds, while ``process`` runs (a generous bound: a stuck demo fails)."""
    deadline = time.monotonic() + 180
    while not condition():
        assert process.poll() is None, f"the demo ended before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def test_an_actions_reading_age_is_not_scaled() -> None:
    from simulators.scenario_model import scale_durations

    rule = {"for_s": 900, "actions": [{"id": "defrost", "max_age_s": 300, "interlock": []}]}
    assert scale_durations(rule, 480) == {
        "for_s": 1.875,
        "actions": [{"id": "defrost", "max_age_s": 300, "interlock": []}],
    }
