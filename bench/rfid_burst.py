"""RFID read burst: 10 readers x 200 tags x 20 reads/s each (40,000 reads/s) through framer, decoder and tracker.

In-process and pure (no ptys): each reader's answers are the real Chafon frames of its 200 tags
(``encode_inventory_responses``: 200 SGTIN-96 EPCs in frames of at most 256 bytes), fed to the framer in
1024-byte chunks as pyserial-asyncio-fast hands them over, then ``decode_response``, ``decode_inventory``
and ``InventoryTracker.read``; every window (5 s of simulated time) closes into a validated
``RfidInventory`` and its JSON, as the driver hands it to the journal. A few tags move between rounds.
Figures: reads/s sustained on one core, the share of one core the real rate needs, events/s produced.

    python bench/rfid_burst.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from drivers.rfid import InventoryTracker
from drivers.serial import chafon
from drivers.serial.framing import Frame
from simulators.rfid_reader import catalog_epcs

READERS = 10
TAGS = 200
ROUNDS_PER_S = 20  # each round reads every tag once: 20 reads/s per tag
CHUNK = 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Simulated seconds of traffic.")
    parser.add_argument("--window", type=float, default=5.0, help="Inventory window, seconds.")
    args = parser.parse_args()
    rng = random.Random(4)
    readers = []
    for n in range(READERS):
        population = catalog_epcs(TAGS + 20, seed=n + 1)
        # Two variants of the field (a few tags swapped) so appeared/departed have work to do.
        fields = [population[:TAGS], population[10 : TAGS + 10]]
        wires = [b"".join(chafon.encode_inventory_responses(0, f)) for f in fields]
        readers.append((chafon.framer(), InventoryTracker(args.window, 3 * args.window), wires))
    rounds = int(args.seconds * ROUNDS_PER_S)
    reads = events = frames = wire_bytes = 0
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    for r in range(rounds):
        now = r / ROUNDS_PER_S
        for framer, tracker, wires in readers:
            wire = wires[(r // (ROUNDS_PER_S * 2)) % 2 if rng.random() > 0.01 else 0]
            wire_bytes += len(wire)
            for start in range(0, len(wire), CHUNK):
                for item in framer.feed(wire[start : start + CHUNK]):
                    if not isinstance(item, Frame):
                        continue
                    frames += 1
                    response = chafon.decode_response(item.payload)
                    if not isinstance(response, chafon.Response):
                        continue
                    inventory = chafon.decode_inventory(response)
                    if not isinstance(inventory, chafon.Inventory):
                        continue
                    for epc in inventory.epcs:
                        tracker.read(epc.hex().upper(), None, None, now)
                    reads += len(inventory.epcs)
            if tracker.due(now):
                event = tracker.close_window(now)
                if event is not None:
                    orjson.dumps(event.model_dump(mode="json", exclude_none=True))
                    events += 1
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall
    print(
        f"readers {READERS} x tags {TAGS} x {ROUNDS_PER_S} reads/s = {READERS * TAGS * ROUNDS_PER_S} reads/s offered"
    )
    print(
        f"simulated {args.seconds:g} s: {reads} reads in {frames} frames ({wire_bytes / 1e6:.1f} MB), {events} events"
    )
    print(f"processed in {cpu:.2f} s CPU ({wall:.2f} s wall)")
    print(f"sustained: {reads / cpu:,.0f} reads/s on one core")
    print(f"CPU needed for the offered rate: {100 * cpu / args.seconds:.1f} % of one core")
    print(
        f"events produced: {events / args.seconds:.2f} rfid.inventory/s ({READERS} readers, {args.window:g} s window)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
