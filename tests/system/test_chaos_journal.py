"""Chaos tests of the journal's own files, with real processes: the gateway as a subprocess (``store-gateway
run``), real mosquitto brokers for the store and HQ, the HQ reference receiver, and real files deleted or
locked under a gateway killed with SIGKILL.

What they hold the gateway to (docs/OUTBOX.md, "Lost journal" and "One gateway per data directory"): two
gateways never share a data directory; seqs never go backwards whatever happened to ``journal.db``, so HQ never
sees a seq twice (no conflict at the receiver); and a journal lost together with its seq reservation is refused
unless the operator says ``--new-journal``. Each prints what it measured (``[figures]`` lines); no test asserts
on a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.kernel.journal.datadir import LOCK_FILE, SEQ_FILE
from simulators.pos import SimulationResult, run_terminals
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    TERMINALS,
    GatewayProcess,
    HqView,
    broker_config,
    gap_runs,
    gateway_env,
    hq_holds_everything,
    journal_db,
    metric_sum,
    poll_until,
    receipts,
    report_figures,
    running_receiver,
    subtract_runs,
    write_config,
)

RecordProperty = Callable[[str, object], None]
SALES_PER_TERMINAL = 60


def _gateway(tmp_path: Path, store: Mosquitto, hq: Mosquitto) -> GatewayProcess:
    api_port = free_port()
    path = write_config(
        tmp_path / "store.yaml",
        store_port=store.port,
        hq_port=hq.port,
        data_dir=tmp_path / "data",
        api_port=api_port,
    )
    return GatewayProcess(path, api_port, tmp_path / "gateway.log")


def _run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``store-gateway run`` that is expected to exit by itself (a refused start)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=gateway_env(),
        cwd=config.parent,
        timeout=120,
        check=False,
    )


async def _create_receiver_session(hq_broker: Mosquitto, hq_db: Path) -> None:
    """Subscribe the receiver once, so its persistent session queues what the gateway sends while it is away."""
    async with running_receiver(hq_broker, hq_db):
        pass


async def _sell(store: Mosquitto, per_terminal: int = SALES_PER_TERMINAL) -> SimulationResult:
    result = await run_terminals(
        broker_config(store), TERMINALS, count_per_terminal=per_terminal, rate_per_s=200.0, return_ratio=0.0
    )
    assert (result.failed, result.errors) == (0, {})
    return result


async def _delivered(gateway: GatewayProcess, hq: HqView, sales: int) -> bool:
    """The gateway has nothing left for HQ, and HQ stored at least ``sales`` sales."""
    health = await gateway.health()
    return health["backlog"] == 0 and hq.count("pos.sale") >= sales


def _journal_rows(data_dir: Path, sql: str) -> list[Any]:
    uri = journal_db(data_dir).absolute().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql).fetchall()


def _delete_journal(data_dir: Path) -> list[str]:
    gone = []
    for suffix in ("", "-wal", "-shm"):
        path = data_dir / f"journal.db{suffix}"
        if path.exists():
            path.unlink()
            gone.append(path.name)
    return gone


def _alerts(data_dir: Path, rule: str) -> list[tuple[int, dict[str, Any]]]:
    rows = _journal_rows(data_dir, "SELECT seq, body FROM events WHERE kind = 'alert.raised' ORDER BY seq")
    out = []
    for seq, body in rows:
        data = orjson.loads(body)["data"]
        if data["rule"] == rule:
            out.append((int(seq), data))
    return out


async def test_a_second_gateway_on_the_same_data_dir_refuses_to_start(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = _gateway(tmp_path, store_broker, hq_broker)
    try:
        first.start()
        await first.wait_healthy()
        assert first.proc is not None
        second = _run_cli(first.config_path)
        assert second.returncode == 1, second.stderr
        expected = f"another store-gateway is using {tmp_path / 'data'} (pid {first.proc.pid})"
        assert expected in second.stderr
        assert "Traceback" not in second.stderr
        # The first one was not disturbed: it still takes sales and commits them once.
        result = await _sell(store_broker, 10)
        await poll_until(
            lambda: (
                len(_journal_rows(tmp_path / "data", "SELECT 1 FROM events WHERE kind='pos.sale'"))
                == result.total
            ),
            "the first gateway to commit every sale",
            state=first.log_tail,
        )
        assert await first.terminate() == 0, first.log_tail()
        # SIGKILL leaves the lock file, but the kernel dropped the lock: a restart is not blocked.
        first.start()
        await first.wait_healthy()
        first.kill()
        assert (tmp_path / "data" / LOCK_FILE).exists()
        first.start()
        await first.wait_healthy()
        assert await first.terminate() == 0, first.log_tail()
    finally:
        first.close()
    report_figures(
        record_property,
        capsys,
        "second gateway on one data dir",
        {"second_exit_code": second.returncode, "sales_committed_by_first": result.total},
    )


async def test_a_deleted_journal_restarts_above_every_seq_used_and_hq_takes_the_new_events(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    gateway = _gateway(tmp_path, store_broker, hq_broker)
    hq_db = tmp_path / "hq.db"
    try:
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()
                before = await _sell(store_broker)
                await poll_until(
                    lambda: hq_holds_everything(gateway, hq, before.total),
                    "the first sales at HQ",
                    state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                )
                old_max = _journal_rows(data_dir, "SELECT MAX(seq) FROM events")[0][0]
                reserved = orjson.loads((data_dir / SEQ_FILE).read_bytes())["reserved_through"]
                gateway.kill()
                gone = _delete_journal(data_dir)
                gateway.start()
                await gateway.wait_healthy()
                after = await _sell(store_broker)
                await poll_until(
                    lambda: _delivered(gateway, hq, before.total + after.total),
                    "the sales after the lost journal at HQ",
                    state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                )
                assert await gateway.terminate() == 0, gateway.log_tail()
                counters = hq.counters()
                hq_events = hq.events()
                hq_seqs = hq.seqs()
    finally:
        gateway.close()

    new_seqs = [int(r[0]) for r in _journal_rows(data_dir, "SELECT seq FROM events ORDER BY seq")]
    assert new_seqs[0] == reserved + 1 > old_max
    assert new_seqs == list(range(reserved + 1, reserved + 1 + len(new_seqs))), "gap-free from the new start"
    (alert,) = _alerts(data_dir, "journal.missing")
    assert alert[0] == reserved + 1, "the alert is the fresh journal's first event"
    assert alert[1]["severity"] == "critical"
    assert alert[1]["details"]["possibly_lost"] == [1, reserved]
    assert counters["conflicts"] == 0, "HQ saw a seq twice"
    # Every seq missing at HQ is covered by the alert's possibly_lost (the reference receiver knows only
    # journal.corrupt as an explanation so far: see the report to the lead).
    assert subtract_runs(gap_runs(hq_seqs, new_seqs[-1]), [alert[1]["details"]["possibly_lost"]]) == []
    at_hq = receipts(hq_events)
    assert sorted(at_hq) == sorted(before.receipts + after.receipts), "every acknowledged sale at HQ once"
    report_figures(
        record_property,
        capsys,
        "journal deleted, journal.seq kept",
        {
            "deleted": gone,
            "old_max_seq": old_max,
            "reserved_through": reserved,
            "new_first_seq": new_seqs[0],
            "sales_before": before.total,
            "sales_after": after.total,
            "hq_conflicts": counters["conflicts"],
        },
    )


async def test_a_journal_lost_with_its_reservation_is_refused_unless_new_journal_is_given(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    gateway = _gateway(tmp_path, store_broker, hq_broker)
    try:
        # A brand-new data directory (no lock file, no journal, no journal.seq) is a first start.
        assert not data_dir.exists()
        gateway.start()
        await gateway.wait_healthy()
        sold = await _sell(store_broker, 10)
        await poll_until(
            lambda: len(_journal_rows(data_dir, "SELECT 1 FROM events WHERE kind='pos.sale'")) == sold.total,
            "the sales committed",
            state=gateway.log_tail,
        )
        gateway.kill()
        gone = _delete_journal(data_dir)
        (data_dir / SEQ_FILE).unlink()

        refused = _run_cli(gateway.config_path)
        assert refused.returncode == 1, refused.stderr
        assert "journal.seq are both missing" in refused.stderr
        assert "--new-journal" in refused.stderr
        assert not journal_db(data_dir).exists(), "a refused start must not create a journal"

        gateway.extra_args = ["--new-journal"]
        gateway.start()
        await gateway.wait_healthy()
        assert await gateway.terminate() == 0, gateway.log_tail()
    finally:
        gateway.close()
    (alert,) = _alerts(data_dir, "journal.missing")
    assert alert[0] == 1
    assert alert[1]["details"]["possibly_lost"] is None
    assert "--new-journal" in alert[1]["message"]
    # The next start is an ordinary one (the new journal and its reservation exist).
    assert (data_dir / SEQ_FILE).exists()
    report_figures(
        record_property,
        capsys,
        "journal and journal.seq deleted",
        {
            "deleted": [*gone, SEQ_FILE],
            "exit_code_without_flag": refused.returncode,
            "sales_before": sold.total,
        },
    )


def _damage_index_page(db_path: Path, index: str = "events_kind") -> int | None:
    """Write garbage over the root page of ``index`` under a running gateway, so that its next commit reads it.

    The page must be current in the main file (not shadowed by a newer copy in the WAL) and every connection must
    drop its cached copy: a TRUNCATE checkpoint empties the WAL, a write lock (BEGIN IMMEDIATE) keeps the gateway
    from writing while the WAL is checked to be still empty, the garbage goes in, and a one-row write by this
    connection changes the WAL header, which makes the gateway's connections reset their page caches. Returns the
    page number, or None when the gateway wrote in between (try again)."""
    with closing(sqlite3.connect(db_path, timeout=30, isolation_level=None)) as db:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            return None
        db.execute("BEGIN IMMEDIATE")
        try:
            wal = db_path.with_name(db_path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                return None
            (root,) = db.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (index,)).fetchone()
            (page_size,) = db.execute("PRAGMA page_size").fetchone()
            with db_path.open("r+b") as fh:
                fh.seek((root - 1) * page_size)
                fh.write(bytes([0xA5]) * page_size)
                fh.flush()
                os.fsync(fh.fileno())
            db.execute("INSERT OR REPLACE INTO meta VALUES ('chaos_test', 'index page damaged')")
            db.execute("COMMIT")
            return int(root)
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")


def _events_by_id(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Every readable event of these journals (the live one and those moved aside), by event id: a salvaged
    event is the same event (same id) in two files."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        uri = path.absolute().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as db:
            for (body,) in db.execute("SELECT body FROM events"):
                event = orjson.loads(body)
                found[event["id"]] = event
    return found


async def test_a_damaged_index_page_mid_run_is_moved_aside_and_every_acknowledged_sale_is_kept_once(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    gateway = _gateway(tmp_path, store_broker, hq_broker)
    hq_db = tmp_path / "hq.db"
    attempts = 0
    page: int | None = None
    try:
        async with running_receiver(hq_broker, hq_db):
            with HqView(hq_db) as hq:
                gateway.start()
                await gateway.wait_healthy()
                tills = asyncio.create_task(
                    run_terminals(
                        broker_config(store_broker),
                        TERMINALS,
                        count_per_terminal=600,
                        rate_per_s=100.0,
                        return_ratio=0.0,
                    ),
                    name="chaos-tills",
                )
                try:
                    await poll_until(
                        lambda: (
                            len(_journal_rows(data_dir, "SELECT 1 FROM events WHERE kind='pos.sale'")) >= 300
                        ),
                        "300 sales committed",
                        state=gateway.log_tail,
                    )
                    while page is None and gateway.running:
                        attempts += 1
                        page = await asyncio.to_thread(_damage_index_page, journal_db(data_dir))
                        await asyncio.sleep(0)
                    await poll_until(
                        lambda: not gateway.running,
                        "the gateway to stop on the damaged journal",
                        state=gateway.log_tail,
                    )
                    exit_code = gateway.returncode()
                    damage_exits = 1
                    gateway.start()  # what systemd or Docker's restart policy does
                    await gateway.wait_healthy()
                    result = await tills
                finally:
                    if not tills.done():
                        tills.cancel()
                    await asyncio.wait([tills])
                assert (result.failed, result.errors) == (0, {})
                await poll_until(
                    lambda: hq_holds_everything(gateway, hq, result.total),
                    "every acknowledged sale at HQ",
                    state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                )
                assert await gateway.terminate() == 0, gateway.log_tail()
                hq_events = hq.events()
                counters = hq.counters()
    finally:
        gateway.close()

    assert page is not None, "the gateway stopped before the page could be damaged"
    assert exit_code == 3, gateway.log_tail()
    moved = sorted(
        p for p in data_dir.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))
    )
    assert len(moved) == 1, sorted(p.name for p in data_dir.iterdir())
    assert not (data_dir / "journal.damaged").exists()
    events = _events_by_id([journal_db(data_dir), *moved])
    in_journals = Counter(receipts(e for e in events.values() if e["kind"] == "pos.sale"))
    assert {r: n for r, n in in_journals.items() if n > 1} == {}, "a sale committed twice"
    assert set(result.receipts) <= set(in_journals), "an acknowledged sale is in no journal"
    at_hq = Counter(receipts(hq_events))
    assert {r: n for r, n in at_hq.items() if n > 1} == {}
    assert set(at_hq) == set(result.receipts)
    assert counters["conflicts"] == 0
    (alert,) = _alerts(data_dir, "journal.corrupt")
    details = alert[1]["details"]
    assert details["unreadable_seqs"] == [], "only an index page was damaged: every event reads"
    fresh_seqs = [
        int(r[0]) for r in _journal_rows(data_dir, f"SELECT seq FROM events WHERE seq >= {alert[0]}")
    ]
    assert fresh_seqs == list(range(alert[0], alert[0] + len(fresh_seqs)))
    report_figures(
        record_property,
        capsys,
        "index page damaged mid-run",
        {
            "damaged_page": page,
            "damage_attempts": attempts,
            "exit_code": exit_code,
            "restarts": damage_exits,
            "sales": result.total,
            "salvaged": details["salvaged"],
            "possibly_lost": details["possibly_lost"],
            "fresh_first_seq": alert[0],
            "hq_duplicates": counters["duplicates"],
        },
    )


async def test_health_turns_503_while_the_journal_cannot_commit_and_recovers(
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Another process holds the journal's write lock (a stand-in for a disk that stopped answering): commits
    fail, nothing is acknowledged, and after journal.STALL_S /health says 503 ``journal_stalled``; once the lock
    goes, the sale commits once and /health is 200 again."""
    data_dir = tmp_path / "data"
    gateway = _gateway(tmp_path, store_broker, hq_broker)
    seen: list[object] = []
    try:
        gateway.start()
        await gateway.wait_healthy()
        blocker = sqlite3.connect(journal_db(data_dir), timeout=30, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            tills = asyncio.create_task(_sell(store_broker, 2), name="stalled-tills")

            async def stalled() -> bool:
                health = await gateway.health()
                seen.append((health["status"], health["reason"], health["journal_failing_s"]))
                return health["status"] == "degraded" and health["reason"] == "journal_stalled"

            await poll_until(stalled, "/health to report the stalled journal", state=lambda: seen[-3:])
            assert _journal_rows(data_dir, "SELECT 1 FROM events WHERE kind='pos.sale'") == []
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        result = await tills
        health = await gateway.wait_healthy()
        assert health["reason"] is None
        await poll_until(
            lambda: (
                len(_journal_rows(data_dir, "SELECT 1 FROM events WHERE kind='pos.sale'")) == result.total
            ),
            "the sales committed once",
            state=gateway.log_tail,
        )
        assert await gateway.terminate() == 0, gateway.log_tail()
    finally:
        gateway.close()
    report_figures(
        record_property,
        capsys,
        "journal write lock held by another process",
        {"health_while_stalled": seen[-1], "sales": result.total},
    )


@contextlib.contextmanager
def _small_filesystem(directory: Path, size: str = "48m") -> Iterator[Path]:
    """A real, small filesystem (tmpfs with ``size=``) at ``directory``; skips the test where mounting is not
    allowed (not root, no tmpfs)."""
    directory.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield directory
    finally:
        subprocess.run([shutil.which("umount") or "umount", "-l", str(directory)], check=False)


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _fill(directory: Path, leave: int) -> int:
    """Write a filler file until ``leave`` bytes are free (another program filling the disk); its size."""
    size = max(0, _free_bytes(directory) - leave)
    with (directory / "filler.bin").open("wb") as fh:
        fh.truncate(0)
        os.posix_fallocate(fh.fileno(), 0, size)
    return size


async def test_a_full_disk_still_records_hq_acks_prunes_and_delivers_every_sale_when_hq_is_back(
    store_broker: Mosquitto,
    persistent_hq_broker: Mosquitto,
    tmp_path: Path,
    record_property: RecordProperty,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 48 MiB filesystem that another program fills while HQ is down: sales stop committing (SQLITE_FULL),
    /health says 503 ``disk_full``, the devices' broker keeps the sales. When HQ is back, its acknowledgements are
    committed alone, delivered events are pruned to make room, and every acknowledged sale reaches HQ once."""
    hq_broker = persistent_hq_broker
    hq_db = tmp_path / "hq.db"
    await _create_receiver_session(hq_broker, hq_db)
    await asyncio.to_thread(hq_broker.stop)
    seen: list[object] = []
    with _small_filesystem(tmp_path / "disk") as disk:
        data_dir = disk / "data"
        api_port = free_port()
        config = write_config(
            tmp_path / "store.yaml",
            store_port=store_broker.port,
            hq_port=hq_broker.port,
            data_dir=data_dir,
            api_port=api_port,
            outbox={"min_free_bytes": 4 * 2**20},
        )
        gateway = GatewayProcess(config, api_port, tmp_path / "gateway.log")
        try:
            gateway.start()
            await gateway.wait_healthy()
            filler = _fill(disk, leave=2 * 2**20)
            sold = await run_terminals(
                broker_config(store_broker),
                TERMINALS,
                count_per_terminal=3000,
                rate_per_s=300.0,
                return_ratio=0.0,
            )
            assert (sold.failed, sold.errors) == (0, {})

            async def disk_full() -> bool:
                health = await gateway.health()
                seen.append((health["status"], health["reason"], health["backlog"]))
                return health["reason"] == "disk_full"

            await poll_until(disk_full, "/health to report the full disk", state=lambda: seen[-3:])
            committed_when_full = len(_journal_rows(data_dir, "SELECT 1 FROM events WHERE kind='pos.sale'"))
            await asyncio.to_thread(hq_broker.start)
            async with running_receiver(hq_broker, hq_db):
                with HqView(hq_db) as hq:
                    await poll_until(
                        lambda: _delivered(gateway, hq, sold.total),
                        "every sale at HQ after the full disk",
                        within=300,
                        state=lambda: {"hq": hq.state(), "log": gateway.log_tail(10)},
                    )
                    hq_events = hq.events()
                    counters = hq.counters()
            metrics = await gateway.metrics()
            assert await gateway.terminate() == 0, gateway.log_tail()
            log = gateway.log_path.read_text(errors="replace")
        finally:
            gateway.close()
    assert committed_when_full < sold.total, "the disk never filled: the test proves nothing"
    at_hq = Counter(receipts(hq_events))
    assert {r: n for r, n in at_hq.items() if n > 1} == {}, "a sale reached HQ twice"
    assert set(at_hq) == set(sold.receipts), "an acknowledged sale never reached HQ"
    assert counters["conflicts"] == 0
    pruned = metric_sum(metrics, "storegw_outbox_pruned_total")
    assert pruned > 0, "nothing was pruned to make room"
    report_figures(
        record_property,
        capsys,
        "full disk (48 MiB tmpfs) during an HQ outage",
        {
            "filler_bytes": filler,
            "sales": sold.total,
            "sales_committed_when_full": committed_when_full,
            "health_when_full": seen[-1],
            "pruned_events": int(pruned),
            "acks_committed_alone": log.count("recorded HQ acknowledgements in a commit of their own"),
            "hq_duplicates": counters["duplicates"],
        },
    )


async def test_a_disk_filled_by_another_program_makes_room_for_sales_by_evicting_undelivered_telemetry(
    tmp_path: Path,
) -> None:
    """HQ away, so nothing is delivered and nothing can be pruned; another program fills the disk. Sales must
    not wait behind telemetry HQ has not taken: the oldest undelivered telemetry is evicted (counted, reported
    with its seqs) until the sales commit. No transaction is ever evicted for it."""
    from gateway.kernel.config import OutboxConfig
    from gateway.kernel.journal import Draft
    from tests.gateway.test_journal import new_journal, running
    from tests.harness.pos_drafts import pos_draft

    # 22 MiB with min_free_bytes 8 MiB: too small for the 8 MiB reserve file (one used up before, in effect).
    with _small_filesystem(tmp_path / "disk", size="22m") as disk:
        journal = new_journal(disk)
        journal._outbox = OutboxConfig(min_free_bytes=8 * 2**20)
        journal.max_bytes = journal._outbox.max_bytes
        reading = orjson.dumps({"temperature_c": 4.25, "note": "x" * 900})
        acked: list[str] = []
        async with running(journal):
            for _ in range(4000):
                assert journal.submit(Draft("sensor.sample", "probe-1", reading))
            await journal.flush()
            telemetry = journal.last_seq
            _fill(disk, leave=3 * 2**20)
            for n in range(200):
                journal.submit(pos_draft(f"F{n}", [("SKU-1", "1")], ack=lambda n=n: acked.append(f"F{n}")))

            async def all_sales_committed() -> bool:
                return len(acked) == 200

            await poll_until(all_sales_committed, "every sale committed on the full disk", within=120)
            (disk / "filler.bin").unlink()
        with closing(sqlite3.connect(journal.path)) as db:
            sales = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'pos.sale'").fetchone()[0]
            left = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'sensor.sample'").fetchone()[0]
            reports = [
                orjson.loads(body)
                for (body,) in db.execute("SELECT body FROM events WHERE kind = 'outbox.evicted'")
            ]
    assert sales == 200
    assert left > 0, "evicted for the sales, and no more"
    evicted = [r["data"] for r in reports if r["data"]["class"] == "telemetry" and r["data"]["ranges"]]
    assert evicted, reports
    assert all(r["reason"] == "disk_low" for r in evicted)
    assert sum(r["count"] for r in evicted) == 4000 - left
    assert all(1 <= first <= last <= telemetry for r in evicted for first, last in r["ranges"])
    assert not [r for r in reports if r["data"]["class"] == "transaction"]
