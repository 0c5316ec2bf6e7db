"""BLE decode throughput: advertisements decoded per second per format, plain and encrypted.

Pure decoders only (no scanner, no journal): distinct frames made by the simulator's encoders (a new counter
each, as a live sensor sends), decoded through ``drivers.ble.decode.decode_advertisement`` as the driver calls
it, into a validated ``SensorSample``. One core.

    python bench/decode_ble.py --frames 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.ble.decode import decode_advertisement
from drivers.ble.formats import BleFormat
from simulators.ble import Advert, sensors

KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
CASES: tuple[tuple[str, BleFormat, bytes | None], ...] = (
    ("bthome.v2", "bthome.v2", None),
    ("bthome.v2 encrypted", "bthome.v2", KEY),
    ("ruuvi.rawv2", "ruuvi.rawv2", None),
    ("atc1441", "atc1441", None),
    ("pvvx", "pvvx", None),
    ("pvvx encrypted", "pvvx", KEY),
)


def frames(fmt: BleFormat, key: bytes | None, count: int) -> tuple[bytes, list[Advert]]:
    [sensor] = sensors(1, fmt, key, seed=3)
    out = []
    for _ in range(count):
        sensor.step(10.0)
        out.append(sensor.advert())
    return sensor.mac, out


def rate(fmt: BleFormat, key: bytes | None, count: int) -> float:
    mac, adverts = frames(fmt, key, count)
    start = time.perf_counter()
    for advert in adverts:
        decode_advertisement(fmt, mac, advert.service_data, advert.manufacturer_data, key)
    return count / (time.perf_counter() - start)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000, help="Frames per format (default 20000).")
    args = parser.parse_args(list(argv))
    print(f"BLE decode throughput, {args.frames} distinct frames per format, one core")
    print(f"{'format':<22}{'decodes/s':>12}{'µs/decode':>12}")
    for label, fmt, key in CASES:
        per_s = rate(fmt, key, args.frames)
        print(f"{label:<22}{per_s:>12,.0f}{1e6 / per_s:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
