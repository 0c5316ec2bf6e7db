"""Crash safety: SIGKILL the gateway process five times at random moments while tills publish; nothing
acknowledged is lost, and HQ sees at most one in-flight window again per kill.

The tills publish to the store broker, not to the gateway, so they keep going while the gateway is dead; the
broker queues for the gateway's persistent session and redelivers what the gateway had not acknowledged.
The gateway acknowledges only after its commit, and drops redeliveries by dedup key, so every sale the
broker acknowledged to a till must reach HQ exactly once, with no seq gap, and move stock exactly once.
Towards HQ, the in-flight window counts batches until their acknowledgement is on disk (docs/OUTBOX.md), so
a kill resends at most ``hq.inflight_batches`` x ``hq.batch_max_events`` events that HQ already had: the
receiver counts them as duplicates before deduplicating.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import orjson
import pytest

from simulators.pos import run_terminals
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    GATEWAY_ID,
    TERMINALS,
    GatewayProcess,
    HqView,
    broker_config,
    catalog_stock,
    expected_ledger,
    gateway_status_topic,
    hq_holds_everything,
    journal_kinds,
    last_stock_levels,
    poll_until,
    read_ledger,
    read_retained,
    receipts,
    report_figures,
    running_receiver,
    write_config,
)

MESSAGES_PER_TERMINAL = 2000
RATE_PER_TERMINAL = 250.0
"""5 tills x 250/s: publishing lasts about 8 s, so the kills land while tills are still selling (or while the
restarted gateway replays what the broker queued meanwhile)."""
KILLS = 5
KILL_AFTER_NEW_SALES = (50, 800)
"""Each kill comes once HQ holds a random number of sales in this range more than at the last (re)start:
intake, commits, replay and uplink all busy, at a different phase each time."""
INFLIGHT_BATCHES = 2
BATCH_MAX_EVENTS = 100
WINDOW = INFLIGHT_BATCHES * BATCH_MAX_EVENTS
"""Events one kill may make HQ receive twice (no critical event flows here: no extra slot)."""


@dataclass(frozen=True, slots=True)
class Kill:
    """Where a kill landed (shown when the test fails)."""

    hq_sales: int
    committed: int
    """Sales in the journal just after the kill."""
    tills_done: bool
    hq_duplicates: int
    """Duplicates the receiver had counted just before the kill."""


def _reached(hq: HqView, sales: int) -> bool:
    return hq.count("pos.sale") >= sales


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
async def test_sigkill_five_times_loses_nothing_and_resends_at_most_a_window_each(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
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
        hq={"inflight_batches": INFLIGHT_BATCHES, "batch_max_events": BATCH_MAX_EVENTS},
    )
    gateway = GatewayProcess(config_path, api_port, tmp_path / "gateway.log")
    hq_db = tmp_path / "hq.db"
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    planned = len(TERMINALS) * MESSAGES_PER_TERMINAL
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
                    for n in range(1, KILLS + 1):
                        base = hq.count("pos.sale")
                        # Never wait for more sales than can still come (tills done, everything replayed).
                        threshold = base + min(rng.randint(*KILL_AFTER_NEW_SALES), (planned - base) // 2)
                        await poll_until(
                            functools.partial(_reached, hq, threshold),
                            f"kill point {n} ({threshold} sales at HQ)",
                            interval=0.005,
                            state=lambda: {"hq": hq.state(), "kills": kills, "log": gateway.log_tail(10)},
                        )
                        duplicates = hq.counters()["duplicates"]
                        gateway.kill()
                        kills.append(
                            Kill(
                                hq.count("pos.sale"),
                                journal_kinds(data_dir).get("pos.sale", 0),
                                tills.done(),
                                duplicates,
                            )
                        )
                        if n == 1:
                            await _wait_for_last_will(hq_broker)
                        gateway.start()
                        await gateway.wait_healthy()
                    result = await tills
                finally:
                    if not tills.done():
                        tills.cancel()
                    await asyncio.wait([tills])
                assert (result.failed, result.errors) == (0, {})
                assert result.total == planned

                await poll_until(
                    lambda: hq_holds_everything(gateway, hq, result.total),
                    "every acknowledged sale at HQ",
                    state=lambda: {"hq": hq.state(), "kills": kills, "log": gateway.log_tail(10)},
                )
                assert await gateway.terminate() == 0, gateway.log_tail()
                hq_events = hq.events()
                max_seq = hq.max_seq()
                counters = hq.counters()
                gaps = hq_store.gaps(GATEWAY_ID)
    finally:
        gateway.close()

    assert len(kills) == KILLS
    at_hq = Counter(receipts(hq_events))
    duplicated = {r: n for r, n in at_hq.items() if n > 1}
    assert duplicated == {}, f"{len(duplicated)} receipts reached HQ more than once"
    missing = set(result.receipts) - set(at_hq)
    assert not missing, f"{len(missing)} acknowledged sales never reached HQ (kills: {kills})"
    assert set(at_hq) == set(result.receipts)
    assert gaps == []
    assert [e["seq"] for e in hq_events] == list(range(1, max_seq + 1))
    assert counters["conflicts"] == 0
    assert counters["duplicates"] <= KILLS * WINDOW, f"more than one window resent per kill: {kills}"
    assert journal_kinds(data_dir)["pos.sale"] == result.total
    ledger = read_ledger(data_dir)
    assert ledger == expected_ledger(stock, result.expected_deltas)
    levels = last_stock_levels(hq_events)  # what HQ was told matches the ledger, crashes or not
    assert levels == {sku: ledger[sku] for sku in levels}
    assert set(levels) == set(result.expected_deltas)

    # Duplicates counted between one kill and the next are the resends of the first (the resend comes first).
    marks = [k.hq_duplicates for k in kills] + [counters["duplicates"]]
    report_figures(
        record_property,
        capsys,
        f"SIGKILL x{KILLS} (seed {seed})",
        {
            "window_events": WINDOW,
            "duplicates_per_kill": [b - a for a, b in pairwise(marks)],
            "duplicates_total": counters["duplicates"],
            "hq_sales_at_kills": [k.hq_sales for k in kills],
            "tills_done_at_kills": [k.tills_done for k in kills],
            "sales": result.total,
        },
    )
