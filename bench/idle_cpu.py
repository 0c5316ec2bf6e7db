"""Idle CPU of a gateway process: connected to its brokers, devices configured, nothing happening.

A gateway that sits in a back room for months should cost (near) nothing when the store is closed. This starts
real mosquitto brokers and a ``store-gateway run`` process, waits until it is healthy, lets it settle, and then
reads the process's CPU time (user + system, children included) over a window with psutil.

    python bench/idle_cpu.py [--seconds 30] [--mqtt-only]

Besides the MQTT tills, the gateway has a BLE driver (no adapter here: it waits in its retry backoff), a webhook
source, a barcode scanner on a pseudo-terminal that sends nothing, and a fridge controller on Modbus TCP (the
fridge simulator in its own process) polled at its profile's intervals: the one driver that has work to do
while the store sleeps. Prints CPU as a percentage of one core, CPU ms per minute, and the wake-ups (voluntary
context switches) per second of the gateway process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GatewayProcess, stop_process, terminals
from tests.harness.brokers import Mosquitto, free_port


def idle_drivers(fridge_port: int, scanner_port: str) -> dict[str, Any]:
    """The drivers configured beside the MQTT tills (each waits on its own peer or its own timer)."""
    return {
        "drivers": [
            {
                "type": "ble",
                "name": "ble",
                "devices": [{"id": "probe-1", "mac": "A4:C1:38:00:00:01", "profile": "bthome-v2"}],
            },
            {
                "type": "http",
                "name": "cloud-pos",
                "sources": [{"id": "web-shop", "format": "generic", "secret": "bench-secret-0123"}],
            },
            {
                "type": "serial",
                "name": "serial",
                "devices": [
                    {"device_id": "scanner-1", "port": scanner_port, "profile": "barcode-scanner-line"}
                ],
            },
            {
                "type": "modbus",
                "name": "fridges",
                "transport": "tcp",
                "host": "127.0.0.1",
                "port": fridge_port,
                "devices": [{"id": "fridge-1", "unit": 1, "profile": "dixell-xr"}],
            },
        ]
    }


def measure(seconds: float, settle_s: float, mqtt_only: bool) -> dict[str, float]:
    store, hq = Mosquitto().start(), Mosquitto().start()
    fridge_port = free_port()
    fridge = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "simulate", "fridge", "--port", str(fridge_port)],
        stdout=subprocess.DEVNULL,
    )
    master, slave = os.openpty()
    try:
        with tempfile.TemporaryDirectory(prefix="storegw-idle-") as work:
            extra = None if mqtt_only else idle_drivers(fridge_port, os.ttyname(slave))
            gateway = GatewayProcess(Path(work), store.port, hq.port, terminals(10), extra=extra).start()
            try:
                gateway.wait_healthy(timeout=60)
                time.sleep(settle_s)
                proc = psutil.Process(gateway.pid)
                cpu0, ctx0, t0 = proc.cpu_times(), proc.num_ctx_switches(), time.monotonic()
                time.sleep(seconds)
                cpu1, ctx1, t1 = proc.cpu_times(), proc.num_ctx_switches(), time.monotonic()
                rss = proc.memory_info().rss
            finally:
                stop_process(gateway.proc)
    finally:
        store.close()
        hq.close()
        fridge.terminate()
        fridge.wait(10)
        os.close(master)
        os.close(slave)
    elapsed = t1 - t0
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "seconds": elapsed,
        "cpu_pct_of_one_core": 100 * used / elapsed,
        "cpu_ms_per_min": 1000 * used * 60 / elapsed,
        "wakeups_per_s": (ctx1.voluntary - ctx0.voluntary) / elapsed,
        "rss_mb": rss / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30, help="Measuring window (default 30 s).")
    parser.add_argument("--settle", type=float, default=5, help="Wait after start-up (default 5 s).")
    parser.add_argument("--mqtt-only", action="store_true", help="Only the MQTT tills, no device drivers.")
    args = parser.parse_args()
    result = measure(args.seconds, args.settle, args.mqtt_only)
    what = "MQTT only" if args.mqtt_only else "MQTT, BLE, HTTP, serial and one Modbus fridge"
    print(
        f"idle gateway ({what}) over {result['seconds']:.0f} s: {result['cpu_pct_of_one_core']:.2f} % of one core"
        f" ({result['cpu_ms_per_min']:.0f} ms CPU per minute), {result['wakeups_per_s']:.1f} wake-ups/s,"
        f" RSS {result['rss_mb']:.1f} MB"
    )


if __name__ == "__main__":
    main()
