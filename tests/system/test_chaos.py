"""Chaos tests of the store-and-forward bridge (issue #3), with real processes: the gateway as a subprocess
(``store-gateway run``), real mosquitto brokers for the store and HQ, and the HQ reference receiver.

Each test breaks something a store really meets (HQ's broker down for a while, a full disk budget during an
outage, a journal that no longer opens, a link that silently drops packets) and checks what HQ ends up with
against what the devices' broker acknowledged. Each prints what it measured (``[figures]`` lines, also
recorded as JUnit properties); no test asserts on a duration. Sections are numbered as in the issue; the
SIGKILL scenario (2) lives in test_sigkill.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.kernel.journal import BUDGET_HEADROOM, pages_needed
from gateway.kernel.journal.store import PAGE_SIZE
from gateway.kernel.outbox import ClassState
from simulators.catalog import CATALOG
from simulators.pos import PosMessage, run_terminals
from simulators.sensors import run_sensors
from tests.cloud_bridge.test_blackhole import BlackholeProxy
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    TERMINALS,
    GatewayProcess,
    HqView,
    StockSeed,
    broker_config,
    explained_runs,
    gap_runs,
    gateway_status_topic,
    hq_holds_everything,
    journal_db,
    journal_used_bytes,
    merge_runs,
    metric_sum,
    poll_until,
    publish_and_wait,
    read_ledger,
    read_retained,
    receipts,
    report_figures,
    running_receiver,
    sale_payload,
    subtract_runs,
    time_until,
    write_config,
)

RecordProperty = Callable[[str, object], None]


async def _create_receiver_session(hq_broker: Mosquitto, hq_db: Path) -> None:
    """Subscribe the receiver once, so its persistent session exists at HQ before the gateway delivers."""
    async with running_receiver(hq_broker, hq_db):
        pass


def _gateway(tmp_path: Path, store: Mosquitto, hq_port: int, **config: Any) -> GatewayProcess:
    api_port = free_port()
    path = write_config(
        tmp_path / "store.yaml",
        store_port=store.port,
        hq_port=hq_port,
        data_dir=tmp_path / "data",
        api_port=api_port,
        **config,
    )
    return GatewayProcess(path, api_port, tmp_path / "gateway.log")


async def _uplink_connected(gateway: GatewayProcess) -> bool:
    return metric_sum(await gateway.metrics(), "storegw_uplink_connected") == 1


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


def test_the_gap_arithmetic_the_chaos_tests_rely_on() -> None:
    """The assertions below say 'no unexplained gap' by an empty list: make sure the helpers can say more."""
    assert gap_runs([2, 3, 7, 9], through=12) == [(1, 1), (4, 6), (8, 8), (10, 12)]
    assert gap_runs([], through=0) == []
    assert merge_runs([[5, 6], [1, 2], [3, 3], [9, 12], [10, 11], [4, 4]]) == [(1, 6), (9, 12)]
    assert merge_runs([[5, 6], [1, 3]]) == [(1, 3), (5, 6)]
    assert subtract_runs([(1, 10), (20, 30)], [[2, 3], [5, 22], [30, 40]]) == [(1, 1), (4, 4), (23, 29)]
    events = [
        {"kind": "outbox.evicted", "data": {"ranges": [[4, 6]]}},
        {"kind": "alert.raised", "data": {"rule": "journal.corrupt", "details": {"possibly_lost": [10, 11]}}},
        {"kind": "alert.raised", "data": {"rule": "stock.low", "details": {}}},
        {"kind": "pos.sale", "data": {}},
    ]
    assert explained_runs(events) == [(4, 6), (10, 11)]


# --- 1. HQ's broker down for the middle third of a run ------------------------------------------------------

OUTAGE_SALES_PER_TILL = 4000
OUTAGE_RATE_PER_TILL = 500.0
"""5 tills x 4,000 = 20,000 sales at 2,500/s: about 8 s of selling, HQ down for the middle ~2.7 s."""


@pytest.mark.slow
async def test_hq_down_for_the_middle_third_of_20000_sales_loses_and_duplicates_nothing(
    store_broker: Mosquitto,
    persistent_hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """HQ's broker stops after a third of the sales and comes back after two thirds: the gateway keeps taking
    sales, delivers the backlog when HQ is back, and HQ ends with every event once and no gap."""
    hq_broker = persistent_hq_broker
    hq_db = tmp_path / "hq.db"
    planned = len(TERMINALS) * OUTAGE_SALES_PER_TILL
    acked = [0]

    def count(_: PosMessage) -> None:
        acked[0] += 1

    await _create_receiver_session(hq_broker, hq_db)
    gateway = _gateway(tmp_path, store_broker, hq_broker.port)
    try:
        # The receiver reconnects on its own after the outage, quickly: the figure is about the gateway.
        async with running_receiver(hq_broker, hq_db, backoff_cap_s=0.1):
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()
                tills = asyncio.create_task(
                    run_terminals(
                        broker_config(store_broker),
                        TERMINALS,
                        count_per_terminal=OUTAGE_SALES_PER_TILL,
                        rate_per_s=OUTAGE_RATE_PER_TILL,
                        on_publish=count,
                    ),
                    name="chaos-tills",
                )
                try:
                    await poll_until(lambda: acked[0] >= planned // 3, "a third of the sales", interval=0.01)
                    await asyncio.to_thread(hq_broker.stop)
                    down_at, sales_at_down = time.monotonic(), acked[0]
                    await poll_until(
                        lambda: _not(_uplink_connected(gateway)), "the uplink to see HQ gone", within=20
                    )
                    # Everything above the delivered watermark was never acknowledged by HQ: whatever of it
                    # reaches HQ later came over a new connection.
                    delivered = int((await gateway.health())["delivered_seq"])
                    await poll_until(
                        lambda: acked[0] >= 2 * planned // 3, "two thirds of the sales", interval=0.01
                    )
                    before = hq.count_above(delivered)
                    await asyncio.to_thread(hq_broker.start)
                    up_at, up_wall, sales_at_up = time.monotonic(), time.time(), acked[0]
                    committed_at_up = int((await gateway.health())["last_seq"])
                    first_new_at = await time_until(
                        lambda: hq.count_above(delivered) > before,
                        "the first event HQ had not acknowledged before the outage",
                        interval=0.005,
                    )
                    caught_up_at = await time_until(
                        lambda: hq.count() - hq.count_above(committed_at_up) >= committed_at_up,
                        "HQ to hold everything committed while it was down",
                        within=60,
                    )
                    result = await tills
                finally:
                    await asyncio.wait([tills])
                assert (result.failed, result.errors) == (0, {})
                assert result.total == planned
                await poll_until(
                    lambda: hq_holds_everything(gateway, hq, planned),
                    "every sale at HQ",
                    state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                )
                hq_events = hq.events()
                counters = hq.counters()
            birth = await read_retained(hq_broker, gateway_status_topic())
        assert await gateway.terminate() == 0, gateway.log_tail()
    finally:
        gateway.close()

    assert birth is not None
    reconnected = orjson.loads(birth)  # the uplink's retained 'online', stamped with the gateway's clock
    assert reconnected["status"] == "online"
    at_hq = Counter(receipts(hq_events))
    assert at_hq == Counter(result.receipts), (
        "a sale the tills' broker acknowledged is missing or doubled at HQ"
    )
    assert [e["seq"] for e in hq_events] == list(range(1, len(hq_events) + 1)), "a seq gap at HQ"
    assert counters["conflicts"] == 0
    report_figures(
        record_property,
        capsys,
        "HQ outage, middle third of 20,000 sales",
        {
            "outage_s": up_at - down_at,
            "sales_acked_during_outage": sales_at_up - sales_at_down,
            "undelivered_events_at_return": committed_at_up - delivered,
            "uplink_reconnect_s": reconnected["at"] - up_wall,
            "first_new_event_at_hq_s": first_new_at - up_at,
            "outage_backlog_at_hq_s": caught_up_at - up_at,
            "duplicates_before_dedup": counters["duplicates"],
            "events_at_hq": len(hq_events),
        },
    )


# --- 3. disk budget exceeded during an outage -----------------------------------------------------------------

SENSORS = tuple(f"probe-{n:02d}" for n in range(1, 5))
BUDGET_SALES_PER_TILL = 120
READINGS_PER_SENSOR = 5000
"""600 sales (~0.5 MiB of events) and 20,000 readings (~6 MiB): only the readings can make room."""
LOW_SKUS = frozenset(item.sku for item in CATALOG[:4])
LOW_ON_HAND, SAFETY_STOCK = 100, 50
"""4 SKUs start at 100 with a safety stock of 50: 600 sales (no returns) take each below it once."""
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Budget:
    reason: str
    """The ``outbox.evicted`` reason this budget must produce."""
    outbox: dict[str, Any]
    within: Callable[[GatewayProcess], Awaitable[bool]]


async def _journal_within(gateway: GatewayProcess) -> bool:
    """Pages within the cap, or the events left fit it and the excess is part-full pages, which the gateway
    does not chase by evicting sales (docs/OUTBOX.md, "Disk budget")."""
    if journal_used_bytes(gateway.config_path.parent / "data") <= 2 * MIB:
        return True
    outbox = (await gateway.health())["outbox"]
    states = {
        n: ClassState(stored_events=int(c["stored"]), stored_bytes=int(c["bytes"]))
        for n, c in enumerate(outbox.values())
    }
    return pages_needed(states, PAGE_SIZE) <= 2 * MIB * BUDGET_HEADROOM


async def _telemetry_within(gateway: GatewayProcess) -> bool:
    return int((await gateway.health())["outbox"]["telemetry"]["bytes"]) <= MIB // 2


BUDGETS = {
    "journal_2MiB": Budget("disk_budget", {"max_bytes": 2 * MIB}, _journal_within),
    "telemetry_512KiB": Budget(
        "class_budget", {"classes": {"telemetry": {"max_bytes": MIB // 2}}}, _telemetry_within
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
async def test_a_budget_exceeded_during_an_outage_evicts_telemetry_only_and_explains_every_gap(
    budget: Budget,
    store_broker: Mosquitto,
    persistent_hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """HQ is down while sensors and tills publish more than the journal may hold: the oldest telemetry makes
    room, every sale and alert reaches HQ when it is back, and every seq HQ never gets was reported evicted."""
    hq_broker = persistent_hq_broker
    hq_db = tmp_path / "hq.db"
    data_dir = tmp_path / "data"
    stock = [
        StockSeed(i.sku, LOW_ON_HAND, SAFETY_STOCK) if i.sku in LOW_SKUS else StockSeed(i.sku, 1_000_000)
        for i in CATALOG
    ]
    await _create_receiver_session(hq_broker, hq_db)
    await asyncio.to_thread(hq_broker.stop)
    gateway = _gateway(
        tmp_path, store_broker, hq_broker.port, sensors=SENSORS, stock=stock, outbox=budget.outbox
    )
    try:
        gateway.start()
        await gateway.wait_healthy()
        started_at = time.monotonic()
        sales, readings = await asyncio.gather(
            run_terminals(
                broker_config(store_broker),
                TERMINALS,
                count_per_terminal=BUDGET_SALES_PER_TILL,
                rate_per_s=200.0,
                return_ratio=0.0,
            ),
            run_sensors(broker_config(store_broker), SENSORS, count_per_sensor=READINGS_PER_SENSOR),
        )
        assert (sales.failed, sales.errors, readings.failed, readings.errors) == (0, {}, 0, {})
        # Acknowledged means committed; eviction runs between commits: wait until the budget holds again.
        published_at = time.monotonic()
        await poll_until(lambda: budget.within(gateway), "the outbox back within its budget", interval=0.1)
        evicted_at = time.monotonic()
        during = await gateway.health()
        used_bytes, file_bytes = journal_used_bytes(data_dir), journal_db(data_dir).stat().st_size
        assert during["hq_connected"] is False

        await asyncio.to_thread(hq_broker.start)
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                drained_at = await time_until(
                    lambda: hq_holds_everything(gateway, hq, sales.total),
                    "the outbox drained to HQ",
                    state=lambda: {
                        "hq": hq.state(),
                        "gaps": hq.unexplained_gaps(),
                        "log": gateway.log_tail(10),
                    },
                )
                hq_events = hq.events()
                stored = hq.seqs()
                unexplained = hq.unexplained_gaps()
        assert await gateway.terminate() == 0, gateway.log_tail()
        ledger = read_ledger(data_dir)
    finally:
        gateway.close()

    assert Counter(receipts(hq_events)) == Counter(sales.receipts), "a sale is missing or doubled at HQ"
    reports = [e["data"] for e in hq_events if e["kind"] == "outbox.evicted"]
    assert {r["class"] for r in reports} == {"telemetry"}, "something other than telemetry was evicted"
    assert budget.reason in {r["reason"] for r in reports}, "the budget under test never evicted anything"
    assert unexplained == [], "seqs missing at HQ that no outbox.evicted explains"
    evicted = explained_runs(hq_events)
    assert [s for s in stored if any(a <= s <= b for a, b in evicted)] == [], "HQ holds an evicted event"
    telemetry = [e["seq"] for e in hq_events if e["kind"] == "sensor.reading"]
    assert len(telemetry) + sum(r["count"] for r in reports) == readings.total, (
        "a reading vanished unreported"
    )
    assert evicted[-1][1] < min(telemetry), "eviction did not take the oldest telemetry first"
    crossed = {sku for sku in LOW_SKUS if ledger[sku] <= SAFETY_STOCK}
    assert crossed, "no SKU went below its safety stock: the run proves nothing about alerts"
    alerts = [e["data"] for e in hq_events if e["kind"] == "alert.raised"]
    assert sorted(a["subject"] for a in alerts if a["rule"] == "stock.low") == sorted(crossed)

    by_reason = Counter[str]()
    for r in reports:
        by_reason[r["reason"]] += r["count"]
    report_figures(
        record_property,
        capsys,
        f"{budget.reason} exceeded during an outage",
        {
            "publish_s": published_at - started_at,
            "budget_wait_s": evicted_at - published_at,
            "drain_s": drained_at - evicted_at,
            "readings_acked": readings.total,
            "readings_at_hq": len(telemetry),
            **{f"evicted_{reason}": n for reason, n in sorted(by_reason.items())},
            "evicted_reports": len(reports),
            "journal_used_bytes": used_bytes,
            "journal_file_bytes": file_bytes,
            "telemetry_bytes_left": during["outbox"]["telemetry"]["bytes"],
            "transaction_bytes": during["outbox"]["transaction"]["bytes"],
            "sales_at_hq": sales.total,
            "stock_low_alerts": len(crossed),
        },
    )


# --- 4. a corrupt journal on start ------------------------------------------------------------------------


def _checkpoint(path: Path) -> None:
    """Copy the WAL into the database file and remove it (the last connection to close deletes it)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _garble(path: Path) -> bytes:
    """Overwrite the whole file with random bytes of the same size."""
    garbage = random.Random(3).randbytes(path.stat().st_size)
    path.write_bytes(garbage)
    return garbage


def _truncate(path: Path) -> bytes:
    """Cut the file in the middle, as a full disk or a torn copy leaves it."""
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    return data


def _truncate_at_page(path: Path) -> bytes:
    """Cut the file at a page boundary in the middle: every page left is whole, the header's page count lies."""
    data = path.read_bytes()
    data = data[: len(data) // 2 // 4096 * 4096]
    path.write_bytes(data)
    return data


@pytest.mark.parametrize(
    "damage", [_garble, _truncate, _truncate_at_page], ids=["garbage", "truncated", "truncated_at_page"]
)
async def test_a_corrupt_journal_is_moved_aside_and_reported_and_seqs_never_go_back(
    damage: Callable[[Path], bytes],
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    hq_db = tmp_path / "hq.db"
    till = TERMINALS[0]
    gateway = _gateway(tmp_path, store_broker, hq_broker.port)

    def sales(prefix: str, n: int) -> list[tuple[str, bytes]]:
        return [
            (f"store/pos/{till}/sale", sale_payload(f"{prefix}-{i}", till, [("SKU-0002", 1)]))
            for i in range(n)
        ]

    try:
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()
                await publish_and_wait(store_broker, sales("old", 300), "chaos-till")
                await poll_until(
                    lambda: hq_holds_everything(gateway, hq, 300), "the first sales at HQ", state=hq.state
                )
                assert await gateway.terminate() == 0, gateway.log_tail()
                old_ids = {e["id"] for e in hq.events()}
                old_max = hq.max_seq()

                journal = journal_db(data_dir)
                _checkpoint(journal)  # the events into the main file, as a long-running gateway has them
                companions = sorted(p.name[len(journal.name) :] for p in data_dir.glob(journal.name + "-*"))
                size = journal.stat().st_size
                written = damage(journal)
                gateway.start()
                await gateway.wait_healthy()
                await publish_and_wait(store_broker, sales("new", 50), "chaos-till")

                def alerted() -> bool:
                    return any(e["data"]["rule"] == "journal.corrupt" for e in hq.events("alert.raised"))

                await poll_until(
                    lambda: alerted() and hq.count("pos.sale") >= 350,
                    "the journal.corrupt alert and the new sales at HQ",
                    state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                )
                assert await gateway.terminate() == 0, gateway.log_tail()
                hq_events = hq.events()
                unexplained = hq.unexplained_gaps()
                counters = hq.counters()
    finally:
        gateway.close()

    (moved,) = [p for p in data_dir.glob("journal.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert moved.read_bytes() == written, "the moved-aside file is not the damaged journal"
    assert sorted(p.name[len(moved.name) :] for p in data_dir.glob(moved.name + "-*")) == companions
    (alert,) = [
        e for e in hq_events if e["kind"] == "alert.raised" and e["data"]["rule"] == "journal.corrupt"
    ]
    assert alert["data"]["details"]["moved_to"].endswith(moved.name)
    new = [e for e in hq_events if e["id"] not in old_ids]
    assert min(e["seq"] for e in new) > old_max, "the fresh journal reused a seq of the lost one"
    assert counters["conflicts"] == 0
    assert sorted(receipts(new)) == sorted(f"new-{i}" for i in range(50))
    assert unexplained == [], "a gap at HQ the alert does not explain"
    report_figures(
        record_property,
        capsys,
        f"corrupt journal ({damage.__name__.strip('_')})",
        {
            "journal_bytes": size,
            "companions_moved": companions,
            "old_max_seq": old_max,
            "new_first_seq": min(e["seq"] for e in new),
            "possibly_lost": alert["data"]["details"]["possibly_lost"],
            "reason": alert["data"]["details"]["reason"],
        },
    )


# --- 5. a black-holed HQ link -----------------------------------------------------------------------------

KEEPALIVE_S = 5


@pytest.mark.slow
async def test_black_hole_detection_time_against_keepalive(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A link that swallows packets without closing anything is caught by MQTT keepalive (within about twice
    ``keepalive_s``; measured and printed, not asserted), and recovers with nothing lost."""
    proxy = BlackholeProxy(hq_broker.port)
    await proxy.start()
    hq_db = tmp_path / "hq.db"
    gateway = _gateway(
        tmp_path, store_broker, proxy.port, hq={"keepalive_s": KEEPALIVE_S, "reconnect_max_s": 2}
    )
    tills_out = TERMINALS[:2]
    try:
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()
                await poll_until(lambda: _uplink_connected(gateway), "the uplink through the proxy")
                tills = asyncio.create_task(
                    run_terminals(broker_config(store_broker), tills_out, duration_s=12.0, rate_per_s=50.0),
                    name="chaos-tills",
                )
                try:
                    await poll_until(
                        lambda: hq.count("pos.sale") >= 50, "sales flowing to HQ", state=hq.state
                    )
                    proxy.blackhole()
                    holed_at, sales_at_hole = time.monotonic(), hq.count("pos.sale")
                    detected_at = await time_until(
                        lambda: _not(_uplink_connected(gateway)), "keepalive to catch the black hole"
                    )
                    proxy.restore()
                    recovered_at = await time_until(
                        lambda: _uplink_connected(gateway), "the uplink to reconnect after the black hole"
                    )
                    result = await tills
                finally:
                    await asyncio.wait([tills])
                assert (result.failed, result.errors) == (0, {})
                await poll_until(
                    lambda: hq_holds_everything(gateway, hq, result.total),
                    "every sale at HQ after the black hole",
                    state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                )
                hq_events = hq.events()
        assert await gateway.terminate() == 0, gateway.log_tail()
    finally:
        gateway.close()
        await proxy.close()

    log = gateway.log_path.read_text(errors="replace")
    assert re.search(r"keep ?alive timeout", log, re.IGNORECASE), f"not caught by keepalive:\n{log[-3000:]}"
    assert Counter(receipts(hq_events)) == Counter(result.receipts)
    assert [e["seq"] for e in hq_events] == list(range(1, len(hq_events) + 1))
    detection = detected_at - holed_at
    report_figures(
        record_property,
        capsys,
        "black-holed HQ link",
        {
            "keepalive_s": KEEPALIVE_S,
            "detection_s": detection,
            "detection_over_keepalive": detection / KEEPALIVE_S,
            "recovery_after_restore_s": recovered_at - detected_at,
            "sales_at_hq_when_holed": sales_at_hole,
            "proxy_connections": proxy.connections,
        },
    )
