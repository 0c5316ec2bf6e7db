"""A lean MQTT 3.1.1 QoS 1 publisher for benchmarks: pre-encoded PUBLISH packets, a PUBACK window.

paho's Python publisher tops out near 7,000 msg/s on this machine and would share the 2 cores with the
gateway under test; this one costs a few microseconds per message, so the benchmark measures the gateway.
It is real MQTT on a real socket: mosquitto is the peer, and every message counts only once PUBACKed.

Run as a script, it measures the gateway's MQTT intake alone: realistic sales from ``--terminals`` tills,
published QoS 1 into a store broker, until the gateway has committed them all (its /metrics); HQ is down, so
the uplink costs nothing. It prints sales/s (first publish to last commit) and the gateway's CPU per sale.
With several ``--tree`` (source trees, e.g. a ``git worktree`` of another commit), it runs the gateway of
each in turn, ``--rounds`` times (A B A B), on the same machine in one run:

    python bench/mqtt_load.py --sales 20000 --terminals 10 --tree /tmp/base --tree . --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = _utf8(topic) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _remaining_length(len(body)) + body


async def publish_all(
    host: str, port: int, client_id: str, messages: Sequence[tuple[str, bytes]], window: int = 500
) -> tuple[float, float, int]:
    """Publish every (topic, payload) with QoS 1; returns (first send, last PUBACK) monotonic times, acked count."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_packet(client_id))
    await writer.drain()
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"CONNACK refused: {connack!r}")
    acked = 0
    credit = asyncio.Semaphore(window)
    done = asyncio.Event()
    total = len(messages)

    async def read_acks() -> None:
        nonlocal acked
        buf = b""
        while acked < total:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
            while len(buf) >= 4:
                if buf[0] != 0x40:
                    raise RuntimeError(f"unexpected packet 0x{buf[0]:02x}")
                buf = buf[4:]
                acked += 1
                credit.release()
        done.set()

    ack_task = asyncio.create_task(read_acks())
    first = time.monotonic()
    for i, (topic, payload) in enumerate(messages):
        await credit.acquire()
        writer.write(publish_packet(topic, payload, i % 65535 + 1))
        if i % 64 == 0:
            await writer.drain()
    await writer.drain()
    await done.wait()
    last = time.monotonic()
    await ack_task
    writer.write(b"\xe0\x00")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    return first, last, acked


def _intake_round(tree: Path, sales: int, terminals: int, window: int) -> tuple[float, float]:
    """One gateway (from ``tree``) on a fresh store broker: (sales/s until all committed, gateway CPU us/sale)."""
    from bench._common import TOKEN, GatewayProcess, cpu_seconds, sale_payloads, stop_process
    from bench._common import terminals as till_ids
    from tests.harness.brokers import Mosquitto, free_port

    class TreeGateway(GatewayProcess):
        def start(self) -> TreeGateway:
            env = {**os.environ, "BENCH_API_TOKEN": TOKEN, "PYTHONPATH": str(tree)}
            with (work / "gateway.log").open("ab") as log:  # its warnings (HQ down) would bury the figures
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config_path)],
                    cwd=tree,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            return self

    tills = till_ids(terminals)
    messages = sale_payloads(sales, tills)
    work = Path(tempfile.mkdtemp(prefix="sg-intake-"))
    store = Mosquitto().start()
    gateway = TreeGateway(work, store.port, free_port(), tills)  # nothing listens on HQ's port
    try:
        gateway.start().wait_healthy()
        cpu_before = cpu_seconds(gateway.pid)
        start = time.monotonic()

        async def publish() -> None:
            await asyncio.gather(
                *(
                    publish_all("127.0.0.1", store.port, f"bench-{till}", msgs, window)
                    for till, msgs in zip(tills, messages, strict=True)
                )
            )

        asyncio.run(publish())
        deadline = start + 300
        while gateway.committed() < sales:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tree}: the gateway did not commit {sales} sales within 300 s")
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(gateway.pid) - cpu_before
    finally:
        stop_process(gateway.proc, grace_s=30)
        store.close()
    return sales / elapsed, cpu / sales * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=20_000)
    ap.add_argument("--terminals", type=int, default=10)
    ap.add_argument("--window", type=int, default=200, help="QoS 1 messages awaiting PUBACK per terminal")
    ap.add_argument(
        "--tree", action="append", type=Path, help="a source tree to run the gateway from (repeat)"
    )
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    trees = [t.resolve() for t in args.tree or [Path(__file__).resolve().parents[1]]]
    for tree in trees:
        where = subprocess.run(
            [sys.executable, "-c", "import drivers.mqtt.driver as d; print(d.__file__)"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"{tree}: the gateway imports {where}")
    results: dict[Path, list[tuple[float, float]]] = {t: [] for t in trees}
    for n in range(args.rounds):
        for tree in trees:
            rate, cpu_us = _intake_round(tree, args.sales, args.terminals, args.window)
            results[tree].append((rate, cpu_us))
            print(f"round {n + 1} {tree}: {rate:,.0f} sales/s committed, gateway CPU {cpu_us:.0f} us/sale")
    for tree, runs in results.items():
        print(
            f"{tree}: median {statistics.median(r for r, _ in runs):,.0f} sales/s,"
            f" {statistics.median(c for _, c in runs):.0f} us/sale over {len(runs)} round(s)"
        )
    return 0


if __name__ == "__main__":
    ROOT = Path(__file__).resolve().parents[1]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
