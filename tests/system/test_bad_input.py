"""Bad input end to end: garbage on the store broker never crashes the gateway nor holds back good sales.

Good sales are interleaved with :func:`simulators.pos.garbage_messages` (random bytes, invalid UTF-8, wrong
JSON types, missing fields, a 10 MB payload) and with messages whose topic names an unknown or invalid device.
Every bad message must land in the journal's ``quarantine`` table with a reason code that says why, the
``storegw_messages_quarantined`` metric must count them, and every good sale must reach HQ exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.mqtt_load import publish_all
from gateway.runtime import Gateway
from simulators.pos import PosTerminal, garbage_messages, run_terminals
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import (
    AUTH,
    TERMINALS,
    HqView,
    MetricValues,
    broker_config,
    catalog_stock,
    expected_ledger,
    journal_kinds,
    load,
    metric_sum,
    own_metrics,
    parse_metrics,
    read_ledger,
    read_quarantine,
    receipts,
    running_gateway,
    running_receiver,
    sale_payload,
    wait_handled,
    write_config,
)

KEPT_BYTES = 4096
"""How much of a quarantined payload the journal keeps (gateway/kernel/journal.py QUARANTINE_KEEP_BYTES)."""

# garbage_messages() says "roughly why"; these are the reason codes that say the same thing.
SENSIBLE_REASONS: dict[str, set[str]] = {
    "not_json": {"not_json"},
    "not_utf8": {"not_json", "not_utf8"},
    "not_object": {"not_json", "not_object", "invalid"},
    "invalid": {"invalid"},
    "too_large": {"too_large"},
}


@dataclass(frozen=True, slots=True)
class Bad:
    topic: str
    payload: bytes
    reasons: set[str]


def _config_and_dirs(store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "data"
    path = write_config(
        tmp_path / "store.yaml", store_port=store_broker.port, hq_port=hq_broker.port, data_dir=data_dir
    )
    return path, data_dir


def _bad_messages(good_till: str) -> tuple[list[Bad], list[tuple[str, bytes]]]:
    """Messages the gateway must quarantine, and ones the broker never hands it (no matching subscription)."""
    # Spread over the tills, so each stays within its quarantine quota (QUOTA_ROWS rows a window) and every
    # message gets its own row to check; tests/security/test_quarantine_flood.py floods past the quota.
    bad = [
        Bad(f"store/pos/{TERMINALS[n % len(TERMINALS)]}/{g.action}", g.payload, SENSIBLE_REASONS[g.reason])
        for n, g in enumerate(garbage_messages())
    ]
    valid = sale_payload("stranger-1", "reg-x", [("SKU-0001", 1)])
    absurd = sale_payload("absurd-1", good_till, [("SKU-0001", 1)]).replace(
        b'"quantity":1', b'"quantity":"1E-999999999"'
    )
    bad += [
        Bad("store/pos/pos-99/sale", valid, {"unknown_device"}),  # subscribed topic, device not configured
        Bad(
            "store/pos/pos-99/return",
            sale_payload("stranger-2", "reg-x", [("SKU-0002", 5)]),
            {"unknown_device"},
        ),
        Bad("store/pos/-leading-dash/sale", valid, {"bad_device_id"}),
        Bad("store/pos/t\u00efll-01/sale", valid, {"bad_device_id"}),
        Bad("store/pos/till 01/sale", valid, {"bad_device_id"}),
        Bad(f"store/pos/{'x' * 70}/sale", valid, {"bad_device_id"}),
        Bad("store/pos//sale", valid, {"unknown_topic", "bad_device_id"}),  # '+' matches an empty level
        # 10**9 decimal places: below the decimal context's range, where rounding would make it look whole.
        Bad(f"store/pos/{good_till}/sale", absurd, {"invalid"}),
    ]
    unrouted = [
        (f"store/pos/{good_till}/refund", sale_payload("refund-1", good_till, [("SKU-0003", 1)])),
        (f"store/pos/{good_till}/sale/extra", sale_payload("extra-1", good_till, [("SKU-0003", 1)])),
    ]
    return bad, unrouted


async def _metrics(gateway: Gateway) -> MetricValues:
    port = await gateway.wait_api()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 401
        response = await http.get("/metrics", headers=AUTH)
        assert response.status_code == 200
        health = await http.get("/health")
        assert health.status_code == 200, health.text
    return parse_metrics(response.text)


def _interleave(
    good: Sequence[tuple[str, bytes]], bad: Sequence[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for g, b in itertools.zip_longest(good, bad):
        out += [m for m in (g, b) if m is not None]
    return out


async def test_garbage_is_quarantined_with_a_reason_and_good_sales_go_through(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    config_path, data_dir = _config_and_dirs(store_broker, hq_broker, tmp_path)
    till = TERMINALS[0]
    terminal = PosTerminal(till, seed=11, return_ratio=0.2)
    good_messages = [terminal.next_message() for _ in range(60)]
    good = [(f"store/pos/{till}/{m.action}", m.payload) for m in good_messages]
    bad, unrouted = _bad_messages(till)
    messages = _interleave(good, [(b.topic, b.payload) for b in bad]) + unrouted

    async with running_receiver(hq_broker, tmp_path / "hq.db"):
        with HqView(tmp_path / "hq.db") as hq:
            async with running_gateway(load(config_path)) as gateway:
                _, _, acked = await publish_all(
                    store_broker.host, store_broker.port, "e2e-bad-till", messages
                )
                assert acked == len(messages)
                await wait_handled(gateway, hq, received=len(good) + len(bad))
                metrics = await _metrics(gateway)
                assert gateway.health()["status"] == "ok"
                hq_events = hq.events()

    quarantine = read_quarantine(data_dir)
    assert len(quarantine) == len(bad)
    by_content = {(r["topic"], bytes(r["payload"] or b"")): r for r in quarantine}
    assert len(by_content) == len(quarantine)
    for message in bad:
        row = by_content.get((message.topic, message.payload[:KEPT_BYTES]))
        assert row is not None, f"not quarantined: {message.topic} ({len(message.payload)} bytes)"
        assert row["reason"] in message.reasons, (message.topic, row["reason"], row["detail"])
        assert row["size"] == len(message.payload)
        assert row["detail"], row
        assert row["driver"] == "store-mqtt"
    assert {r["device_id"] for r in quarantine if r["reason"] == "unknown_device"} == {"pos-99"}

    reasons = Counter(str(r["reason"]) for r in quarantine)
    assert metric_sum(metrics, "storegw_messages_quarantined_total") == len(bad)
    for reason, count in reasons.items():
        assert metric_sum(metrics, "storegw_messages_quarantined_total", reason=reason) == count, reason
    # Everything the broker delivered was counted; the unrouted messages never reached the gateway.
    assert metric_sum(metrics, "storegw_messages_received_total") == len(good) + len(bad)

    want_receipts = sorted(m.receipt_no for m in good_messages)
    assert sorted(receipts(hq_events)) == want_receipts  # exactly once, nothing bad or unrouted among them
    committed = journal_kinds(data_dir)
    assert committed.get("pos.sale", 0) + committed.get("pos.return", 0) == len(good)
    assert read_ledger(data_dir) == expected_ledger(catalog_stock(), terminal.expected_deltas)


@pytest.mark.slow
async def test_a_flood_of_garbage_does_not_stop_good_traffic(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    config_path, data_dir = _config_and_dirs(store_broker, hq_broker, tmp_path)
    small = [g for g in garbage_messages() if g.reason != "too_large"]
    flood = [
        (f"store/pos/{TERMINALS[n % len(TERMINALS)]}/{g.action}", g.payload)
        for n, g in zip(range(1000), itertools.cycle(small), strict=False)
    ]
    async with running_receiver(hq_broker, tmp_path / "hq.db"):
        with HqView(tmp_path / "hq.db") as hq:
            async with running_gateway(load(config_path)) as gateway:
                garbage_task = asyncio.create_task(
                    publish_all(store_broker.host, store_broker.port, "e2e-flood", flood, window=100)
                )
                try:
                    result = await run_terminals(
                        broker_config(store_broker), TERMINALS, count_per_terminal=100, return_ratio=0.1
                    )
                    _, _, acked = await garbage_task
                finally:
                    await asyncio.wait([garbage_task])
                assert acked == len(flood)
                assert (result.failed, result.errors) == (0, {})
                await wait_handled(gateway, hq, received=len(flood) + result.total)
                assert gateway.health()["status"] == "ok"
                metrics = await _metrics(gateway)
                hq_events = hq.events()

    assert Counter(receipts(hq_events)) == Counter(result.receipts)
    # Each till keeps its quota of rows a window, then a summary row; the counters still count every message.
    assert len(read_quarantine(data_dir)) < len(flood) // 4
    tills = [gateway.devices.get(t) for t in TERMINALS]
    assert sum(t.health.quarantined for t in tills if t is not None) == len(flood)
    assert metric_sum(own_metrics(gateway), "storegw_messages_quarantined_total") == len(flood)
    assert metric_sum(metrics, "storegw_messages_received_total") >= len(flood)
    assert read_ledger(data_dir) == expected_ledger(catalog_stock(), result.expected_deltas)
