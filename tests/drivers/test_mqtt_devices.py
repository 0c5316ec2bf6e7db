"""MQTT devices end to end against a real mosquitto: each new profile into the journal, biometric refusal that
never stores the payload, garbage, a store-broker outage, and a flood of 10x one device's rate.

The gateway runs in-process (tests/harness/e2e_helpers.py) with its real SQLite journal; HQ is a port nobody listens
on (the uplink keeps retrying; these tests look at the journal). Devices publish with QoS 1 through
bench/mqtt_load.py's lean publisher or the simulators.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench.mqtt_load import publish_all
from gateway.config import GatewayConfig
from gateway.kernel.config import BrokerConfig
from gateway.runtime import Gateway
from simulators.kiosk import Kiosk, run_kiosk
from simulators.rfid_shelf import Shelf
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    journal_db,
    journal_kinds,
    metric_sum,
    own_metrics,
    poll_until,
    read_quarantine,
    running_gateway,
)

KIOSK_TOPIC = "store/kiosk/{device_id}/checkin"
SHELF_TOPIC = "store/rfid/{device_id}/reads"
JSON_TOPIC = "store/sensor/{device_id}/state"
CSV_TOPIC = "store/sensor/{device_id}/csv"
RAW_TOPIC = "store/sensor/{device_id}/raw"
RAW_MAPPING = {
    "format": "raw",
    "length": 4,
    "fields": [
        {"metric": "temperature", "byte": 0, "type": "int16", "scale": 0.1, "unit": "°C", "invalid": -32768},
        {"metric": "humidity", "byte": 2, "type": "uint16", "endian": "little", "scale": 0.01, "unit": "%"},
    ],
}


def config(tmp_path: Path, broker: Mosquitto, devices: list[dict[str, Any]], **driver: Any) -> GatewayConfig:
    doc = {
        "gateway_id": "gw-dev",
        "store": {"id": "dev-store", "name": "Device test store", "timezone": "Asia/Hong_Kong"},
        "data_dir": str(tmp_path / "data"),
        "store_broker": {"host": broker.host, "port": broker.port},
        "hq": {"host": "127.0.0.1", "port": free_port()},
        "drivers": [
            {
                "type": "mqtt",
                "name": "devices",
                "routes": [
                    {"pattern": "store/pos/{device_id}/sale", "kind": "pos.sale"},
                    {"pattern": KIOSK_TOPIC, "profile": "checkin-kiosk"},
                    {"pattern": SHELF_TOPIC, "profile": "rfid-shelf-mqtt"},
                    {"pattern": JSON_TOPIC, "profile": "generic-json-sensor"},
                    {"pattern": CSV_TOPIC, "profile": "generic-csv-sensor"},
                    {"pattern": RAW_TOPIC, "profile": "generic-json-sensor", "mapping": RAW_MAPPING},
                ],
                **driver,
            }
        ],
        "devices": devices,
        "api": {"enabled": False},
        "log": {"level": "WARNING"},
    }
    return GatewayConfig.model_validate(doc)


def events(data_dir: Path, kind: str) -> list[dict[str, Any]]:
    with sqlite3.connect(f"{journal_db(data_dir).absolute().as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT device_id, body FROM events WHERE kind = ? ORDER BY seq", (kind,)
        ).fetchall()
    return [{"device_id": d, **orjson.loads(b)} for d, b in rows]


async def publish(broker: Mosquitto, client: str, messages: list[tuple[str, bytes]]) -> None:
    _, _, acked = await publish_all(broker.host, broker.port, client, messages, window=50)
    assert acked == len(messages)


async def wait_received(gateway: Gateway, count: int) -> None:
    await poll_until(
        lambda: metric_sum(own_metrics(gateway), "storegw_messages_received_total") >= count,
        f"{count} messages at the gateway",
        within=30,
        state=gateway.health,
    )
    await gateway.journal.flush()


def data_of(row: dict[str, Any]) -> dict[str, Any]:
    data = row["data"]
    assert isinstance(data, dict)
    return data


async def test_every_profile_end_to_end_and_biometrics_never_stored(
    store_broker: Mosquitto, tmp_path: Path
) -> None:
    devices = [
        {"id": "kiosk-1", "profile": "checkin-kiosk"},
        {"id": "shelf-1", "profile": "rfid-shelf-mqtt"},
        {"id": "fridge-json", "profile": "generic-json-sensor"},
        {"id": "fridge-csv", "profile": "generic-csv-sensor"},
        {"id": "fridge-raw", "profile": "generic-json-sensor"},
        {"id": "till-1", "profile": "pos_terminal"},
    ]
    cfg = config(tmp_path, store_broker, devices)
    kiosk = Kiosk("kiosk-1", seed=3)
    secret = base64.b64encode(b"FACE-" * 200).decode()
    image_body = {**kiosk.next_body(), "face_image": secret}
    shelf = Shelf("shelf-1", tags=10, seed=4)
    scan = shelf.scan()
    sale = {
        "receipt_no": "R-1",
        "register_id": "REG1",
        "currency": "HKD",
        "lines": [{"sku": "SKU-0001", "quantity": 1, "unit_price": "10"}],
        "totals": {"subtotal": "10", "total": "10"},
    }
    good = [
        (KIOSK_TOPIC.format(device_id="kiosk-1"), kiosk.next_payload()),
        (KIOSK_TOPIC.format(device_id="kiosk-1"), kiosk.next_payload()),
        (SHELF_TOPIC.format(device_id="shelf-1"), orjson.dumps(scan)),
        (JSON_TOPIC.format(device_id="fridge-json"), b'{"temperature": 4.5, "humidity": 61, "door": true}'),
        (CSV_TOPIC.format(device_id="fridge-csv"), b"3.5,55,0\n3.75,56,1\n"),
        (RAW_TOPIC.format(device_id="fridge-raw"), struct.pack(">h", -185) + struct.pack("<H", 5055)),
        ("store/pos/till-1/sale", orjson.dumps(sale)),
    ]
    bad = [
        (KIOSK_TOPIC.format(device_id="kiosk-1"), orjson.dumps(image_body), "biometric_refused"),
        (KIOSK_TOPIC.format(device_id="kiosk-1"), b"\xff\xd8\xff\xe0" + secret.encode(), "biometric_refused"),
        (KIOSK_TOPIC.format(device_id="kiosk-1"), b'{"employee_id": 5}', "invalid"),
        (SHELF_TOPIC.format(device_id="shelf-1"), b'{"epc": "XYZ"}', "bad_epc"),
        (JSON_TOPIC.format(device_id="fridge-json"), b'{"humidity": 3}', "missing_field"),
        (CSV_TOPIC.format(device_id="fridge-csv"), b"warm,55", "not_a_number"),
        (RAW_TOPIC.format(device_id="fridge-raw"), b"\x00", "bad_length"),
        (JSON_TOPIC.format(device_id="kiosk-1"), b'{"temperature": 1}', "wrong_profile"),
        (JSON_TOPIC.format(device_id="nobody"), b'{"temperature": 1}', "unknown_device"),
    ]
    async with running_gateway(cfg) as gateway:
        await publish(store_broker, "dev-all", good + [(t, p) for t, p, _ in bad])
        await wait_received(gateway, len(good) + len(bad))
        await poll_until(
            lambda: bool(journal_kinds(cfg.data_dir).get("rfid.inventory")),
            "the shelf's window to close",
            within=30,
        )
    kinds = journal_kinds(cfg.data_dir)
    assert kinds["staff.checkin"] == 2
    assert kinds["sensor.sample"] == 4
    assert kinds["pos.sale"] == 1
    checkins = events(cfg.data_dir, "staff.checkin")
    assert {data_of(c)["employee_id"] for c in checkins} <= {f"E{1000 + n}" for n in range(12)}
    assert all(c["device_id"] == "kiosk-1" for c in checkins)

    samples = {
        (s["device_id"], tuple(sorted(data_of(s)["values"].items())))
        for s in events(cfg.data_dir, "sensor.sample")
    }
    assert samples == {
        ("fridge-json", (("door_open", 1.0), ("humidity", 61.0), ("temperature", 4.5))),
        ("fridge-csv", (("door_open", 0.0), ("humidity", 55.0), ("temperature", 3.5))),
        ("fridge-csv", (("door_open", 1.0), ("humidity", 56.0), ("temperature", 3.75))),
        ("fridge-raw", (("humidity", 50.55), ("temperature", -18.5))),
    }
    [inventory] = events(cfg.data_dir, "rfid.inventory")[:1]
    assert inventory["device_id"] == "shelf-1"
    data = data_of(inventory)
    assert {t["epc"] for t in data["tags"]} == {r["epc"] for r in scan}
    assert data["reads"] == len(scan)
    assert all(t["gtin"] for t in data["tags"])  # SGTIN-96: the GTIN comes out

    quarantine = read_quarantine(cfg.data_dir)
    assert Counter(q["reason"] for q in quarantine) == Counter(r for _, _, r in bad)
    for row in quarantine:
        if row["topic"].startswith("store/kiosk/"):
            assert b"FACE" not in bytes(row["payload"] or b"")
            assert bytes(row["payload"]).startswith(b"<redacted")
    statuses = {(s["device_id"], data_of(s)["status"]) for s in events(cfg.data_dir, "device.status")}
    assert {d["id"] for d in devices} <= {d for d, status in statuses if status == "online"}
    # Nowhere in the journal's files: neither the database nor its write-ahead log.
    for path in cfg.data_dir.iterdir():
        if path.is_file():
            content = path.read_bytes()
            assert secret.encode() not in content, path
            assert secret[:64].encode() not in content, path


async def test_kiosk_reconnects_after_the_store_broker_comes_back(
    store_broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = config(tmp_path, store_broker, [{"id": "kiosk-1", "profile": "checkin-kiosk"}])
    broker = BrokerConfig(host=store_broker.host, port=store_broker.port, protocol="3.1.1")
    async with running_gateway(cfg) as gateway:
        assert await run_kiosk(broker, "kiosk-1", count=3, rate_per_s=0, seed=1) == 3
        await poll_until(lambda: journal_kinds(cfg.data_dir).get("staff.checkin", 0) == 3, "3 check-ins")
        store_broker.stop()
        await poll_until(lambda: not gateway.health()["drivers"]["devices"], "the driver to see the outage")
        store_broker.start()
        await poll_until(lambda: gateway.health()["drivers"]["devices"], "the driver to reconnect", within=60)
        assert await run_kiosk(broker, "kiosk-1", count=3, rate_per_s=0, seed=2) == 3
        await poll_until(lambda: journal_kinds(cfg.data_dir).get("staff.checkin", 0) == 6, "6 check-ins")


async def test_a_flood_is_rate_limited_and_counted_and_another_device_is_unaffected(
    store_broker: Mosquitto, tmp_path: Path
) -> None:
    rate = 20
    devices = [
        {"id": "noisy", "profile": "generic-json-sensor", "rate_limit_per_s": rate, "rate_burst": rate},
        {"id": "quiet", "profile": "generic-json-sensor", "rate_limit_per_s": rate, "rate_burst": rate},
    ]
    cfg = config(tmp_path, store_broker, devices)
    flood_count = rate * 10 * 2  # 10x the rate for about two seconds
    quiet_count = 20

    async def flood() -> None:
        topic = JSON_TOPIC.format(device_id="noisy")
        for n in range(20):
            chunk = [(topic, orjson.dumps({"temperature": n + i / 100})) for i in range(flood_count // 20)]
            await publish(store_broker, f"dev-noisy-{n}", chunk)
            await asyncio.sleep(0.1)

    async def quiet() -> None:
        topic = JSON_TOPIC.format(device_id="quiet")
        for n in range(quiet_count):
            await publish(store_broker, f"dev-quiet-{n}", [(topic, orjson.dumps({"temperature": n}))])
            await asyncio.sleep(0.1)

    async with running_gateway(cfg) as gateway:
        await asyncio.gather(flood(), quiet())
        await wait_received(gateway, flood_count + quiet_count)
        noisy = gateway.devices.get("noisy")
        assert noisy is not None
        dropped = noisy.health.rate_limited
        await poll_until(
            lambda: any(
                data_of(s)["status"] == "rate_limited" and s["device_id"] == "noisy"
                for s in events(cfg.data_dir, "device.status")
            ),
            "noisy's rate_limited status",
        )
        metrics = own_metrics(gateway)
    samples = Counter(s["device_id"] for s in events(cfg.data_dir, "sensor.sample"))
    assert samples["quiet"] == quiet_count
    assert dropped > 0
    assert samples["noisy"] + dropped == flood_count
    assert metric_sum(metrics, "storegw_messages_dropped_total", reason="rate_limited") == dropped
    limited = [
        data_of(s)
        for s in events(cfg.data_dir, "device.status")
        if s["device_id"] == "noisy" and data_of(s)["status"] == "rate_limited"
    ]
    assert limited[0]["rate_limited"] >= 1
    assert not any(
        data_of(s)["status"] == "rate_limited"
        for s in events(cfg.data_dir, "device.status")
        if s["device_id"] == "quiet"
    )
    assert read_quarantine(cfg.data_dir) == []


async def test_devices_are_registered_once_by_the_first_driver_with_their_profile(
    store_broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path,
        store_broker,
        [{"id": "kiosk-1", "profile": "checkin-kiosk"}, {"id": "t1", "profile": "pos_terminal"}],
    )
    second = {
        "type": "mqtt",
        "name": "second",
        "routes": [{"pattern": "other/kiosk/{device_id}", "profile": "checkin-kiosk"}],
    }
    doc = cfg.model_dump(mode="json", exclude_none=True)
    doc["drivers"].append(second)
    doc["api"] = {"enabled": False}
    cfg = GatewayConfig.model_validate(doc)
    async with running_gateway(cfg) as gateway:
        owners = {d.id: d.health.driver for d in gateway.devices}
        assert owners == {"kiosk-1": "devices", "t1": "devices"}
        assert (
            await run_kiosk(
                BrokerConfig(host=store_broker.host, port=store_broker.port),
                "kiosk-1",
                count=2,
                rate_per_s=0,
                topic_template="other/kiosk/{device_id}",
            )
            == 2
        )
        await poll_until(
            lambda: journal_kinds(cfg.data_dir).get("staff.checkin", 0) == 2,
            "2 check-ins via the second driver",
        )
        kiosk = gateway.devices.get("kiosk-1")
        assert kiosk is not None
        assert kiosk.health.messages == 2
