"""Chaos at HQ, with real processes: a real gateway (``store-gateway run``) with tills publishing sales, a
persistent mosquitto HQ broker, and the HQ receiver as its own process (``store-gateway hq-receiver``).

The receiver is stopped, HQ's broker restarts while it is away, and the receiver comes back: every sale the
tills' broker acknowledged must end in HQ's database exactly once, without anyone stepping in. Two topologies
(docs/HQ-RECEIVER.md, "HQ topology"):

- ``plain``: the default, a plain subscription with a persistent session. mosquitto keeps the session and its
  queue across the restart, so nothing needs asking again.
- ``shared``: ``--share-group`` on mosquitto 2.0, which drops an absent member's shared subscription at the
  restart: the batches published until the receiver is back reach nobody (the gateway counts them delivered),
  and only ``--resend`` brings them back from the gateway's journal.

Each prints what it measured (``[figures]`` lines); no test asserts on a duration.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from simulators.pos import PosMessage, run_terminals
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    HQ_KEY_ID,
    HQ_PREFIX,
    TERMINALS,
    GatewayProcess,
    HqView,
    broker_config,
    hq_holds_everything,
    poll_until,
    receipts,
    report_figures,
    time_until,
    write_config,
    write_signing_key,
)

RecordProperty = Callable[[str, object], None]
SALES_PER_TILL = 600
RATE_PER_TILL = 60.0
"""About 10 s of sales from 5 tills: the receiver's absence and the broker restart happen in the middle."""
RESEND_INTERVAL_S = 2.0


@dataclass
class ReceiverProcess:
    """``store-gateway hq-receiver`` as a subprocess, its log in a file."""

    broker: Mosquitto
    db: Path
    log_path: Path
    options: list[str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== start {self.starts + 1} =====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "hq-receiver",
                "--host",
                self.broker.host,
                "--port",
                str(self.broker.port),
                "--prefix",
                HQ_PREFIX,
                "--client-id",
                "hq-rx-chaos",
                "--db",
                str(self.db),
                "--summary-every",
                "0",
                *self.options,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.starts += 1

    def log(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_subscribed(self) -> None:
        """Until this start's log says it receives (the subscription is in place)."""

        def subscribed() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"the receiver exited; log:\n{self.log()[-3000:]}")
            return self.log().split(f"===== start {self.starts} =====")[-1].count("receiving ") > 0

        await poll_until(subscribed, "the receiver to subscribe", state=lambda: self.log()[-2000:])

    async def terminate(self) -> int:
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        await poll_until(lambda: proc.poll() is not None, "the receiver to exit", state=self.log)
        return int(proc.returncode)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _report(db: Path) -> tuple[int, str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "hq-receiver",
            "--db",
            str(db),
            "--report",
            "--lost-grace",
            "0",
        ],
        capture_output=True,
        check=False,
        timeout=120,
    )
    return done.returncode, done.stdout.decode(errors="replace")


@pytest.mark.parametrize("topology", ["plain", "shared"])
async def test_receiver_away_while_the_hq_broker_restarts_loses_nothing(
    topology: str,
    store_broker: Mosquitto,
    persistent_hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hq_broker = persistent_hq_broker
    hq_db = tmp_path / "hq.db"
    # The plain subscription must lose nothing on its own (no --resend to hide a loss); the shared one needs
    # --resend to heal what the broker dropped with the absent member's share.
    options = ["--lost-grace", "0"]
    if topology == "shared":
        options += ["--share-group", "hq-receivers", "--resend", "--resend-interval", str(RESEND_INTERVAL_S)]
        key = write_signing_key(tmp_path / "hq-command.key")
        options += ["--signing-key", str(key), "--key-id", HQ_KEY_ID]
    receiver = ReceiverProcess(hq_broker, hq_db, tmp_path / "receiver.log", options)
    api_port = free_port()
    config_path = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=tmp_path / "data",
        api_port=api_port,
    )
    gateway = GatewayProcess(config_path, api_port, tmp_path / "gateway.log")
    planned = len(TERMINALS) * SALES_PER_TILL
    acked = [0]

    def count(_: PosMessage) -> None:
        acked[0] += 1

    try:
        receiver.start()
        await receiver.wait_subscribed()
        gateway.start()
        await gateway.wait_healthy()
        tills = asyncio.create_task(
            run_terminals(
                broker_config(store_broker),
                TERMINALS,
                count_per_terminal=SALES_PER_TILL,
                rate_per_s=RATE_PER_TILL,
                on_publish=count,
            )
        )
        try:
            with HqView(hq_db) as hq:
                await poll_until(lambda: acked[0] >= planned // 4, "a quarter of the sales", interval=0.01)
                assert await receiver.terminate() == 0, receiver.log()[-3000:]
                away_at, stored_when_away = time.monotonic(), hq.count()
                await poll_until(
                    lambda: acked[0] >= planned * 3 // 8, "more sales while HQ's receiver is away"
                )
                await asyncio.to_thread(hq_broker.stop)
                await asyncio.to_thread(hq_broker.start)
                await poll_until(lambda: acked[0] >= planned // 2, "more sales after HQ's broker restarted")
                delivered_while_away = int((await gateway.health())["delivered_seq"])
                receiver.start()
                back_at = time.monotonic()
                await receiver.wait_subscribed()
                result = await tills
                complete_at = await time_until(
                    lambda: hq_holds_everything(gateway, hq, planned),
                    "every sale at HQ",
                    within=120,
                    state=lambda: {"hq": hq.state(), "log": receiver.log()[-1500:]},
                )
                hq_events = hq.events()
                counters = hq.counters()
        finally:
            if not tills.done():
                tills.cancel()
            await asyncio.wait([tills])
        assert await receiver.terminate() == 0, receiver.log()[-3000:]
        assert await gateway.terminate() == 0, gateway.log_tail()
    finally:
        receiver.close()
        gateway.close()

    assert (result.failed, result.errors) == (0, {})
    assert result.total == planned
    assert Counter(receipts(hq_events)) == Counter(result.receipts), (
        "a sale the tills' broker acknowledged is missing or doubled at HQ"
    )
    assert [e["seq"] for e in hq_events] == list(range(1, len(hq_events) + 1)), "a seq gap at HQ"
    assert counters["conflicts"] == 0
    status, report = _report(hq_db)
    assert status == 0, report
    log = receiver.log()
    asked = re.findall(r"asked \S+ to resend (\d+) lost seq", log)
    if topology == "shared":
        assert "SHARED SUBSCRIPTION" in log
    report_figures(
        record_property,
        capsys,
        f"HQ receiver away across an HQ broker restart, {topology} subscription",
        {
            "sales": planned,
            "events_at_hq": len(hq_events),
            "stored_before_away": stored_when_away,
            "delivered_seq_while_away": delivered_while_away,
            "away_s": back_at - away_at,
            "resend_commands": len(asked),
            "seqs_asked_again": sum(int(n) for n in asked),
            "duplicates_dropped": counters["duplicates"],
            "complete_after_return_s": complete_at - back_at,
        },
    )
