"""Start-up with a big backlog: does a gateway with a million undelivered events on disk start as fast, and
stay as small, as one with an empty journal?

The backlog journal is built in-process through the real :class:`gateway.kernel.journal.Journal` (real envelopes,
stock ledger, outbox counters) from realistic sales decoded by the MQTT driver's decoder, in large group
commits (half a minute for a million events). Then, for an empty journal and for the backlog, with real
mosquitto brokers and the gateway as its own process (`store-gateway run`, default drain limits):

- the store broker already holds the gateway's persistent intake session (as after any earlier run), and a
  sale is published QoS 1 right after the process is spawned;
- time from spawn to the first ``/health`` 200, and to the commit of that sale (its ``recorded_at`` in the
  journal; the gateway acknowledges it to the store broker right after that commit);
- RSS when the sale is committed and after ``--drain-seconds`` of draining to HQ, the largest RSS sampled
  meanwhile (once a second), and VmHWM; events drained meanwhile.

    python bench/startup_backlog.py --events 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    GatewayProcess,
    build_backlog,
    create_intake_session,
    proc_status_kib,
    rss_mb,
    terminals,
)
from bench.mqtt_load import publish_all
from drivers.mqtt.decode import dedup_key
from simulators.pos import PosTerminal
from tests.harness.brokers import Mosquitto, free_port


@dataclass
class Start:
    label: str
    backlog: int
    health_s: float
    ingest_s: float
    rss_ingest: float
    rss_end: float
    rss_max: float
    hwm: float
    drained: int
    backlog_end: int


def committed_at(journal: Path, key: str) -> float | None:
    """Wall-clock time the event with this dedup key was committed (its ``recorded_at``), if it is."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT recorded_at FROM events WHERE dedup_key=?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else datetime.fromisoformat(row[0]).timestamp()


def run_case(label: str, data_dir: Path, hq_up: bool, drain_s: float) -> Start:
    work = Path(tempfile.mkdtemp(prefix="sg-startup-"))
    store = Mosquitto().start()
    hq = Mosquitto(port=free_port())
    if hq_up:
        hq.start()
    till = terminals(1)[0]
    gw = GatewayProcess(work, store.port, hq.port, [till], data_dir=data_dir)
    sale = PosTerminal(till, seed=99, return_ratio=0.0).make_sale()
    key = dedup_key(till, "pos.sale", till, sale.receipt_no)
    topic = f"store/pos/{till}/sale"
    try:
        asyncio.run(create_intake_session(store.port))
        gw.start()
        asyncio.run(publish_all("127.0.0.1", store.port, "bench-startup-till", [(topic, sale.payload)], 1))
        health = gw.wait_healthy(ok=False, poll=0.01)
        health_s = time.time() - gw.started_wall
        deadline = time.monotonic() + 60
        while gw.committed() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the sale published at start was not committed within 60 s")
            time.sleep(0.02)
        rss_ingest = rss_mb(gw.pid)
        at = committed_at(data_dir / "journal.db", key)
        assert at is not None, "committed per /metrics but not in the journal"
        start_acked = gw.metrics().get("storegw_uplink_events_total", 0.0)
        rss_max = rss_ingest
        until = time.monotonic() + drain_s
        while time.monotonic() < until:
            time.sleep(1.0)
            rss_max = max(rss_max, rss_mb(gw.pid))
        end = gw.health()
        assert end is not None
        return Start(
            label,
            int(health["backlog"]),
            health_s,
            at - gw.started_wall,
            rss_ingest,
            rss_mb(gw.pid),
            rss_max,
            proc_status_kib(gw.pid, "VmHWM") / 1024,
            int(gw.metrics().get("storegw_uplink_events_total", 0.0) - start_acked),
            int(end["backlog"]),
        )
    finally:
        gw.stop()
        store.close()
        hq.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="undelivered sales in the backlog journal")
    ap.add_argument(
        "--hq", choices=["up", "down"], default="up", help="HQ's broker during the run (default up)"
    )
    ap.add_argument("--drain-seconds", type=float, default=30, help="how long RSS is watched (default 30)")
    ap.add_argument(
        "--journal",
        type=Path,
        help="a data dir to build the backlog in once and reuse (copied for each run); default: a temp dir",
    )
    args = ap.parse_args()
    hq_up = args.hq == "up"

    work = Path(tempfile.mkdtemp(prefix="sg-startup-data-"))
    try:
        source = args.journal
        if source is None or not (source / "journal.db").exists():
            source = source or work / "built"
            _, took = build_backlog(args.events, source)
            size = sum(f.stat().st_size for f in source.iterdir()) / 2**20
            print(f"built a journal of {args.events:,} undelivered sales in {took:.1f} s ({size:,.0f} MiB)")
        results = [run_case("empty journal", work / "empty", hq_up, args.drain_seconds)]
        backlog_dir = work / "backlog"
        if args.journal is None:
            source.rename(backlog_dir)  # the temp build is used once: no copy needed
        else:
            shutil.copytree(source, backlog_dir)
        results.append(run_case(f"{args.events:,} backlog", backlog_dir, hq_up, args.drain_seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nHQ broker {args.hq}; default drain limits (5,000 events/s); times from process spawn")
    print(
        f"{'journal':>18} {'backlog':>10} {'/health':>8} {'1st sale':>9} {'RSS@sale':>9}"
        f" {'RSS+' + str(int(args.drain_seconds)) + 's':>8} {'RSS max':>8} {'VmHWM':>7} {'drained':>8} {'left':>9}"
    )
    for r in results:
        print(
            f"{r.label:>18} {r.backlog:>10,} {r.health_s:>7.2f}s {r.ingest_s:>8.2f}s {r.rss_ingest:>7.1f}MB"
            f" {r.rss_end:>6.1f}MB {r.rss_max:>6.1f}MB {r.hwm:>5.1f}MB {r.drained:>8,} {r.backlog_end:>9,}"
        )
    empty, big = results
    print(
        f"\nsummary: with {big.backlog:,} events waiting the gateway answers /health {big.health_s:.2f} s and"
        f" commits a new sale {big.ingest_s:.2f} s after spawn (empty journal: {empty.health_s:.2f} s /"
        f" {empty.ingest_s:.2f} s); RSS {big.rss_ingest:.0f} -> {big.rss_end:.0f} MB over"
        f" {args.drain_seconds:.0f} s {'of draining' if hq_up else '(HQ down)'}"
        f" (empty: {empty.rss_ingest:.0f} -> {empty.rss_end:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
