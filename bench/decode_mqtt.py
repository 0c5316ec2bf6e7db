"""MQTT payload decode throughput: pure decoders only (no broker, no journal), one core.

Prints decodes per second for a JSON mapping (generic-json-sensor with a nested path and scaling), a CSV
line, a raw binary frame, a kiosk check-in (with its biometric scan), an RFID shelf message of 20 reads,
and the existing POS sale decoder (a 3-line receipt, validated straight from the JSON bytes).

    python bench/decode_mqtt.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from bench._common import decode_rate  # noqa: E402
from drivers.mqtt.checkin import decode_checkin  # noqa: E402
from drivers.mqtt.decode import decode_pos  # noqa: E402
from drivers.mqtt.mapping import compile_mapping  # noqa: E402
from drivers.mqtt.profile import PayloadMapping  # noqa: E402
from drivers.mqtt.rfid_reads import decode_reads  # noqa: E402
from simulators.kiosk import Kiosk  # noqa: E402
from simulators.pos import PosTerminal  # noqa: E402
from simulators.rfid_shelf import Shelf  # noqa: E402

MAPPING: TypeAdapter[PayloadMapping] = TypeAdapter(PayloadMapping)


def cases() -> dict[str, tuple[Callable[[bytes], object], bytes]]:
    json_map = compile_mapping(
        MAPPING.validate_python(
            {
                "format": "json",
                "time_path": "ts",
                "fields": [
                    {"metric": "temperature", "path": "data.temp", "scale": 0.1, "unit": "°C"},
                    {"metric": "humidity", "path": "readings[0].value", "unit": "%"},
                    {"metric": "door_open", "path": "door"},
                ],
            }
        ),
        "bench",
    )
    csv_map = compile_mapping(
        MAPPING.validate_python(
            {
                "format": "csv",
                "columns": [
                    {"metric": "temperature", "column": 0, "unit": "°C"},
                    {"metric": "humidity", "column": 1, "unit": "%"},
                    {"metric": "door_open", "column": 2},
                ],
            }
        ),
        "bench",
    )
    raw_map = compile_mapping(
        MAPPING.validate_python(
            {
                "format": "raw",
                "length": 8,
                "fields": [
                    {"metric": "temperature", "byte": 0, "type": "int16", "scale": 0.1, "invalid": -32768},
                    {"metric": "humidity", "byte": 2, "type": "uint16", "endian": "little", "scale": 0.01},
                    {"metric": "pressure", "byte": 4, "type": "float32"},
                ],
            }
        ),
        "bench",
    )
    json_payload = orjson.dumps(
        {
            "data": {"temp": -182},
            "readings": [{"value": 55.5}],
            "door": False,
            "ts": "2024-05-01T10:15:30.250+08:00",
        }
    )
    raw_payload = struct.pack(">hHf", -185, 5055, 1013.25)
    sale = PosTerminal("till-01", seed=1, return_ratio=0).next_message()
    shelf = Shelf("shelf-01", tags=10, seed=1)
    return {
        "json mapping": (json_map.map, json_payload),
        "csv line": (csv_map.map, b"4.5,55.0,0\n"),
        "raw frame": (raw_map.map, raw_payload),
        "kiosk check-in": (decode_checkin, Kiosk("kiosk-01", seed=1).next_payload()),
        "rfid shelf (20 reads)": (decode_reads, orjson.dumps(shelf.scan()[:20])),
        "pos sale (existing)": (lambda p: decode_pos("pos.sale", "till-01", p), sale.payload),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per decoder (default 1 s)")
    args = parser.parse_args()
    for name, (run, payload) in cases().items():
        result = run(payload)
        if hasattr(result, "reason"):
            raise SystemExit(f"{name}: the bench vector does not decode: {result}")
        per_s = decode_rate(run, payload, args.seconds, time.perf_counter)
        print(f"{name:<24} {len(payload):>5} B  {per_s:>10,.0f} decodes/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
