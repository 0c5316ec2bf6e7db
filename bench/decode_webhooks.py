"""Webhook intake throughput: signature check plus mapping per second per cloud POS format (one core).

Pure functions only (no HTTP, no journal): distinct sale webhooks of 1-4 lines made by the simulator
(simulators/webhooks.py), each verified with drivers.http.signatures.verify and mapped to a validated
``PosSale`` / ``PosReturn`` as the driver does. The HTTP round trip and the commit are not included.

    python bench/decode_webhooks.py --webhooks 5000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.http.config import SIGNATURE_HEADERS, Format
from drivers.http.generic import map_generic
from drivers.http.lightspeed import map_lightspeed
from drivers.http.mapped import Outcome
from drivers.http.signatures import verify
from drivers.http.square import map_square
from simulators.webhooks import CloudPos, headers

SECRET = "bench-secret-0123456789"
URL = "https://store.example.com/webhooks/bench"
MAPPERS: dict[Format, Callable[[bytes], Outcome]] = {
    "generic": map_generic,
    "lightspeed": lambda body: map_lightspeed(body, "HKD"),
    "square": map_square,
}


def rate(fmt: Format, count: int) -> tuple[float, float]:
    """(webhooks per second, mean body bytes)."""
    pos = CloudPos(fmt, random.Random(5), return_ratio=0.1)
    header = SIGNATURE_HEADERS[fmt]
    batch = []
    for _ in range(count):
        webhook = pos.next()
        batch.append((webhook.body, headers(fmt, SECRET, webhook, URL)[header]))
    mapper = MAPPERS[fmt]
    start = time.perf_counter()
    for body, signature in batch:
        verify(fmt, SECRET, signature, body, URL)
        mapper(body)
    elapsed = time.perf_counter() - start
    return count / elapsed, sum(len(b) for b, _ in batch) / count


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=5000, help="Webhooks per format (default 5000).")
    args = parser.parse_args(list(argv))
    print(f"Webhook verify + map throughput, {args.webhooks} distinct webhooks per format, one core")
    print(f"{'format':<14}{'webhooks/s':>12}{'µs/webhook':>12}{'mean bytes':>12}")
    for fmt in MAPPERS:
        per_s, size = rate(fmt, args.webhooks)
        print(f"{fmt:<14}{per_s:>12,.0f}{1e6 / per_s:>12.1f}{size:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
