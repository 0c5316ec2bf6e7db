"""SD-card friendliness: bytes the gateway writes to disk per event ingested, at a steady sales rate.

Real processes: two mosquitto brokers (store, HQ, no persistence), the gateway (`store-gateway run`, default
config: synchronous=FULL, zstd, HQ up so the outbox drains as it fills) and the POS simulator
(`store-gateway simulate pos`) at ``--rates`` sales/s (a tenth of them returns). After ``--warmup`` seconds,
for ``--seconds``:

- ``write_bytes`` from ``/proc/<gateway>/io``: bytes this process caused to be sent to the block device
  (page-granular: SQLite's WAL frames are 4 KiB + 24 B, so a small commit dirties two pages);
- the journal's files (``journal.db``, ``-wal``, ``-shm``) before and after;
- group commits (``storegw_journal_commit_seconds_count``): with WAL and synchronous=FULL each commit is one
  fsync of the WAL, plus two per checkpoint (WAL, then the database);
- with ``--strace``, the fsync/fdatasync calls counted by ``strace -c`` (slows the gateway a little).

If ``write_bytes`` stays 0 (a filesystem or container that does not account it), the file growth is the
figure to use, and the script says so.

    python bench/sd_writes.py --rates 200,2000 --seconds 30
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GatewayProcess, metric_total, start_tills, stop_process, terminals
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


@dataclass
class Run:
    rate: float
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


def run_rate(rate: float, args: argparse.Namespace) -> Run:
    work = Path(tempfile.mkdtemp(prefix="sg-sd-"))
    store, hq = Mosquitto().start(), Mosquitto()
    if args.hq == "up":
        hq.start()
    tills = terminals(max(1, round(rate / 100)))  # 100 sales/s a till: a busy store has a handful
    gw = GatewayProcess(work, store.port, hq.port, tills)
    sim: subprocess.Popen[bytes] | None = None
    tracer: subprocess.Popen[bytes] | None = None
    try:
        gw.start()
        gw.wait_healthy()
        sim = start_tills(store.port, tills, rate, duration_s=args.warmup + args.seconds + 30)
        time.sleep(args.warmup)
        trace_out = work / "strace.txt"
        tracer = strace_start(gw.pid, trace_out) if args.strace else None
        before = Snapshot.take(gw)
        time.sleep(args.seconds)
        after = Snapshot.take(gw)
        fsyncs = strace_counts(tracer, trace_out) if tracer is not None else None
        if sim.poll() is not None:
            raise RuntimeError(f"the simulator stopped early (exit code {sim.returncode})")
        return Run(
            rate,
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
        stop_process(sim)
        gw.stop()
        store.close()
        hq.close()
        shutil.rmtree(work, ignore_errors=True)


def report(r: Run) -> None:
    per_sale = max(r.sales, 1)
    print(
        f"\n== {r.rate:,.0f} sales/s asked: {r.sales / r.seconds:,.0f} committed per s over {r.seconds:.1f} s"
    )
    print(
        f"events committed: {r.events:,} ({r.sales:,} sales and returns; the rest the stock ledger's stock.level"
        f" and alerts), {r.envelope_bytes / per_sale:,.0f} B of envelopes per sale"
    )
    print(
        f"group commits: {r.commits:,} ({r.commits / r.seconds:,.0f}/s, {r.events / max(r.commits, 1):.1f} events"
        f" each); WAL restarts after checkpoints: {r.wal_resets}"
    )
    print(
        f"/proc write_bytes: {r.write_bytes / 2**20:,.1f} MiB = {r.write_bytes / per_sale:,.0f} B per sale,"
        f" {r.write_bytes / max(r.events, 1):,.0f} B per event, {r.write_bytes / max(r.commits, 1) / 1024:,.0f} KiB"
        f" per commit, {r.write_bytes / r.seconds / 2**20:,.2f} MiB/s;"
        f" {r.write_bytes / max(r.envelope_bytes, 1):.1f}x the envelope bytes"
    )
    print(f"journal files grew {r.file_growth / 2**20:,.1f} MiB = {r.file_growth / per_sale:,.0f} B per sale")
    if r.fsyncs is not None:
        total = sum(r.fsyncs.values())
        print(f"fsync-family calls (strace -c): {r.fsyncs or 'none'}; {total / r.seconds:,.0f}/s")
    else:
        print(f"fsyncs: about one per group commit, ~{r.commits / r.seconds:,.0f}/s (--strace counts them)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,2000", help="steady sales/s to measure (default 200,2000)")
    ap.add_argument("--seconds", type=float, default=30, help="measurement window per rate (default 30)")
    ap.add_argument("--warmup", type=float, default=3, help="seconds before the window opens (default 3)")
    ap.add_argument(
        "--hq", choices=["up", "down"], default="up", help="down: no acknowledgements to record (comparison)"
    )
    ap.add_argument("--strace", action="store_true", help="count fsync/fdatasync calls with strace -c")
    args = ap.parse_args()

    runs = [run_rate(float(r), args) for r in args.rates.split(",")]
    for r in runs:
        report(r)
    accounted = all(r.write_bytes > 0 for r in runs)
    source = (
        "/proc/<pid>/io write_bytes" if accounted else "journal file growth (write_bytes not accounted here)"
    )
    print()
    for r in runs:
        written = r.write_bytes if accounted else r.file_growth
        fsyncs = sum(r.fsyncs.values()) if r.fsyncs is not None else r.commits
        print(
            f"summary: {r.sales / r.seconds:,.0f} sales/s: {written / max(r.sales, 1):,.0f} B written per sale"
            f" ({written / max(r.events, 1):,.0f} per event, {written / r.seconds / 2**20:.2f} MiB/s),"
            f" {fsyncs / r.seconds:,.0f} fsyncs/s [{source}]"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
