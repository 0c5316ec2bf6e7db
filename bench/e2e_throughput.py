"""End-to-end throughput: QoS 1 sales from simulated tills, through the gateway, to the HQ receiver.

Every piece is a real, separate process: two mosquitto brokers (store and HQ), the gateway
(`store-gateway run`), and the HQ receiver (`store-gateway hq-receiver`). Sales are realistic POS messages
from the simulator's terminals, published QoS 1 by a lean MQTT publisher (bench/mqtt_load.py). The gateway
acknowledges each message only after it is committed to SQLite (synchronous=FULL).

Prints: events/s from the first device publish to the last HQ receipt, the gateway's peak RSS (VmHWM), and
checks that HQ got every sale exactly once with no seq gap.

    python bench/e2e_throughput.py --sales 50000 --terminals 10

With ``--rules N`` the gateway runs N local rules of mixed types (the tills', the stock's, and cold-chain rules
for other devices); ``--compare-rounds K`` runs K rounds without rules and K with, interleaved, and prints the
medians and their ratio (the machine is shared: compare within one run).

    python bench/e2e_throughput.py --sales 20000 --terminals 10 --rules 500 --compare-rounds 3

With ``--drivers all`` the gateway also has a driver of every other family (BLE without an adapter, a webhook
source, a scanner on a pseudo-terminal, a Modbus TCP fridge on the fridge simulator), so its peak RSS is that of
a store that loads every family's libraries. ``--broker-ceiling`` then sends the same messages with the same
publishers through a fresh mosquitto to a lean QoS 1 subscriber that acknowledges at once (bench/mqtt_sink.py):
the most this machine's broker and loopback carry, against which the gateway's figure reads as a share.

    python bench/e2e_throughput.py --sales 20000 --drivers all --broker-ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.idle_cpu import idle_drivers  # noqa: E402
from bench.mqtt_load import publish_all  # noqa: E402
from simulators.pos import PosTerminal  # noqa: E402
from tests.harness.brokers import Mosquitto, free_port  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


SKUS = 20


def mixed_rules(n: int, terminals: list[str]) -> list[dict[str, object]]:
    """N rules as a store with many fridges has them: one returns_spike and one negative_stock for the store, a
    register_silent per till and a replenishment per SKU (what the sales touch), and cold-chain rules for 200
    fridges and loggers for the rest (their cost should not grow with them)."""
    store: list[dict[str, object]] = [
        {"type": "returns_spike"},
        {"type": "negative_stock"},
        *({"type": "register_silent", "after_s": 1800, "select": {"devices": [t]}} for t in terminals),
        *(
            {
                "type": "replenishment",
                "order_up_to": 200,
                "reorder_point": 20,
                "select": {"skus": [f"SKU-{i:04d}"]},
            }
            for i in range(1, SKUS + 1)
        ),
    ][:n]
    cold = [
        lambda i: {
            "type": "temperature",
            "max_c": 8,
            "for_s": 600,
            "select": {"devices": [f"fridge-{i % 200}"]},
        },
        lambda i: {"type": "silent", "after_s": 900, "select": {"devices": [f"fridge-{i % 200}"]}},
        lambda i: {"type": "door_open", "open_s": 180, "select": {"devices": [f"fridge-{i % 200}"]}},
        lambda i: {"type": "battery_low", "select": {"devices": [f"logger-{i % 200}"]}},
    ]
    rules = store + [cold[i % len(cold)](i) for i in range(n - len(store))]
    return [{"id": f"r{i:04d}", **rule} for i, rule in enumerate(rules)]


def gateway_config(
    data_dir: Path,
    store_port: int,
    hq_port: int,
    api_port: int,
    terminals: list[str],
    protocol: str,
    rules: int = 0,
    extra_drivers: list[dict[str, object]] | None = None,
) -> str:
    devices = "\n".join(f"  - {{id: {t}, profile: pos_terminal}}" for t in terminals)
    more = "".join(f"\n  - {json.dumps(d)}" for d in extra_drivers or [])
    items = "\n".join(
        f"    - {{sku: SKU-{i:04d}, on_hand: 100000000, safety_stock: 10}}" for i in range(1, 21)
    )
    return f"""
gateway_id: gw-bench
store:
  id: bench-001
  name: Benchmark store
  timezone: Asia/Hong_Kong
data_dir: {data_dir}
store_broker: {{host: 127.0.0.1, port: {store_port}, protocol: "{protocol}"}}
hq: {{host: 127.0.0.1, port: {hq_port}, protocol: "{protocol}"}}
drivers:
  - type: mqtt
    routes:
      - {{pattern: "store/pos/{{device_id}}/sale", kind: pos.sale}}
      - {{pattern: "store/pos/{{device_id}}/return", kind: pos.return}}{more}
devices:
{devices}
stock:
  items:
{items}
api: {{host: 127.0.0.1, port: {api_port}, token: {{env: BENCH_API_TOKEN}}}}
log: {{level: WARNING}}
rules: {json.dumps(mixed_rules(rules, terminals))}
"""


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hq_total(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hq_sales(db: Path) -> tuple[int, str | None]:
    if not db.exists():
        return 0, None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n, last = conn.execute(
            "SELECT COUNT(*), MAX(received_at) FROM events WHERE kind='pos.sale'"
        ).fetchone()
    except sqlite3.OperationalError:
        return 0, None
    finally:
        conn.close()
    return int(n), last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=50_000)
    ap.add_argument("--terminals", type=int, default=10)
    ap.add_argument("--window", type=int, default=200, help="QoS 1 messages awaiting PUBACK per terminal")
    ap.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    ap.add_argument("--rules", type=int, default=0, help="local rules of mixed types the gateway runs")
    ap.add_argument(
        "--compare-rounds", type=int, default=0, help="rounds without and with --rules, interleaved"
    )
    ap.add_argument(
        "--drivers", choices=["mqtt", "all"], default="mqtt", help="'all': a driver of every family besides"
    )
    ap.add_argument(
        "--broker-ceiling", action="store_true", help="also the same load straight through mosquitto"
    )
    args = ap.parse_args()
    if not args.compare_rounds:
        code, rate = run(args, args.rules)
        if code == 0 and args.broker_ceiling:
            ceiling = broker_ceiling(args)
            print(
                f"broker ceiling (same publishers, a lean QoS 1 subscriber): {ceiling:,.0f} messages/s;"
                f" the gateway reached {rate / ceiling:.0%} of it"
            )
        return code
    figures: dict[int, list[float]] = {0: [], args.rules: []}
    for _ in range(args.compare_rounds):
        for rules in (0, args.rules):
            print(f"--- {rules} rules")
            code, rate = run(args, rules)
            if code:
                return code
            figures[rules].append(rate)
    without, with_rules = statistics.median(figures[0]), statistics.median(figures[args.rules])
    print(
        f"median events/s: no rules {without:,.0f} {figures[0]}; {args.rules} rules {with_rules:,.0f}"
        f" {figures[args.rules]}; ratio {with_rules / without:.1%}"
    )
    return 0


def sale_messages(terminals: list[str], sales: int) -> list[list[tuple[str, bytes]]]:
    """Realistic sales from the simulator's terminals, per terminal (generated before any clock starts)."""
    per_terminal = sales // len(terminals)
    messages: list[list[tuple[str, bytes]]] = []
    for n, device in enumerate(terminals):
        till = PosTerminal(device, seed=n, return_ratio=0.0)
        count = per_terminal + (1 if n < sales % len(terminals) else 0)
        messages.append([(f"store/pos/{device}/sale", till.make_sale().payload) for _ in range(count)])
    return messages


def broker_ceiling(args: argparse.Namespace) -> float:
    """Messages/s from the first publish to the last receipt, the same sales and publishers as a run, through a
    fresh mosquitto to bench/mqtt_sink.py (QoS 1, acknowledged on arrival: no decode, no disk)."""
    terminals = [f"till-{i:02d}" for i in range(1, args.terminals + 1)]
    messages = sale_messages(terminals, args.sales)
    broker = Mosquitto().start()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "mqtt_sink.py"), "--port", str(broker.port),
         "--topic", "store/pos/+/sale", "--count", str(args.sales)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "subscribed":
            raise RuntimeError("the sink did not subscribe")

        async def publish() -> None:
            await asyncio.gather(
                *(
                    publish_all("127.0.0.1", broker.port, f"bench-{d}", msgs, args.window)
                    for d, msgs in zip(terminals, messages, strict=True)
                )
            )

        start = time.time()
        asyncio.run(publish())
        last = float(sink.stdout.readline().split()[1])
        sink.wait(30)
        return args.sales / (last - start)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
        broker.close()


def run(args: argparse.Namespace, rules: int) -> tuple[int, float]:
    """One run: exit code and events/s."""

    work = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    store, hq = Mosquitto().start(), Mosquitto().start()
    terminals = [f"till-{i:02d}" for i in range(1, args.terminals + 1)]
    api_port = free_port()
    cfg = work / "store.yaml"
    fridge: subprocess.Popen[bytes] | None = None
    pty: tuple[int, int] | None = None
    extra: list[dict[str, object]] = []
    if args.drivers == "all":
        fridge_port = free_port()
        fridge = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "simulate", "fridge", "--port", str(fridge_port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        pty = os.openpty()
        extra = idle_drivers(fridge_port, os.ttyname(pty[1]))["drivers"]
    cfg.write_text(
        gateway_config(work / "data", store.port, hq.port, api_port, terminals, args.protocol, rules, extra)
    )
    env = {**os.environ, "BENCH_API_TOKEN": TOKEN}
    hq_db = work / "hq.db"
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "hq-receiver",
            "--port",
            str(hq.port),
            "--db",
            str(hq_db),
            "--summary-every",
            "0",
        ],
        cwd=ROOT,
        env=env,
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(cfg)], cwd=ROOT, env=env
    )
    try:
        wait_http(f"http://127.0.0.1:{api_port}/health")
        messages = sale_messages(terminals, args.sales)
        time.sleep(1.0)  # let the gateway's connections settle (session, subscriptions, birth message)

        async def publish() -> list[tuple[float, float, int]]:
            return await asyncio.gather(
                *(
                    publish_all("127.0.0.1", store.port, f"bench-{d}", msgs, args.window)
                    for d, msgs in zip(terminals, messages, strict=True)
                )
            )

        pids = {
            "gateway": gateway.pid,
            "hq-receiver": receiver.pid,
            "store broker": store.pid,
            "HQ broker": hq.pid,
        }
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        wall_start = time.time()
        results = asyncio.run(publish())
        acked = sum(r[2] for r in results)
        publish_s = max(r[1] for r in results) - min(r[0] for r in results)
        deadline = time.monotonic() + 300
        while (got := hq_sales(hq_db))[0] < args.sales and time.monotonic() < deadline:
            time.sleep(0.05)
        count, last = got
        rss = peak_rss_mb(gateway.pid)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        if last is None:
            print("HQ received nothing", file=sys.stderr)
            return 1, 0.0
        last_receipt = datetime.fromisoformat(last).timestamp()
        elapsed = last_receipt - wall_start
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(30)
        report = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "hq-receiver", "--db", str(hq_db), "--report"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        print(f"sales published (PUBACKed by the store broker): {acked} in {publish_s:.2f} s")
        print(f"sales at HQ: {count} (exactly once: {count == args.sales})")
        print(
            f"first device publish -> last HQ receipt: {elapsed:.2f} s = {args.sales / elapsed:,.0f} events/s"
        )
        print(f"events at HQ, all kinds (sales + stock levels + alerts + status): {hq_total(hq_db)}")
        print(f"gateway peak RSS (VmHWM): {rss:.1f} MB")
        print("CPU seconds during the run: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        print(f"gateway CPU per sale: {cpu['gateway'] / args.sales * 1e6:.0f} us")
        print(
            f"gateway exit code after SIGTERM: {code}; HQ gap report exit code: {report.returncode} (0 = no gap)"
        )
        ok = count == args.sales and code == 0 and report.returncode == 0
        return (0 if ok else 1), args.sales / elapsed
    finally:
        for proc in (gateway, receiver):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        store.close()
        hq.close()
        if fridge is not None:
            fridge.terminate()
            fridge.wait(10)
        if pty is not None:
            os.close(pty[0])
            os.close(pty[1])


if __name__ == "__main__":
    raise SystemExit(main())
