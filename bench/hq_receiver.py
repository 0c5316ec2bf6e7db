"""The HQ receiver at chain scale: real wire batches over a real mosquitto into a real PostgreSQL.

Simulated gateways publish real batches (``cloud_bridge.wire.encode_batch`` of realistic ``pos.sale``
envelopes, zstd) to one HQ mosquitto; ``store-gateway hq-receiver`` runs as its own process (one, or two in
one ``$share`` group) into a PostgreSQL server this script starts (durable: ``fsync`` and
``synchronous_commit`` on, as a receiver that acks after commit needs). Figures: events/s stored from the
first publish to the last event committed, the receiver's peak RSS (VmHWM) and CPU per event. Every run
ends with a check that each event is stored exactly once with no gap (the receiver's own ``--report``, and
the tables).

Modes:

``python bench/hq_receiver.py``
    500-event batches and live-sized batches (1..6 events, 3.5 on average), one receiver then two in a share
    group. ``--gateways`` x ``--events`` events per case (``--live-events`` for live-sized batches).
``python bench/hq_receiver.py --stores 1000``
    1,000 stores at a normal pace: one MQTT session per store (one asyncio process), each publishing a
    live-sized batch every ``--interval`` seconds (jittered) for ``--seconds``. Reports events/s stored, the
    lag from the gateway's commit (the envelope's ``recorded_at``, set when the bench "commits" it) to HQ's
    commit (PostgreSQL's commit timestamp of the row), p50/p99, and the receiver's CPU per event.

``--tree PATH`` runs the receiver from another checkout (``git worktree add``), for A/B runs against the same
bench code, brokers and database settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import psutil
import psycopg

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mqtt_load import publish_all  # noqa: E402
from cloud_bridge.wire import Compressor, encode_batch  # noqa: E402
from gateway.kernel.config import BrokerConfig  # noqa: E402
from gateway.kernel.events import uuid7  # noqa: E402
from gateway.kernel.mqtt_client import MqttClient, MqttError  # noqa: E402
from simulators.pos import PosTerminal  # noqa: E402
from tests.harness.brokers import Mosquitto  # noqa: E402
from tests.harness.pg import PostgresServer, pg_bin_dir  # noqa: E402

PREFIX: Final = "retail"
DURABLE: Final = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "128MB",
    "max_connections": "100",
    "track_commit_timestamp": "on",
}
"""What a receiver that acks after commit needs (the test harness turns these off for speed), and commit
timestamps for the lag figure."""
RECEIVER_CODE: Final = (
    "import sys; from cloud_bridge.hq.receiver import receiver_main; sys.exit(receiver_main(sys.argv[1:]))"
)


def envelopes(store_id: str, gateway_id: str, first_seq: int, count: int, till: PosTerminal) -> list[bytes]:
    """``count`` envelopes as a gateway commits them (docs/EVENTS.md), recorded now: a ``pos.sale`` in the
    gateway's own shape, then a ``stock.level`` per line it moved (about two per sale), and so on."""
    now = datetime.now(UTC)
    recorded = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out: list[bytes] = []
    pending: list[dict[str, Any]] = []
    seq = first_seq
    while len(out) < count:
        common = {
            "id": uuid7(),
            "seq": seq,
            "mono_ns": seq * 1_000_000,
            "store_id": store_id,
            "gateway_id": gateway_id,
            "recorded_at": recorded,
            "boot_id": "7463fe83a8e149cd",
            "clock_synced": True,
            "schema": 1,
        }
        if pending:
            line = pending.pop()
            event = {"kind": "stock.level", "device_id": None, "occurred_at": None, **common, "data": line}
        else:
            sale = orjson.loads(till.make_sale().payload)
            data = {
                "receipt_no": sale["receipt_no"],
                "register_id": till.device_id,
                "cashier_id": sale.get("cashier_id", "C335"),
                "currency": "HKD",
                "lines": [
                    {
                        k: str(v)
                        for k, v in line.items()
                        if k in ("sku", "gtin", "quantity", "unit_price", "discount")
                    }
                    for line in sale.get("lines", [])
                ],
                "totals": {k: str(v) for k, v in sale.get("totals", {}).items()},
                "payments": [{"method": "cash", "amount": str(sale.get("totals", {}).get("total", "0"))}],
            }
            pending = [
                {
                    "sku": line["sku"],
                    "on_hand": "198",
                    "delta": f"-{line.get('quantity', '1')}",
                    "safety_stock": "20",
                    "cause_seqs": [seq, seq],
                }
                for line in data["lines"][:2]
            ]
            event = {
                "kind": "pos.sale",
                "device_id": till.device_id,
                "occurred_at": now.isoformat(timespec="milliseconds"),
                **common,
                "data": data,
            }
        out.append(orjson.dumps(event))
        seq += 1
    return out


def batch_sizes(total: int, size: int | None, rng: random.Random) -> list[int]:
    """Sizes adding up to ``total``: all ``size``, or live-sized (1..6, 3.5 on average) when None."""
    sizes: list[int] = []
    left = total
    while left > 0:
        n = min(left, size if size is not None else rng.randint(1, 6))
        sizes.append(n)
        left -= n
    return sizes


def build_messages(gateways: int, events: int, size: int | None) -> tuple[list[tuple[str, bytes]], int]:
    """Every gateway's batches, interleaved round robin (each gateway's in seq order); and the wire bytes."""
    rng = random.Random(7)
    compressor = Compressor("zstd")
    per_gateway: list[list[tuple[str, bytes]]] = []
    for g in range(gateways):
        store_id, gateway_id = f"st-{g:04d}", "gw-1"
        till = PosTerminal("till-01", seed=g)
        topic = f"{PREFIX}/{store_id}/{gateway_id}/events"
        seq, out = 1, []
        for n in batch_sizes(events, size, rng):
            bodies = envelopes(store_id, gateway_id, seq, n, till)
            seqs = list(range(seq, seq + n))
            payload = encode_batch(
                store_id,
                gateway_id,
                seqs,
                bodies,
                cls="transaction",
                complete_through=seq - 1,
                compressor=compressor,
            )
            out.append((topic, payload))
            seq += n
        per_gateway.append(out)
    messages = [m for group in _round_robin(per_gateway) for m in group]
    return messages, sum(len(p) for _, p in messages)


def _round_robin(lists: list[list[tuple[str, bytes]]]) -> Iterator[list[tuple[str, bytes]]]:
    for i in range(max(len(x) for x in lists)):
        yield [x[i] for x in lists if i < len(x)]


@dataclass
class Receiver:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_receiver(
    tree: Path, port: int, dsn: str, client_id: str, share: str | None, logdir: Path
) -> Receiver:
    args = [
        "--port",
        str(port),
        "--postgres",
        dsn,
        "--client-id",
        client_id,
        "--summary-every",
        "0",
        "--lost-grace",
        "0",
    ]
    if share is not None:
        args += ["--share-group", share, "--lost-grace", "60"]
    log = logdir / f"{client_id}.log"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER_CODE, *args], cwd=tree, env=env, stdout=out, stderr=out
        )
    return Receiver(proc, log)


def wait_subscribed(receivers: Sequence[Receiver], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for r in receivers:
        while "receiving " not in r.log.read_text(errors="replace"):
            if r.proc.poll() is not None:
                raise RuntimeError(f"receiver exited: {r.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"receiver did not subscribe: {r.log.read_text()}")
            time.sleep(0.05)


def stored(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(events), 0) FROM gateways").fetchone()
    return int(row[0]) if row else 0


def check_exactly_once(tree: Path, dsn: str, expected: dict[str, int]) -> str:
    """Each gateway holds exactly its events, seqs 1..n with no gap, no conflict; and ``--report`` says 0."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT store_id, events, max_seq, conflicts FROM gateways").fetchall()
        count = conn.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone()
        gaps = conn.execute(
            "SELECT count(*) FROM (SELECT store_id, gateway_id FROM runs GROUP BY 1, 2 HAVING count(*) > 1) x"
        ).fetchone()
    assert count is not None
    assert gaps is not None
    got = {s: (int(e), int(m), int(c)) for s, e, m, c in rows}
    bad = [s for s, n in expected.items() if got.get(s) != (n, n, 0)]
    total = sum(expected.values())
    report = subprocess.run(
        [sys.executable, "-c", RECEIVER_CODE, "--postgres", dsn, "--report", "--lost-grace", "0"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        check=False,
    )
    ok = not bad and count[0] == count[1] == total and gaps[0] == 0 and report.returncode == 0
    return (
        f"exactly once: {'yes' if ok else 'NO'} ({count[0]:,} rows, {count[1]:,} ids, {total:,} expected,"
        f" {len(bad)} gateway(s) off, {gaps[0]} with a gap, --report exit {report.returncode})"
    )


def percentiles(dsn: str) -> tuple[float, float, float]:
    """Lag from recorded_at (the gateway's commit) to the row's commit at HQ: p50, p99, max, in seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag), max(lag) FROM"
            " (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - recorded_at) AS lag FROM events) x"
        ).fetchone()
    assert row is not None
    return float(row[0][0]), float(row[0][1]), float(row[1])


def fresh_schema(pg: PostgresServer) -> tuple[str, str]:
    name = f"b_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return name, pg.dsn(name)


def drop_schema(pg: PostgresServer, name: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def throughput_case(
    tree: Path,
    pg: PostgresServer,
    broker: Mosquitto,
    logdir: Path,
    messages: list[tuple[str, bytes]],
    expected: dict[str, int],
    receivers: int,
) -> dict[str, Any]:
    schema, dsn = fresh_schema(pg)
    share = "bench" if receivers > 1 else None
    rx = [start_receiver(tree, broker.port, dsn, f"hq-bench-{i}", share, logdir) for i in range(receivers)]
    try:
        wait_subscribed(rx)
        cpu0 = [r.cpu_s() for r in rx]
        total = sum(expected.values())
        start = time.monotonic()
        asyncio.run(publish_all(broker.host, broker.port, "bench-pub", messages, window=1000))
        published = time.monotonic() - start
        while stored(dsn) < total:
            for r in rx:
                if r.proc.poll() is not None:
                    raise RuntimeError(f"receiver exited: {r.log.read_text()[-2000:]}")
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        cpu = sum(r.cpu_s() - c for r, c in zip(rx, cpu0, strict=True))
        rss = max(r.peak_rss_mb() for r in rx)
    finally:
        codes = [r.stop() for r in rx]
    check = check_exactly_once(tree, dsn, expected)
    drop_schema(pg, schema)
    return {
        "events_s": total / elapsed,
        "batches_s": len(messages) / elapsed,
        "published_s": published,
        "cpu_us": cpu / total * 1e6,
        "rss_mb": rss,
        "exit": codes,
        "check": check,
    }


# --- 1,000 stores at a normal pace --------------------------------------------------------------------


async def store_loop(
    client: MqttClient,
    store_id: str,
    stop_at: float,
    interval: float,
    rng: random.Random,
    counts: dict[str, int],
) -> None:
    """One store's gateway: a live-sized batch every ``interval`` s (jittered), the next after its PUBACK."""
    till = PosTerminal("till-01", seed=hash(store_id) & 0xFFFF)
    compressor = Compressor("zstd")
    topic = f"{PREFIX}/{store_id}/gw-1/events"
    seq = 1
    await asyncio.sleep(rng.uniform(0, interval))
    while time.monotonic() < stop_at:
        n = rng.randint(1, 6)
        bodies = envelopes(store_id, "gw-1", seq, n, till)
        payload = encode_batch(
            store_id,
            "gw-1",
            list(range(seq, seq + n)),
            bodies,
            cls="transaction",
            complete_through=seq - 1,
            compressor=compressor,
        )
        await client.publish(topic, payload, qos=1)
        seq += n
        counts[store_id] = seq - 1
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))


async def stores_mode(
    tree: Path,
    pg: PostgresServer,
    broker: Mosquitto,
    logdir: Path,
    stores: int,
    interval: float,
    seconds: float,
) -> dict[str, Any]:
    schema, dsn = fresh_schema(pg)
    rx = start_receiver(tree, broker.port, dsn, "hq-bench-0", None, logdir)
    counts: dict[str, int] = {}
    clients: list[MqttClient] = []
    try:
        await asyncio.to_thread(wait_subscribed, [rx])
        cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive_s=60)
        for i in range(0, stores, 50):
            chunk = [
                MqttClient(cfg, f"gw-st-{n:04d}", clean_start=True) for n in range(i, min(i + 50, stores))
            ]
            await asyncio.gather(*(c.connect(within_s=30) for c in chunk))
            clients += chunk
        cpu0 = rx.cpu_s()
        rng = random.Random(11)
        start = time.monotonic()
        stop_at = start + seconds
        async with asyncio.TaskGroup() as tg:
            for n, c in enumerate(clients):
                tg.create_task(
                    store_loop(c, f"st-{n:04d}", stop_at, interval, random.Random(rng.random()), counts),
                    name=f"store-{n}",
                )
        published = sum(counts.values())
        while await asyncio.to_thread(stored, dsn) < published:
            if rx.proc.poll() is not None:
                raise RuntimeError(f"receiver exited: {rx.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - start
        cpu = rx.cpu_s() - cpu0
        rss = rx.peak_rss_mb()
    finally:
        for c in clients:
            with contextlib.suppress(MqttError):
                await c.disconnect()
        code = rx.stop()
    p50, p99, worst = percentiles(dsn)
    check = check_exactly_once(tree, dsn, counts)
    drop_schema(pg, schema)
    return {
        "events_s": published / elapsed,
        "events": published,
        "cpu_us": cpu / published * 1e6,
        "rss_mb": rss,
        "p50": p50,
        "p99": p99,
        "max": worst,
        "exit": code,
        "check": check,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="run the receiver from this checkout")
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--events", type=int, default=2000, help="events per gateway, 500-event batches")
    parser.add_argument("--live-events", type=int, default=400, help="events per gateway, live-sized batches")
    parser.add_argument("--batch", type=int, default=500, help="events per batch in the big-batch case")
    parser.add_argument("--receivers", default="1,2", help="receiver counts to run (comma-separated)")
    parser.add_argument("--cases", default="big,live", help="big, live or both")
    parser.add_argument(
        "--stores", type=int, default=0, help="play this many stores at a normal pace instead"
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between a store's batches")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the stores play")
    args = parser.parse_args()

    bin_dir = pg_bin_dir()
    if bin_dir is None:
        print("PostgreSQL is not installed", file=sys.stderr)
        return 1
    tree = args.tree.resolve()
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--", "cloud_bridge"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        f"receiver tree {tree} at {commit}{' (cloud_bridge modified)' if dirty else ''}; PostgreSQL durable"
        " (fsync, synchronous_commit on)",
        flush=True,
    )
    pg = PostgresServer(bin_dir, DURABLE).start()
    broker = Mosquitto().start()
    logdir = Path(tempfile.mkdtemp(prefix="hq-bench-"))
    try:
        if args.stores:
            r = asyncio.run(stores_mode(tree, pg, broker, logdir, args.stores, args.interval, args.seconds))
            print(
                f"{args.stores} stores, a live-sized batch every ~{args.interval:g} s each for {args.seconds:g} s:"
                f" {r['events']:,} events, {r['events_s']:,.0f} events/s stored;"
                f" lag gateway commit -> HQ commit p50 {r['p50'] * 1000:,.0f} ms, p99 {r['p99'] * 1000:,.0f} ms,"
                f" max {r['max'] * 1000:,.0f} ms; receiver CPU {r['cpu_us']:.0f} µs/event, peak RSS"
                f" {r['rss_mb']:.1f} MB, exit {r['exit']}; {r['check']}",
                flush=True,
            )
            return 0
        cases = [c.strip() for c in args.cases.split(",")]
        for case in cases:
            events = args.events if case == "big" else args.live_events
            messages, wire = build_messages(args.gateways, events, args.batch if case == "big" else None)
            expected = {f"st-{g:04d}": events for g in range(args.gateways)}
            total = args.gateways * events
            label = f"{args.batch}-event batches" if case == "big" else "live-sized batches (1..6)"
            print(
                f"{label}: {args.gateways} gateways x {events:,} events = {total:,} events in {len(messages):,}"
                f" batches, {wire / total:.1f} B/event on the wire",
                flush=True,
            )
            for n in (int(x) for x in args.receivers.split(",")):
                r = throughput_case(tree, pg, broker, logdir, messages, expected, n)
                print(
                    f"  {n} receiver(s): {r['events_s']:,.0f} events/s ({r['batches_s']:,.0f} batches/s) stored;"
                    f" receiver CPU {r['cpu_us']:.1f} µs/event; peak RSS {r['rss_mb']:.1f} MB; published in"
                    f" {r['published_s']:.2f} s; exit {r['exit']}; {r['check']}",
                    flush=True,
                )
    finally:
        broker.close()
        pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
