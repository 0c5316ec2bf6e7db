"""Bytes per event on the wire to HQ, and CPU per event to compress, by batch size and encoding.

In-process and fast. Realistic sales from the simulator's tills go through the MQTT driver's decoder and a
real journal (real envelopes, and the stock ledger's ``stock.level`` events), then the stored envelope bytes
are batched exactly as the uplink does (``cloud_bridge.wire.encode_batch``, ``hq.batch_max_bytes`` applied)
with each encoding: ``none`` (JSON), ``gzip`` (level 6) and ``zstd`` (level 3, the default).

Two streams: the sales alone, and the transaction class as the uplink reads it (sales interleaved with the
``stock.level`` events the ledger derives; small commits, as at a live 200 sales/s, give about two of those
per sale). Bytes are the MQTT payload (header line + body); "+MQTT" adds the PUBLISH framing (fixed
header, topic, packet id, MQTT 5 property length), not TCP/IP.

    python bench/wire_size.py --sales 10000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GATEWAY_ID, STORE_ID, decoded_sales, fill_journal, sale_drafts, terminals
from bench.mqtt_load import publish_packet
from cloud_bridge.config import HqConfig
from cloud_bridge.topics import events_topic
from cloud_bridge.wire import Compressor, Encoding, encode_batch
from simulators.catalog import CATALOG, CatalogItem, gtin_check_digit

TOPIC = events_topic("retail", STORE_ID, GATEWAY_ID)
ENCODINGS: tuple[tuple[str, Encoding | None], ...] = (("none", None), ("gzip", "gzip"), ("zstd", "zstd"))


def wide_catalog(items: int, seed: int = 7) -> tuple[CatalogItem, ...]:
    """A store-sized catalog (the simulator's has 20 items, which flatters compression): SKUs, valid GTIN-13s
    and prices spread like a convenience store's."""
    if items <= len(CATALOG):
        return CATALOG[: max(items, 4)]
    rng = random.Random(seed)
    out = []
    for n in range(1, items + 1):
        body = f"489{rng.randrange(10**9):09d}"
        cents = rng.choice((50, 90, 100)) * rng.randrange(5, 200) // 10 * 10
        out.append(CatalogItem(f"SKU-{n:05d}", f"item {n}", body + str(gtin_check_digit(body)), cents))
    return tuple(out)


def journal_rows(
    sales: int, commit_events: int, catalog: tuple[CatalogItem, ...]
) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(sales, transaction class) rows as (seq, envelope bytes), in seq order, from a real journal."""
    data = Path(tempfile.mkdtemp(prefix="sg-wire-"))
    try:
        pool = decoded_sales(sales, terminals(10), catalog=catalog)
        asyncio.run(fill_journal(data, sale_drafts(sales, pool), commit_events=commit_events))
        conn = sqlite3.connect(data / "journal.db")
        try:
            only_sales = conn.execute(
                "SELECT seq, body FROM events WHERE kind='pos.sale' ORDER BY seq"
            ).fetchall()
            txn = conn.execute("SELECT seq, body FROM events WHERE cls=1 ORDER BY seq").fetchall()
        finally:
            conn.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return only_sales, txn


def batches(
    rows: Sequence[tuple[int, bytes]], max_events: int, max_bytes: int
) -> list[list[tuple[int, bytes]]]:
    """Split rows the way the journal's uplink reader does: count budget, byte budget, at least one event."""
    out: list[list[tuple[int, bytes]]] = []
    i = 0
    while i < len(rows):
        batch: list[tuple[int, bytes]] = []
        total = 0
        for row in rows[i : i + max_events]:
            if batch and total + len(row[1]) > max_bytes:
                break
            batch.append(row)
            total += len(row[1])
        out.append(batch)
        i += len(batch)
    return out


def best_of(runs: int, work: Callable[[], object]) -> float:
    """Shortest wall time of ``runs`` calls (seconds): the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


@dataclass(frozen=True, slots=True)
class Figure:
    size: int
    per_batch: float
    encoding: str
    payload: float
    """MQTT payload bytes per event."""
    framed: float
    ratio: float
    compress_us: float
    encode_us: float

    def line(self) -> str:
        return (
            f"{self.size:>5} {self.per_batch:>7.1f} {self.encoding:>5} {self.payload:>9.1f} {self.framed:>9.1f}"
            f" {self.ratio:>6.2f}x {self.compress_us:>10.2f} {self.encode_us:>9.2f}"
        )


def measure(rows: Sequence[tuple[int, bytes]], size: int, max_bytes: int, runs: int) -> list[Figure]:
    groups = batches(rows, size, max_bytes)
    events = sum(len(g) for g in groups)
    raws = [b"".join((b"[", b",".join(r[1] for r in g), b"]")) for g in groups]
    figures = []
    for name, encoding in ENCODINGS:
        compressor = None if encoding is None else Compressor(encoding)

        def encode_all(compressor: Compressor | None = compressor) -> list[bytes]:
            return [
                encode_batch(
                    STORE_ID,
                    GATEWAY_ID,
                    [r[0] for r in g],
                    [r[1] for r in g],
                    cls="transaction",
                    complete_through=g[0][0] - 1,
                    compressor=compressor,
                )
                for g in groups
            ]

        def compress_all(compressor: Compressor | None = compressor) -> list[bytes]:
            return raws if compressor is None else [compressor.compress(r) for r in raws]

        messages = encode_all()
        payload = sum(map(len, messages))
        framed = sum(len(publish_packet(TOPIC, m, 1)) + 1 for m in messages)  # +1: MQTT 5 property length
        figures.append(
            Figure(
                size,
                events / len(groups),
                name,
                payload / events,
                framed / events,
                sum(map(len, raws)) / payload,
                0.0 if compressor is None else best_of(runs, compress_all) / events * 1e6,
                best_of(runs, encode_all) / events * 1e6,
            )
        )
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=10_000, help="distinct realistic sales (default 10,000)")
    ap.add_argument("--sizes", default="50,500", help="hq.batch_max_events values (default 50,500)")
    ap.add_argument(
        "--commit-events",
        type=int,
        default=2,
        help="sales per group commit (2: a live 200/s; sets stock.level share)",
    )
    ap.add_argument(
        "--catalog", type=int, default=5000, help="catalog items (default 5,000; 20 = the simulator's own)"
    )
    ap.add_argument("--runs", type=int, default=5, help="timing repetitions; the best is kept")
    args = ap.parse_args()
    max_bytes = HqConfig().batch_max_bytes
    sizes = [int(s) for s in args.sizes.split(",")]

    only_sales, txn = journal_rows(args.sales, args.commit_events, wide_catalog(args.catalog))
    summary: dict[tuple[str, int], float] = {}
    for label, rows in (("sales only", only_sales), ("transaction class (sales + stock.level)", txn)):
        mean = sum(len(r[1]) for r in rows) / len(rows)
        print(
            f"\n{label}: {len(rows):,} events, envelope {mean:.0f} B mean; hq.batch_max_bytes {max_bytes:,}"
        )
        print(" size  ev/bat   enc   B/event  +MQTT/ev   ratio  comp us/ev  enc us/ev")
        for size in sizes:
            for figure in measure(rows, size, max_bytes, args.runs):
                print(figure.line())
                if label == "sales only":
                    summary[(figure.encoding, size)] = figure.payload
    top = max(sizes)
    print(
        f"\nsummary: sales, bytes/event on the wire at batch {top}: "
        + ", ".join(f"{enc} {summary[(enc, top)]:.0f}" for enc, _ in ENCODINGS)
        + f"; at batch {min(sizes)}: "
        + ", ".join(f"{enc} {summary[(enc, min(sizes))]:.0f}" for enc, _ in ENCODINGS)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
