"""The journal and its pipeline alone, in one process: CPU per sale from submit to commit, with the stock ledger.

    python bench/journal_commit.py --sales 20000
    python bench/journal_commit.py --sales 20000 --tree /path/to/another/checkout     # A/B against it

No broker and no HQ: drafts of realistic two-line sales (decoded as the MQTT intake decodes them) go through
``Journal.submit``, the group commit and the stock ledger (20 SKUs), ``synchronous=NORMAL`` so the disk's fsync
does not hide the CPU. Prints CPU microseconds per sale (this process) and sales/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sales", type=int, default=20_000)
    parser.add_argument(
        "--tree", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to run"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import gateway

    here = Path(gateway.__file__).resolve()
    if not here.is_relative_to(args.tree.resolve()):
        raise SystemExit(f"imported {here}, not the tree {args.tree}")
    asyncio.run(run(args.sales, args.tree.name))
    return 0


async def run(n: int, label: str) -> None:
    from gateway.kernel.clock import ClockState
    from gateway.kernel.config import JournalConfig
    from gateway.kernel.journal import QUEUE_LIMIT, Journal
    from gateway.kernel.metrics import Metrics
    from gateway.ledger.config import StockConfig, StockItem
    from gateway.ledger.stock import StockLedger
    from tests.harness.pos_drafts import pos_draft

    skus = [f"SKU-{i:03d}" for i in range(20)]
    with tempfile.TemporaryDirectory() as folder:
        metrics = Metrics()
        items = [StockItem(sku=s, on_hand=1e9, safety_stock=5) for s in skus]
        ledger = StockLedger(StockConfig(items=items), metrics)
        journal = Journal(
            Path(folder) / "journal.db",
            "store-1",
            "gw-1",
            JournalConfig(synchronous="NORMAL"),
            metrics,
            [ledger],
            ClockState(override=True),
        )
        drafts = [pos_draft(f"R{i}", [(skus[i % 20], "1"), (skus[(i * 7) % 20], "2")]) for i in range(n)]
        await journal.open()
        writer = asyncio.create_task(journal.run())
        cpu, wall = time.process_time(), time.perf_counter()
        for draft in drafts:
            while not journal.submit(draft):  # over the queue limit: wait until it drains
                room = asyncio.Event()
                journal.when_below(QUEUE_LIMIT, room.set)
                await room.wait()
        await journal.flush()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()
    print(f"{label}: {n} sales, {cpu / n * 1e6:.1f} us CPU per sale, {n / wall:,.0f} sales/s")


if __name__ == "__main__":
    raise SystemExit(main())
