"""Idle CPU of a gateway process: connected to its brokers, devices configured, nothing happening.

A gateway that sits in a back room for months should cost (near) nothing when the store is closed. This starts
real mosquitto brokers and a ``store-gateway run`` process, waits until it is healthy, lets it settle, and then
reads the process's CPU time (user + system, children included) over a window with psutil.

    python bench/idle_cpu.py [--seconds 30]

Prints CPU as a percentage of one core, CPU ms per minute, and the wake-ups (voluntary context switches) per
second of the gateway process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GatewayProcess, stop_process, terminals
from tests.brokers import Mosquitto


def idle_drivers() -> dict[str, Any]:
    """The drivers configured beside the MQTT tills (each waits on its own peer or its own timer)."""
    return {}


def measure(seconds: float, settle_s: float) -> dict[str, float]:
    store, hq = Mosquitto().start(), Mosquitto().start()
    try:
        with tempfile.TemporaryDirectory(prefix="storegw-idle-") as work:
            gateway = GatewayProcess(
                Path(work), store.port, hq.port, terminals(10), extra=idle_drivers()
            ).start()
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
    args = parser.parse_args()
    result = measure(args.seconds, args.settle)
    print(
        f"idle gateway over {result['seconds']:.0f} s: {result['cpu_pct_of_one_core']:.2f} % of one core"
        f" ({result['cpu_ms_per_min']:.0f} ms CPU per minute), {result['wakeups_per_s']:.1f} wake-ups/s,"
        f" RSS {result['rss_mb']:.1f} MB"
    )


if __name__ == "__main__":
    main()
