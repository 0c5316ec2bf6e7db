"""Modbus polling: 20 devices x 50 registers from the fridge simulator (a pymodbus server in its own process).

The simulator serves a 50-register profile (50 int16 holding registers, one polling group) for 20 unit ids on
Modbus TCP, or with ``--rtu`` on an RS-485 line made of two pseudo-terminals (no baud-rate timing, so RTU
figures show the driver's and the bus lock's cost, not 19200 baud). The driver polls them into a real SQLite
journal, in two phases: at the configured interval (1 s per device, a realistic setting) and flat out (an
interval of 1 ms: the ceiling of one link). Gateway-side CPU is this process's CPU time (the driver, pymodbus's
client, the journal) divided by the polls; the simulator's CPU is not counted.

    python bench/modbus_poll.py [--seconds 10] [--rtu]

Prints polls/s, registers/s, request latency p50/p99 and CPU per poll for each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.base import DriverContext
from drivers.devices import DeviceRegistry
from drivers.modbus.config import ModbusDriverConfig
from drivers.modbus.driver import ModbusDriver
from drivers.profiles import PROFILES_ENV
from gateway.config import GatewayConfig
from gateway.kernel.clock import ClockState
from gateway.kernel.config import JournalConfig
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics

DEVICES = 20
REGISTERS = 50
PROFILE = "bench-50-registers"


def write_profile(folder: Path) -> None:
    points = "\n".join(
        f'  - {{name: r{i}, address: {i}, type: int16, scale: 0.1, unit: "°C", group: all}}'
        for i in range(REGISTERS)
    )
    (folder / f"{PROFILE}.yaml").write_text(
        f"profile: {PROFILE}\nfamily: modbus\nvendor: bench\nmodel: {REGISTERS} holding registers\n"
        f'source: bench/modbus_poll.py\nconfidence: "third-party map: verify"\n'
        f"groups:\n  all: {{interval_s: 1}}\npoints:\n{points}\n",
        encoding="utf-8",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def start_simulator(rtu: bool, port: int) -> tuple[subprocess.Popen[str], str]:
    units = ",".join(str(u) for u in range(1, DEVICES + 1))
    args = [sys.executable, "-m", "gateway.cli", "simulate", "fridge", "--profile", PROFILE, "--units", units]
    args += ["--transport", "rtu"] if rtu else ["--transport", "tcp", "--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if rtu:
        found = re.search(r"serial_port at (\S+)", line)
        if found is None:
            proc.kill()
            raise SystemExit(f"the simulator did not start: {line!r}")
        return proc, found.group(1)
    return proc, f"127.0.0.1:{port}"


def gateway_config() -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway_id": "bench",
            "store": {"id": "bench-store", "name": "bench", "timezone": "Asia/Hong_Kong"},
            "store_broker": {"host": "127.0.0.1", "port": 1883},
            "hq": {"host": "127.0.0.1", "port": 1883},
            "api": {"enabled": False},
        }
    )


async def phase(where: str, rtu: bool, interval: float, seconds: float, work: Path) -> dict[str, float]:
    metrics = Metrics()
    journal = Journal(
        work / f"journal-{interval}.db",
        "bench-store",
        "bench",
        JournalConfig(),
        metrics,
        (),
        ClockState(override=True),
    )
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer")
    ctx = DriverContext(journal, metrics, DeviceRegistry(journal.submit), gateway_config())
    devices = [
        {
            "id": f"fridge-{u}",
            "unit": u,
            "profile": PROFILE,
            "poll_intervals": {"all": interval},
            "rate_limit_per_s": 10_000,
            "rate_burst": 10_000,
        }
        for u in range(1, DEVICES + 1)
    ]
    link: dict[str, Any] = (
        {"transport": "rtu", "serial_port": where, "baudrate": 19200}
        if rtu
        else {
            "transport": "tcp",
            "host": where.split(":")[0],
            "port": int(where.split(":")[1]),
        }
    )
    config = ModbusDriverConfig.model_validate(
        {"type": "modbus", "name": "bench", "timeout_s": 1, "devices": devices, **link}
    )
    driver = ModbusDriver(config, ctx)
    driver.keep_latencies = True
    task = asyncio.create_task(driver.run(), name="modbus-bench")
    try:
        async with asyncio.timeout(30):
            while sum(d.health.messages for d in ctx.devices) < DEVICES:  # noqa: ASYNC110 - warm-up
                await asyncio.sleep(0.05)
        messages0 = sum(d.health.messages for d in ctx.devices)
        driver.stats.latencies_s.clear()
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, t1 = time.process_time(), time.monotonic()
        polls = sum(d.health.messages for d in ctx.devices) - messages0
        latencies = sorted(driver.stats.latencies_s)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await journal.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()
    elapsed = t1 - t0
    return {
        "interval_s": interval,
        "polls_per_s": polls / elapsed,
        "registers_per_s": polls * REGISTERS / elapsed,
        "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "cpu_ms_per_poll": 1000 * (cpu1 - cpu0) / polls if polls else float("nan"),
        "cpu_pct_of_one_core": 100 * (cpu1 - cpu0) / elapsed,
        "timeouts": driver.stats.timeouts,
    }


async def run(seconds: float, rtu: bool) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="storegw-modbus-bench-") as tmp:
        work = Path(tmp)
        (work / "profiles").mkdir()
        write_profile(work / "profiles")
        os.environ[PROFILES_ENV] = str(work / "profiles")
        proc, where = start_simulator(rtu, free_port())
        try:
            return [await phase(where, rtu, interval, seconds, work) for interval in (1.0, 0.001)]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Measurement window of each phase.")
    parser.add_argument("--rtu", action="store_true", help="RTU over a pty pair instead of TCP.")
    args = parser.parse_args()
    results = asyncio.run(run(args.seconds, args.rtu))
    transport = "RTU (pty)" if args.rtu else "TCP"
    print(
        f"Modbus polling, {DEVICES} devices x {REGISTERS} registers over {transport}, {args.seconds:g} s per phase"
    )
    for r in results:
        label = "at 1 s per device" if r["interval_s"] >= 1 else "flat out"
        print(
            f"  {label:>18}: {r['polls_per_s']:8.1f} polls/s  {r['registers_per_s']:9.0f} registers/s"
            f"  latency p50 {r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms"
            f"  CPU {r['cpu_ms_per_poll']:.3f} ms/poll ({r['cpu_pct_of_one_core']:.1f} % of a core)"
            f"  timeouts {r['timeouts']:.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
