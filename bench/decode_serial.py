"""Serial decode throughput: frames/s per framing (and codec), fed in 1024-byte chunks as the port delivers them.

In-process and pure. Streams: scale lines (line framing + A&D parser), barcode lines (+ barcode parser),
STX/ETX with BCC, Chafon inventory answers (length + CRC-16/MCRF4XX + inventory decoder, 18 EPCs a frame),
length + CRC-16/MODBUS (64-byte frames) and fixed 16-byte frames with a header. Then garbage, and Chafon
answers (alone and mixed with garbage) fed one byte per read, as a low-latency USB adapter delivers them.
Figures on one core.

    python bench/decode_serial.py [--mb 2]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.serial import chafon
from drivers.serial.crc import crc16_modbus
from drivers.serial.framing import (
    ETX,
    STX,
    FixedFramer,
    Frame,
    Framer,
    LengthCrcFramer,
    LineFramer,
    StxEtxFramer,
)
from drivers.serial.lines import ScaleFormat, parse_barcode, parse_scale
from simulators.rfid_reader import catalog_epcs

CHUNK = 1024
SCALE = ScaleFormat(
    re.compile(r"(?P<status>ST|US|OL),(?:GS|NT|TR),(?P<weight>[+-]?[0-9. ]+)\s*(?P<unit>kg|g|lb|oz)?"),
    "kg",
    frozenset({"ST"}),
    frozenset({"OL"}),
)


def _stx(payload: bytes) -> bytes:
    bcc = 0
    for byte in payload + bytes([ETX]):
        bcc ^= byte
    return bytes([STX]) + payload + bytes([ETX, bcc])


def _modbus_frame(n: int) -> bytes:
    body = bytes([61]) + bytes((n + i) & 0xFF for i in range(59))
    return body + crc16_modbus(body).to_bytes(2, "little")


def _chafon_decode(frame: Frame) -> object:
    response = chafon.decode_response(frame.payload)
    return chafon.decode_inventory(response) if isinstance(response, chafon.Response) else response


def cases() -> list[tuple[str, Callable[[], Framer], bytes, Callable[[Frame], object] | None]]:
    epcs = catalog_epcs(18)
    return [
        (
            "line + scale (A&D)",
            lambda: LineFramer(64),
            b"ST,GS,+0001.234 kg\r\n",
            lambda f: parse_scale(f.payload, SCALE),
        ),
        (
            "line + barcode",
            lambda: LineFramer(128),
            b"]E04899999000018\r\n",
            lambda f: parse_barcode(f.payload),
        ),
        ("stx/etx + bcc", lambda: StxEtxFramer(64, bcc=True), _stx(b"ST,GS,+0001.234 kg"), None),
        (
            "chafon length+mcrf4xx",
            chafon.framer,
            chafon.encode_inventory_responses(0, epcs)[0],
            _chafon_decode,
        ),
        (
            "length+modbus 64 B",
            lambda: LengthCrcFramer("modbus", len_adjust=1, max_frame=256),
            b"".join(_modbus_frame(n) for n in range(16)),
            None,
        ),
        ("fixed 16 B + header", lambda: FixedFramer(16, b"\xaa\x55"), b"\xaa\x55" + bytes(range(14)), None),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=2.0, help="Megabytes of stream per case.")
    args = parser.parse_args()
    print(f"{'framing':<24} {'frames/s':>12} {'MB/s':>8} {'frame B':>8}")
    for name, make, unit, decode in cases():
        stream = unit * max(1, int(args.mb * 1e6 / len(unit)))
        framer = make()
        frames = 0
        started = time.process_time()
        for start in range(0, len(stream), CHUNK):
            for item in framer.feed(stream[start : start + CHUNK]):
                if isinstance(item, Frame):
                    frames += 1
                    if decode is not None:
                        decode(item)
        cpu = time.process_time() - started
        size = len(stream) / max(frames, 1)
        print(f"{name:<24} {frames / cpu:>12,.0f} {len(stream) / cpu / 1e6:>8.1f} {size:>8.0f}")
    garbage = bytes(range(256)) * max(1, int(args.mb * 1e5 / 256))
    for name, framer in (("chafon", chafon.framer()), ("modbus", LengthCrcFramer("modbus", len_adjust=1))):
        started = time.process_time()
        for start in range(0, len(garbage), CHUNK):
            framer.feed(garbage[start : start + CHUNK])
        cpu = time.process_time() - started
        print(
            f"garbage through {name:<8} {len(garbage) / cpu / 1e6:>21.2f} MB/s (resync by sliding one byte)"
        )
    # A USB adapter at low latency hands over one byte per read: the look-ahead must stay linear.
    # 57600 baud 8N1 is 5.76 kB/s; the figures say how many such ports one core keeps up with.
    answers = b"".join(chafon.encode_inventory_responses(0, catalog_epcs(18))) * 4
    mixed = (bytes(range(256)) + answers) * max(1, int(args.mb * 1e5 / (256 + len(answers))))
    for name, stream in (("chafon answers", answers * 40), ("garbage + answers", mixed)):
        framer = chafon.framer()
        frames = 0
        started = time.process_time()
        for n in range(len(stream)):
            frames += sum(isinstance(i, Frame) for i in framer.feed(stream[n : n + 1]))
        cpu = time.process_time() - started
        print(
            f"1-byte reads, {name:<18} {len(stream) / cpu / 1e3:>9,.0f} kB/s"
            f" ({len(stream) / cpu / 5760:,.0f}x a 57600-baud line, {frames} frames)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
