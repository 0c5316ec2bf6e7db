"""SD-card wear: bytes the gateway writes to disk per event, and per day, for a store's steady load.

Real processes: two mosquitto brokers (store, HQ, no persistence), the gateway (`store-gateway run`, default
config, HQ up so the outbox drains as it fills), the POS simulator (`store-gateway simulate pos`, a tenth of the
sales are returns) and the sensor simulator (`store-gateway simulate sensors`, telemetry readings). A profile is
``SALES`` or ``SALES+SAMPLES`` per second; the three the documentation quotes:

- ``1``: a quiet store, one sale a second;
- ``1+10``: a normal store, one sale and ten sensor samples a second (a few fridges and probes);
- ``50``: a rush, fifty sales a second.

After ``--warmup`` seconds, for ``--seconds``:

- ``write_bytes`` from ``/proc/<gateway>/io``: bytes this process caused to be sent to the block device
  (page-granular; checkpoints included, as they run on the gateway's own threads);
- the envelope bytes committed (``storegw_outbox_bytes``): what an ideal log would write; the ratio of the two
  is the write amplification;
- group commits (``storegw_journal_commit_seconds_count``) and, with ``--strace``, fsync-family calls.

If ``write_bytes`` stays 0 (a filesystem or container that does not account it), the file growth is the
figure to use, and the script says so.

    python bench/sd_writes.py --profiles 1,1+10,50 --seconds 60
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, GatewayProcess, metric_total, start_tills, stop_process, terminals
from tests.harness.brokers import Mosquitto

SALE_KINDS = (
    'storegw_events_committed_total{kind="pos.sale"}',
    'storegw_events_committed_total{kind="pos.return"}',
)


@dataclass
class Snapshot:
    at: float
    write_bytes: int
    sales: float
    events: float
    commits: float
    files: int
    envelope_bytes: float
    wal_resets: int

    @classmethod
    def take(cls, gw: GatewayProcess) -> Snapshot:
        io = psutil.Process(gw.pid).io_counters()
        m = gw.metrics()
        files = sum(f.stat().st_size for f in gw.data_dir.glob("journal.db*"))
        wal = gw.data_dir / "journal.db-wal"
        head = wal.read_bytes()[:16] if wal.exists() else b""
        return cls(
            time.monotonic(),
            int(io.write_bytes),
            sum(m.get(k, 0.0) for k in SALE_KINDS),
            metric_total(m, "storegw_events_committed_total"),
            m.get("storegw_journal_commit_seconds_count", 0.0),
            files,
            metric_total(m, "storegw_outbox_bytes"),
            int.from_bytes(head[12:16], "big") if len(head) == 16 else 0,
        )


@dataclass(frozen=True)
class Profile:
    sales: float
    """Sales and returns per second."""
    samples: float
    """Sensor readings per second (ten sensors share them)."""

    @classmethod
    def parse(cls, text: str) -> Profile:
        sales, _, samples = text.partition("+")
        return cls(float(sales), float(samples or 0))

    def __str__(self) -> str:
        name = f"{self.sales:g} sale{'s' if self.sales != 1 else ''}/s"
        return name + (f" + {self.samples:g} samples/s" if self.samples else "")


SENSORS: Final = [f"probe-{i:02d}" for i in range(1, 11)]
SENSOR_DRIVER: Final = {
    "type": "mqtt",
    "name": "sensors",
    "routes": [{"pattern": "store/sensor/{device_id}/reading", "kind": "sensor.reading"}],
    "unknown_devices": "accept",
}


@dataclass
class Run:
    profile: Profile
    seconds: float
    sales: int
    events: int
    write_bytes: int
    commits: int
    file_growth: int
    envelope_bytes: int
    """Event bytes committed (the envelopes): what an ideal log would write."""
    wal_resets: int
    """WAL restarts after a checkpoint (the checkpoint sequence in the WAL header)."""
    fsyncs: dict[str, int] | None

    @property
    def per_event(self) -> float:
        return self.write_bytes / max(self.events, 1)

    @property
    def amplification(self) -> float:
        return self.write_bytes / max(self.envelope_bytes, 1)

    @property
    def per_day(self) -> float:
        return self.write_bytes / self.seconds * 86400


def start_sensors(port: int, rate_per_s: float, duration_s: float) -> subprocess.Popen[bytes]:
    per_sensor = rate_per_s / len(SENSORS)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "simulate", "sensors", "--port", str(port),
         "--device-ids", ",".join(SENSORS), "--rate", str(per_sensor),
         "--count", str(int(per_sensor * duration_s) + 1)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def strace_start(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    if shutil.which("strace") is None:
        print("strace not found: fsyncs are not counted", file=sys.stderr)
        return None
    return subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def strace_counts(proc: subprocess.Popen[bytes], out: Path) -> dict[str, int]:
    """Stop strace (it prints its -c table to the -o file on detach); calls per syscall."""
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def run_profile(profile: Profile, args: argparse.Namespace) -> Run:
    work = Path(tempfile.mkdtemp(prefix="sg-sd-"))
    store, hq = Mosquitto().start(), Mosquitto()
    if args.hq == "up":
        hq.start()
    tills = terminals(max(1, round(profile.sales / 100)))  # 100 sales/s a till: a busy store has a handful
    extra = {"drivers": [SENSOR_DRIVER]} if profile.samples else None
    gw = GatewayProcess(work, store.port, hq.port, tills, extra=extra)
    sims: list[subprocess.Popen[bytes]] = []
    tracer: subprocess.Popen[bytes] | None = None
    try:
        gw.start()
        gw.wait_healthy()
        duration = args.warmup + args.seconds + 30
        sims.append(start_tills(store.port, tills, profile.sales, duration_s=duration))
        if profile.samples:
            sims.append(start_sensors(store.port, profile.samples, duration))
        time.sleep(args.warmup)
        trace_out = work / "strace.txt"
        tracer = strace_start(gw.pid, trace_out) if args.strace else None
        before = Snapshot.take(gw)
        time.sleep(args.seconds)
        after = Snapshot.take(gw)
        fsyncs = strace_counts(tracer, trace_out) if tracer is not None else None
        for sim in sims:
            if sim.poll() is not None:
                raise RuntimeError(f"a simulator stopped early (exit code {sim.returncode})")
        return Run(
            profile,
            after.at - before.at,
            int(after.sales - before.sales),
            int(after.events - before.events),
            after.write_bytes - before.write_bytes,
            int(after.commits - before.commits),
            after.files - before.files,
            int(after.envelope_bytes - before.envelope_bytes),
            after.wal_resets - before.wal_resets,
            fsyncs,
        )
    finally:
        stop_process(tracer)
        for sim in sims:
            stop_process(sim)
        gw.stop()
        store.close()
        hq.close()
        shutil.rmtree(work, ignore_errors=True)


def report(r: Run) -> None:
    per_sale = max(r.sales, 1)
    print(f"\n== {r.profile}: {r.sales / r.seconds:,.1f} sales/s committed over {r.seconds:.1f} s")
    print(
        f"events committed: {r.events:,} ({r.events / r.seconds:,.1f}/s; {r.sales:,} sales and returns, the rest"
        f" sensor readings, the stock ledger's stock.level and alerts), {r.envelope_bytes / max(r.events, 1):,.0f} B"
        f" of envelope per event"
    )
    print(
        f"group commits: {r.commits:,} ({r.commits / r.seconds:,.2f}/s, {r.events / max(r.commits, 1):.1f} events"
        f" each); WAL restarts after checkpoints: {r.wal_resets}"
    )
    print(
        f"/proc write_bytes: {r.write_bytes / 2**20:,.2f} MiB = {r.per_event:,.0f} B per event,"
        f" {r.write_bytes / per_sale:,.0f} B per sale, {r.write_bytes / max(r.commits, 1) / 1024:,.1f} KiB per"
        f" commit; {r.amplification:.1f}x the envelope bytes"
    )
    print(f"journal files grew {r.file_growth / 2**20:,.2f} MiB")
    if r.fsyncs is not None:
        total = sum(r.fsyncs.values())
        print(f"fsync-family calls (strace -c): {r.fsyncs or 'none'}; {total / r.seconds:,.1f}/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--profiles",
        default="1,1+10,50",
        help="SALES[+SAMPLES] per second, comma-separated (default 1,1+10,50)",
    )
    ap.add_argument("--seconds", type=float, default=60, help="measurement window per profile (default 60)")
    ap.add_argument("--warmup", type=float, default=5, help="seconds before the window opens (default 5)")
    ap.add_argument(
        "--hq", choices=["up", "down"], default="up", help="down: no acknowledgements to record (comparison)"
    )
    ap.add_argument("--strace", action="store_true", help="count fsync/fdatasync calls with strace -c")
    args = ap.parse_args()

    runs = [run_profile(Profile.parse(p), args) for p in args.profiles.split(",")]
    for r in runs:
        report(r)
    accounted = all(r.write_bytes > 0 for r in runs)
    source = (
        "/proc/<pid>/io write_bytes" if accounted else "journal file growth (write_bytes not accounted here)"
    )
    print(f"\n| profile | written per event | per hour | per day | envelope | amplification |  [{source}]")
    for r in runs:
        written = r.write_bytes if accounted else r.file_growth
        per_s = written / r.seconds
        print(
            f"| {r.profile} | {written / max(r.events, 1) / 1000:,.2f} kB | {per_s * 3600 / 2**20:,.1f} MiB"
            f" | {per_s * 86400 / 2**30:,.2f} GiB | {r.envelope_bytes / max(r.events, 1):,.0f} B"
            f" | {written / max(r.envelope_bytes, 1):.1f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
