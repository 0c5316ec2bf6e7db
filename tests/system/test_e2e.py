"""End to end: simulated tills -> store mosquitto -> gateway -> HQ mosquitto -> HQ reference receiver.

Each test runs two real brokers (store and HQ), the gateway (in-process, or as ``store-gateway run`` in a
subprocess) and the HQ receiver with its own SQLite database, and checks what HQ and the stock ledger end up
with: every acknowledged sale and return exactly once, seq without gaps, on-hand = initial + movements.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.runtime import Gateway
from simulators.pos import PosMessage, run_terminals
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    AUTH,
    GATEWAY_ID,
    INITIAL_ON_HAND,
    POS_KINDS,
    STORE_ID,
    TERMINALS,
    GatewayProcess,
    HqView,
    StockSeed,
    broker_config,
    catalog_stock,
    expected_ledger,
    gateway_status_topic,
    journal_kinds,
    last_stock_levels,
    load,
    metric_sum,
    own_metrics,
    parse_metrics,
    poll_until,
    publish_and_wait,
    read_ledger,
    read_retained,
    receipts,
    running_gateway,
    running_receiver,
    sale_payload,
    wait_handled,
    write_config,
)


@pytest.mark.slow
async def test_sales_and_returns_reach_hq_exactly_once_and_move_stock(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    stock = catalog_stock()
    config = load(
        write_config(
            tmp_path / "store.yaml", store_port=store_broker.port, hq_port=hq_broker.port, data_dir=data_dir
        )
    )
    sent: dict[str, PosMessage] = {}
    async with running_receiver(hq_broker, tmp_path / "hq.db") as hq_store:
        with HqView(tmp_path / "hq.db") as hq:
            async with running_gateway(config) as gateway:
                result = await run_terminals(
                    broker_config(store_broker),
                    TERMINALS,
                    count_per_terminal=400,
                    return_ratio=0.2,
                    seed=7,
                    on_publish=lambda m: sent.__setitem__(m.receipt_no, m),
                )
                assert (result.failed, result.errors) == (0, {})
                assert result.total == 2000
                assert result.published["pos.return"] > 0
                await poll_until(
                    lambda: hq.count(*POS_KINDS) >= result.total and hq.max_seq() >= gateway.journal.last_seq,
                    f"{result.total} sales and returns at HQ",
                    state=lambda: {"hq": hq.state(), "gateway": gateway.health()},
                )
            hq_events = hq.events()
            kinds = hq.kinds()
            max_seq = hq.max_seq()
        gaps_at_hq = hq_store.gaps(GATEWAY_ID)

    assert kinds.get("pos.sale", 0) == result.published["pos.sale"]
    assert kinds.get("pos.return", 0) == result.published["pos.return"]
    hq_receipts = receipts(hq_events)
    assert len(hq_receipts) == len(set(hq_receipts)), "a receipt reached HQ more than once"
    assert set(hq_receipts) == set(result.receipts)
    assert gaps_at_hq == []
    assert [e["seq"] for e in hq_events] == list(range(1, max_seq + 1))
    for event in hq_events:
        if event["kind"] in POS_KINDS:
            _assert_carries(event, sent[event["data"]["receipt_no"]])

    ledger = read_ledger(data_dir)
    assert ledger == expected_ledger(stock, result.expected_deltas)
    assert any(v != INITIAL_ON_HAND for v in ledger.values())

    levels = last_stock_levels(hq_events)
    assert set(levels) == set(result.expected_deltas)
    for sku, on_hand in levels.items():
        assert on_hand == ledger[sku], sku
    assert "alert.raised" not in kinds  # every SKU stays far above any threshold


def _assert_carries(event: dict[str, Any], message: PosMessage) -> None:
    """The envelope HQ got says what the till sent: kind, device, till time with its offset, receipt lines."""
    sent = orjson.loads(message.payload)
    assert event["kind"] == message.kind
    assert event["device_id"] == message.device_id
    assert (event["store_id"], event["gateway_id"]) == (STORE_ID, GATEWAY_ID)
    occurred = datetime.fromisoformat(event["occurred_at"])
    assert occurred == datetime.fromisoformat(sent["occurred_at"])
    assert occurred.utcoffset() == timedelta(hours=8), "the till's own UTC offset is kept"
    data = event["data"]
    assert "occurred_at" not in data
    for key in ("receipt_no", "register_id", "cashier_id", "currency", "original_receipt_no"):
        assert data.get(key) == sent.get(key), key
    assert [(li["sku"], Decimal(str(li["quantity"])), Decimal(li["unit_price"])) for li in data["lines"]] == [
        (li["sku"], Decimal(str(li["quantity"])), Decimal(li["unit_price"])) for li in sent["lines"]
    ]
    assert Decimal(data["totals"]["total"]) == Decimal(sent["totals"]["total"])


async def test_low_stock_raises_one_alert_per_crossing_across_a_restart(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    low = StockSeed("LOW-0001", 10, safety_stock=5)
    config = load(
        write_config(
            tmp_path / "store.yaml",
            store_port=store_broker.port,
            hq_port=hq_broker.port,
            data_dir=tmp_path / "data",
            stock=[*catalog_stock(), low],
        )
    )
    till = TERMINALS[0]
    receipt_numbers = itertools.count(1)

    def alerts(hq: HqView) -> list[dict[str, Any]]:
        return [e["data"] for e in hq.events("alert.raised")]

    async def move(hq: HqView, gateway: Gateway, action: str, quantity: int) -> None:
        """One sale or return of LOW-0001, alone in its commit, and wait until HQ has it."""
        n = next(receipt_numbers)
        payload = sale_payload(f"low-{n}", till, [(low.sku, quantity)])
        await publish_and_wait(store_broker, [(f"store/pos/{till}/{action}", payload)], "e2e-till")
        await poll_until(
            lambda: hq.count(*POS_KINDS) >= n and hq.max_seq() >= gateway.journal.last_seq,
            f"movement {n} at HQ",
            state=hq.state,
        )

    async with running_receiver(hq_broker, tmp_path / "hq.db"):
        with HqView(tmp_path / "hq.db") as hq:
            async with running_gateway(config) as gateway:
                for _ in range(4):  # 10 -> 8 -> 6 -> 4 (crosses 5) -> 2
                    await move(hq, gateway, "sale", 2)
                first = alerts(hq)
            assert len(first) == 1, first
            assert (first[0]["rule"], first[0]["subject"]) == ("stock.low", low.sku)
            details = first[0]["details"]
            assert (Decimal(str(details["on_hand"])), Decimal(str(details["safety_stock"]))) == (
                Decimal(4),
                Decimal(5),
            )

            async with running_gateway(config) as gateway:  # the rule's state survives a restart
                await move(hq, gateway, "sale", 2)  # 2 -> 0: still low, no new alert
                assert len(alerts(hq)) == 1, alerts(hq)
                await move(hq, gateway, "return", 20)  # 0 -> 20: re-arms
                for _ in range(3):  # 20 -> 16 -> 12 -> 8: above the threshold
                    await move(hq, gateway, "sale", 4)
                assert len(alerts(hq)) == 1, alerts(hq)
                await move(hq, gateway, "sale", 3)  # 8 -> 5: at the threshold counts as low
                both = alerts(hq)
                levels = last_stock_levels(hq.events())
    assert len(both) == 2, both
    assert all((a["rule"], a["subject"]) == ("stock.low", low.sku) for a in both)
    assert levels[low.sku] == Decimal(5)
    assert read_ledger(tmp_path / "data")[low.sku] == Decimal(5)


async def test_a_receipt_sent_twice_counts_once(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    """A till that re-sends a receipt (it never saw the PUBACK) must not sell the goods twice."""
    data_dir = tmp_path / "data"
    config = load(
        write_config(
            tmp_path / "store.yaml", store_port=store_broker.port, hq_port=hq_broker.port, data_dir=data_dir
        )
    )
    a, b = TERMINALS[2], TERMINALS[3]
    sale = sale_payload("R-1", "reg-1", [("SKU-0005", 3)])
    messages = [
        (f"store/pos/{a}/sale", sale),
        (f"store/pos/{a}/sale", sale),  # the re-send: dropped
        (f"store/pos/{b}/sale", sale),  # same receipt number at another till: a different sale
        (f"store/pos/{a}/return", sale_payload("R-1", "reg-1", [("SKU-0005", 1)])),  # a return is not a sale
        (f"store/pos/{a}/sale", sale),  # dropped again, after the others
    ]
    async with running_receiver(hq_broker, tmp_path / "hq.db"):
        with HqView(tmp_path / "hq.db") as hq:
            async with running_gateway(config) as gateway:
                for n, message in enumerate(messages, start=1):  # one at a time: each in its own commit
                    await publish_and_wait(store_broker, [message], "e2e-dup-till")
                    await wait_handled(gateway, hq, received=n)
                duplicates = metric_sum(own_metrics(gateway), "storegw_messages_duplicate_total")
            pos = [(e["kind"], e["device_id"]) for e in hq.events(*POS_KINDS)]
    assert sorted(pos) == sorted([("pos.sale", a), ("pos.sale", b), ("pos.return", a)])
    assert duplicates == 2
    assert read_ledger(data_dir)["SKU-0005"] == INITIAL_ON_HAND - 3 - 3 + 1


async def test_local_api_health_is_open_and_the_rest_needs_the_token(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    config = load(
        write_config(
            tmp_path / "store.yaml",
            store_port=store_broker.port,
            hq_port=hq_broker.port,
            data_dir=tmp_path / "data",
        )
    )
    till = TERMINALS[1]
    sales = [(f"store/pos/{till}/sale", sale_payload(f"api-{n}", till, [("SKU-0003", 1)])) for n in range(25)]
    sales.append((f"store/pos/{till}/return", sale_payload("api-r1", till, [("SKU-0003", 2)])))
    async with (
        running_receiver(hq_broker, tmp_path / "hq.db"),
        running_gateway(config) as gateway,
    ):
        port = await gateway.wait_api()
        base = f"http://127.0.0.1:{port}"
        await publish_and_wait(store_broker, sales, "e2e-api-till")
        with HqView(tmp_path / "hq.db") as hq:
            await wait_handled(gateway, hq, received=len(sales))
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            health = await http.get("/health")
            assert health.status_code == 200
            body = health.json()
            assert body["status"] == "ok"
            assert (body["store_id"], body["gateway_id"]) == (STORE_ID, GATEWAY_ID)
            assert body["hq_connected"] is True

            for path in ("/api/stock", "/api/events", "/metrics"):
                assert (await http.get(path)).status_code == 401, path
                wrong = {"Authorization": "Bearer not-the-token-0123456789"}
                assert (await http.get(path, headers=wrong)).status_code == 401, path

            stock = await http.get("/api/stock", params={"sku": "SKU-0003"}, headers=AUTH)
            assert stock.status_code == 200
            assert stock.json()[0]["on_hand"] == INITIAL_ON_HAND - 25 + 2

            events = await http.get("/api/events", params={"kind": "pos.sale", "limit": 1000}, headers=AUTH)
            assert events.status_code == 200
            sold = orjson.loads(events.content)
            assert sorted(e["data"]["receipt_no"] for e in sold) == sorted(f"api-{n}" for n in range(25))

            metrics = await http.get("/metrics", headers=AUTH)
            assert metrics.status_code == 200
            values = parse_metrics(metrics.text)
            assert metric_sum(values, "storegw_events_committed_total", kind="pos.sale") == 25
            assert metric_sum(values, "storegw_events_committed_total", kind="pos.return") == 1
            assert metric_sum(values, "storegw_messages_quarantined_total") == 0


@pytest.mark.slow
async def test_hq_outages_lose_nothing(
    store_broker: Mosquitto, persistent_hq_broker: Mosquitto, tmp_path: Path
) -> None:
    """HQ is down when the gateway starts (it still ingests and acks), comes up, then fails again mid-stream."""
    hq_broker = persistent_hq_broker
    data_dir = tmp_path / "data"
    stock = catalog_stock()
    config = load(
        write_config(
            tmp_path / "store.yaml", store_port=store_broker.port, hq_port=hq_broker.port, data_dir=data_dir
        )
    )
    hq_db = tmp_path / "hq.db"
    async with running_receiver(hq_broker, hq_db):
        pass  # the receiver's persistent session (and subscription) now exists at HQ
    hq_broker.stop()
    async with running_gateway(config) as gateway:
        # More than the broker's in-flight window (1000): all of it commits only if the gateway acks.
        first = await run_terminals(
            broker_config(store_broker), TERMINALS, count_per_terminal=300, return_ratio=0.2
        )
        assert (first.failed, first.errors) == (0, {})

        def committed() -> int:
            return sum(journal_kinds(data_dir).get(k, 0) for k in POS_KINDS)

        await poll_until(
            lambda: committed() >= first.total,
            f"{first.total} committed while HQ is down",
            state=lambda: (committed(), gateway.health()),
        )
        health = gateway.health()
        assert health["status"] == "ok"
        assert health["hq_connected"] is False
        assert health["delivered_seq"] == 0
        assert health["backlog"] >= first.total

        hq_broker.start()
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                tills = asyncio.create_task(
                    run_terminals(
                        broker_config(store_broker), TERMINALS, count_per_terminal=400, rate_per_s=250.0
                    )
                )
                try:
                    await poll_until(
                        lambda: hq.count(*POS_KINDS) >= first.total + 100,
                        "the backlog and new sales flowing to HQ",
                        within=90,
                        state=lambda: {"hq": hq.state(), "gateway": gateway.health()},
                    )
                    hq_broker.stop()  # mid-stream: batches in flight to HQ, and at HQ to the receiver
                    hq_broker.start()
                    second = await tills
                finally:
                    await asyncio.wait([tills])
                assert (second.failed, second.errors) == (0, {})
                total = first.total + second.total
                await poll_until(
                    lambda: hq.count(*POS_KINDS) >= total and hq.max_seq() >= gateway.journal.last_seq,
                    "every sale at HQ after the second outage",
                    within=90,
                    state=lambda: {"hq": hq.state(), "gateway": gateway.health()},
                )
                hq_events = hq.events()
                max_seq = hq.max_seq()
        await poll_until(
            lambda: gateway.health()["hq_connected"], "the uplink to reconnect", state=gateway.health
        )

    assert Counter(receipts(hq_events)) == Counter(first.receipts + second.receipts)
    assert [e["seq"] for e in hq_events] == list(range(1, max_seq + 1))
    deltas = Counter(first.expected_deltas)
    deltas.update(second.expected_deltas)
    ledger = read_ledger(data_dir)
    assert ledger == expected_ledger(stock, deltas)
    levels = last_stock_levels(hq_events)
    assert levels == {sku: ledger[sku] for sku in levels}


@pytest.mark.slow
async def test_sigterm_and_sigint_stop_cleanly_and_leave_offline_status(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    """SIGTERM while tills are selling: exit 0, retained 'offline', and nothing acknowledged is lost."""
    data_dir = tmp_path / "data"
    stock = catalog_stock()
    api_port = free_port()
    config_path = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=data_dir,
        api_port=api_port,
    )
    hq_db = tmp_path / "hq.db"
    gateway = GatewayProcess(config_path, api_port, tmp_path / "gateway.log")

    async def retained_status(within: float = 10.0) -> str | None:
        status = await read_retained(hq_broker, gateway_status_topic(), within=within)
        return None if status is None else str(orjson.loads(status)["status"])

    async def retained_online() -> bool:
        return await retained_status(within=1.0) == "online"

    try:
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()
                await poll_until(retained_online, "the uplink's retained 'online' status at HQ")
                tills = asyncio.create_task(
                    run_terminals(
                        broker_config(store_broker), TERMINALS, count_per_terminal=200, rate_per_s=200.0
                    )
                )
                try:
                    await poll_until(lambda: hq.count(*POS_KINDS) >= 100, "sales flowing", state=hq.state)
                    assert await gateway.terminate() == 0, gateway.log_tail()  # mid-stream
                    assert await retained_status() == "offline"
                    result = await tills  # the broker keeps queueing for the gateway's session
                finally:
                    await asyncio.wait([tills])
                assert (result.failed, result.errors) == (0, {})

                # The gateway.status 'offline' event reaches HQ on the next start at the latest.
                gateway.start()
                await gateway.wait_healthy()
                await poll_until(
                    lambda: (
                        any(e["data"]["status"] == "offline" for e in hq.events("gateway.status"))
                        and hq.count(*POS_KINDS) >= result.total
                    ),
                    "the gateway.status offline event and every sale at HQ",
                    state=lambda: ([e["data"] for e in hq.events("gateway.status")], hq.state()),
                )
                assert await retained_status() == "online"
                assert await gateway.terminate(signal.SIGINT) == 0, gateway.log_tail()
                assert await retained_status() == "offline"
                hq_events = hq.events()
    finally:
        gateway.close()
    statuses = [e["data"]["status"] for e in hq_events if e["kind"] == "gateway.status"]
    assert statuses[:3] == ["online", "offline", "online"]
    assert statuses[3:] in ([], ["offline"])  # the last one may wait for the next start
    assert Counter(receipts(hq_events)) == Counter(result.receipts)
    assert [e["seq"] for e in hq_events] == list(range(1, len(hq_events) + 1))
    assert read_ledger(data_dir) == expected_ledger(stock, result.expected_deltas)
