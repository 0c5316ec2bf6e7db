"""Crash safety: SIGKILL the gateway process three times while tills publish; nothing acknowledged is lost.

The tills publish to the store broker, not to the gateway, so they keep going while the gateway is dead; the
broker queues for the gateway's persistent session and redelivers what the gateway had not acknowledged.
The gateway acknowledges only after its commit, and drops redeliveries by dedup key, so every sale the
broker acknowledged to a till must reach HQ exactly once, with no seq gap, and move stock exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from simulators.pos import run_terminals
from tests.brokers import Mosquitto, free_port
from tests.e2e_helpers import (
    GATEWAY_ID,
    TERMINALS,
    GatewayProcess,
    HqView,
    broker_config,
    catalog_stock,
    expected_ledger,
    gateway_status_topic,
    journal_kinds,
    last_stock_levels,
    poll_until,
    read_ledger,
    read_retained,
    receipts,
    running_receiver,
    write_config,
)

MESSAGES_PER_TERMINAL = 1000
RATE_PER_TERMINAL = 250.0
"""5 tills x 250/s: publishing lasts about 4 s, so the kills land while tills are still selling."""
KILL_POINTS: tuple[tuple[str, int], ...] = (("hq", 1000), ("replay", 300), ("hq", 4000))
"""When to kill: ("hq", n) once HQ holds n sales (intake, commits and uplink all busy); ("replay", n) once the
restarted gateway has committed n of the sales the broker queued while it was dead (mid-replay)."""


@dataclass(frozen=True, slots=True)
class Kill:
    """Where a kill landed (shown when the test fails)."""

    hq_sales: int
    committed: int
    """Sales in the journal just after the kill."""
    tills_done: bool


async def _wait_for_last_will(hq_broker: Mosquitto) -> None:
    """The broker publishes the gateway's last will: HQ sees the killed gateway as offline."""
    seen: list[object] = []

    async def offline() -> bool:
        status = await read_retained(hq_broker, gateway_status_topic(), within=2)
        seen.append(None if status is None else orjson.loads(status))
        return status is not None and orjson.loads(status)["status"] == "offline"

    await poll_until(
        offline, "the last will (retained offline status) at HQ", within=20, state=lambda: seen[-3:]
    )


@pytest.mark.slow
async def test_sigkill_three_times_loses_and_duplicates_nothing(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
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
    gateway = GatewayProcess(config_path, api_port, tmp_path / "gateway.log")
    hq_db = tmp_path / "hq.db"
    kills: list[Kill] = []
    try:
        async with running_receiver(hq_broker, hq_db) as hq_store:
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()  # subscribed: the broker queues for its session from now on
                tills = asyncio.create_task(
                    run_terminals(
                        broker_config(store_broker),
                        TERMINALS,
                        count_per_terminal=MESSAGES_PER_TERMINAL,
                        rate_per_s=RATE_PER_TERMINAL,
                        return_ratio=0.0,
                    ),
                    name="e2e-tills",
                )
                try:
                    committed_before = 0
                    for where, threshold in KILL_POINTS:

                        def reached(
                            where: str = where, threshold: int = threshold, base: int = committed_before
                        ) -> bool:
                            if where == "hq":
                                return hq.count("pos.sale") >= threshold
                            return journal_kinds(data_dir).get("pos.sale", 0) >= base + threshold

                        await poll_until(
                            reached,
                            f"kill point {len(kills) + 1} ({where} {threshold})",
                            interval=0.005,
                            state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                        )
                        gateway.kill()
                        kills.append(
                            Kill(
                                hq.count("pos.sale"), journal_kinds(data_dir).get("pos.sale", 0), tills.done()
                            )
                        )
                        committed_before = kills[-1].committed
                        if len(kills) == 1:
                            await _wait_for_last_will(hq_broker)
                        gateway.start()
                        await gateway.wait_healthy()
                    result = await tills
                finally:
                    if not tills.done():
                        tills.cancel()
                    await asyncio.wait([tills])
                assert (result.failed, result.errors) == (0, {})
                assert result.total == len(TERMINALS) * MESSAGES_PER_TERMINAL

                async def settled() -> bool:
                    health = await gateway.health()
                    return (
                        hq.count("pos.sale") >= result.total
                        and health["backlog"] == 0
                        and hq.max_seq() >= int(health["last_seq"])
                    )

                await poll_until(
                    settled,
                    "every acknowledged sale at HQ",
                    state=lambda: {"hq": hq.state(), "kills": kills, "log": gateway.log_tail(10)},
                )
                assert await gateway.terminate() == 0, gateway.log_tail()
                hq_events = hq.events()
                max_seq = hq.max_seq()
                gaps = hq_store.gaps(GATEWAY_ID)
    finally:
        gateway.close()

    assert len(kills) == 3
    at_hq = Counter(receipts(hq_events))
    duplicated = {r: n for r, n in at_hq.items() if n > 1}
    assert duplicated == {}, f"{len(duplicated)} receipts reached HQ more than once"
    missing = set(result.receipts) - set(at_hq)
    assert not missing, f"{len(missing)} acknowledged sales never reached HQ (kills: {kills})"
    assert set(at_hq) == set(result.receipts)
    assert gaps == []
    assert [e["seq"] for e in hq_events] == list(range(1, max_seq + 1))
    assert journal_kinds(data_dir)["pos.sale"] == result.total
    ledger = read_ledger(data_dir)
    assert ledger == expected_ledger(stock, result.expected_deltas)
    levels = last_stock_levels(hq_events)  # what HQ was told matches the ledger, crashes or not
    assert levels == {sku: ledger[sku] for sku in levels}
    assert set(levels) == set(result.expected_deltas)
