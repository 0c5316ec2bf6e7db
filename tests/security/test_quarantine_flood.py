"""Threat: one till floods the store broker with garbage to flush everyone's quarantine.

Seen live: 3,000 garbage messages from one till became 3,000 quarantine rows in 0.08 s, and the quarantine's row
cap then evicted other devices' evidence. Each MQTT source (a device, or one route's unknown ids) now gets a
quarantine quota (drivers/sink.py QuarantineQuota): a few rows per window, then one counted summary row, with
every counter exact. Real mosquitto, the gateway in-process with its real SQLite journal, the quarantine capped at
its minimum (100 rows) and trimmed every 0.1 s as a flood would find it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson

from bench.mqtt_load import publish_all
from drivers.sink import QUOTA_ROWS
from gateway.config import GatewayConfig
from gateway.runtime import Gateway
from simulators.kiosk import Kiosk
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    journal_db,
    journal_kinds,
    metric_sum,
    own_metrics,
    poll_until,
    read_quarantine,
    running_gateway,
    sale_payload,
)

FLOOD = 3000
TILL_TOPIC = "store/pos/{}/sale"
KIOSK_TOPIC = "store/kiosk/{}/checkin"
SENSOR_TOPIC = "store/sensor/{}/state"


def config(tmp_path: Path, broker: Mosquitto) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway_id": "gw-flood",
            "store": {"id": "flood-store", "name": "Flood test store", "timezone": "Asia/Hong_Kong"},
            "data_dir": str(tmp_path / "data"),
            "store_broker": {"host": broker.host, "port": broker.port},
            "hq": {"host": "127.0.0.1", "port": free_port()},
            "drivers": [
                {
                    "type": "mqtt",
                    "name": "devices",
                    "routes": [
                        {"pattern": TILL_TOPIC.format("{device_id}"), "kind": "pos.sale"},
                        {"pattern": KIOSK_TOPIC.format("{device_id}"), "profile": "checkin-kiosk"},
                        {"pattern": SENSOR_TOPIC.format("{device_id}"), "profile": "generic-json-sensor"},
                    ],
                }
            ],
            "devices": [
                {"id": "pos-01", "profile": "pos_terminal"},
                {"id": "pos-02", "profile": "pos_terminal"},
                {"id": "kiosk-1", "profile": "checkin-kiosk"},
                {"id": "fridge-1", "profile": "generic-json-sensor"},
            ],
            "outbox": {"quarantine_max_rows": 100, "housekeeping_interval_s": 0.1},
            "api": {"enabled": False},
            "log": {"level": "WARNING"},
        }
    )


async def publish(broker: Mosquitto, client: str, messages: list[tuple[str, bytes]]) -> None:
    _, _, acked = await publish_all(broker.host, broker.port, client, messages, window=100)
    assert acked == len(messages)


async def wait_received(gateway: Gateway, count: int) -> None:
    await poll_until(
        lambda: metric_sum(own_metrics(gateway), "storegw_messages_received_total") >= count,
        f"{count} messages at the gateway",
        within=60,
        state=gateway.health,
    )
    await gateway.journal.flush()


def rows_of(data_dir: Path, device_id: str) -> list[dict[str, Any]]:
    return [r for r in read_quarantine(data_dir) if r["device_id"] == device_id]


async def test_one_till_flooding_garbage_keeps_a_few_rows_and_everyone_elses_evidence(
    store_broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = config(tmp_path, store_broker)
    evidence = [
        (TILL_TOPIC.format("pos-02"), b"{}", "invalid"),
        (KIOSK_TOPIC.format("kiosk-1"), b'{"employee_id": 5}', "invalid"),
        (SENSOR_TOPIC.format("fridge-1"), b'{"humidity": 3}', "missing_field"),
        (TILL_TOPIC.format("pos-77"), b"{}", "unknown_device"),
    ]
    flood = [(TILL_TOPIC.format("pos-01"), b"\x00not json %d" % n) for n in range(FLOOD)]
    good = sale_payload("R-after-flood", "REG2", [("SKU-0001", 1)])
    async with running_gateway(cfg) as gateway:
        await publish(store_broker, "evidence", [(t, p) for t, p, _ in evidence])
        await wait_received(gateway, len(evidence))
        await publish(store_broker, "flooding-till", flood)
        await publish(store_broker, "good-till", [(TILL_TOPIC.format("pos-02"), good)])
        await wait_received(gateway, len(evidence) + FLOOD + 1)
        till = gateway.devices.get("pos-01")
        assert till is not None
        # The device's own counter is exact at once; its rows are the quota's few.
        assert till.health.quarantined == FLOOD
        assert len(rows_of(cfg.data_dir, "pos-01")) == QUOTA_ROWS
        await poll_until(lambda: journal_kinds(cfg.data_dir).get("pos.sale", 0) == 1, "the good sale")
    # Shutting down wrote the open window's summary row, and the metric counted its messages.
    metrics = own_metrics(gateway)
    assert metric_sum(metrics, "storegw_messages_quarantined_total", reason="not_json") == FLOOD
    assert metric_sum(metrics, "storegw_messages_quarantined_total") == FLOOD + len(evidence)

    till_rows = rows_of(cfg.data_dir, "pos-01")
    assert len(till_rows) == QUOTA_ROWS + 1
    summary = till_rows[-1]
    assert summary["reason"] == "not_json"
    assert f"{FLOOD - QUOTA_ROWS} more message(s)" in summary["detail"]
    assert f"({FLOOD - QUOTA_ROWS} not_json)" in summary["detail"]
    assert summary["size"] == sum(len(p) for _, p in flood[QUOTA_ROWS:])
    assert bytes(summary["payload"]) == flood[QUOTA_ROWS][1]  # the first summarised one's bytes, as evidence

    kept = {(r["topic"], r["reason"]) for r in read_quarantine(cfg.data_dir)}
    assert {(t, reason) for t, _, reason in evidence} <= kept
    with sqlite3.connect(f"{journal_db(cfg.data_dir).absolute().as_uri()}?mode=ro", uri=True) as db:
        (body,) = db.execute("SELECT body FROM events WHERE kind = 'pos.sale'").fetchone()
    assert orjson.loads(body)["data"]["receipt_no"] == "R-after-flood"


async def test_unknown_ids_share_their_routes_quota_and_a_kiosk_summary_keeps_no_bytes(
    store_broker: Mosquitto, tmp_path: Path
) -> None:
    """An id is whatever the sender writes in the topic: a flood under ever new ids is one source per route."""
    cfg = config(tmp_path, store_broker)
    secret = b"\xff\xd8\xff\xe0" + Kiosk("kiosk-1", seed=1).next_payload()
    spoofed = [(KIOSK_TOPIC.format(f"kiosk-x{n}"), secret) for n in range(200)]
    async with running_gateway(cfg) as gateway:
        await publish(store_broker, "spoofing", spoofed)
        await wait_received(gateway, len(spoofed))
    rows = read_quarantine(cfg.data_dir)
    assert len(rows) == QUOTA_ROWS + 1
    assert {r["reason"] for r in rows} == {"unknown_device"}
    assert all(bytes(r["payload"]).startswith(b"<redacted") for r in rows)
    assert f"{len(spoofed) - QUOTA_ROWS} more message(s)" in rows[-1]["detail"]
    metrics = own_metrics(gateway)
    assert metric_sum(metrics, "storegw_messages_quarantined_total", reason="unknown_device") == len(spoofed)
