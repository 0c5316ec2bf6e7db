"""Recovery from a corrupt journal, on real SQLite files: probe (garbage, truncation, damaged tail pages, a
locked file, a healthy multi-MB journal), move aside, salvage, the seq reservation sidecar, and the alert."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.kernel import journal as journal_module
from gateway.kernel.events import AlertRaised
from gateway.kernel.journal import JournalCorruptError, JournalError
from gateway.kernel.journal import health as journal_health
from gateway.kernel.journal import opening as journal_opening
from gateway.kernel.journal.datadir import LOCK_FILE, SEQ_FILE, DataDirBusyError, DataDirLock, SeqReservation
from gateway.kernel.journal.recovery import (
    DAMAGE_MARK,
    corrupt_alert,
    mark_damaged,
    move_aside,
    probe,
    read_damage_mark,
)
from gateway.kernel.journal.salvage import salvage_delivered, salvage_last_seq
from gateway.kernel.outbox import CLASSES
from tests.gateway.test_journal import new_journal, running
from tests.harness.pos_drafts import pos_draft

PAGE = 4096
COLUMNS = "seq, id, kind, device_id, recorded_at, dedup_key, body"


def fill(conn: sqlite3.Connection, first: int, last: int, body_bytes: int = 300) -> None:
    """Events first..last (one transaction), with their meta, the way the journal lays them out."""
    rows = [
        (
            seq,
            f"id-{seq:012d}",
            "pos.sale",
            "pos1",
            "2026-01-01T00:00:00.000Z",
            f"k-{seq}",
            os.urandom(body_bytes),
        )
        for seq in range(first, last + 1)
    ]
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO events({COLUMNS}) VALUES (?,?,?,?,?,?,?)", rows)
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(last),))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('delivered_seq', ?)", (str(last // 2),))
    conn.execute("COMMIT")


def open_journal_db(path: Path) -> sqlite3.Connection:
    conn = journal_module.connect(path)
    conn.executescript(journal_module.SCHEMA)
    return conn


def make_journal(path: Path, events: int, body_bytes: int = 300) -> Path:
    """A cleanly closed journal (no -wal left) holding seqs 1..events."""
    conn = open_journal_db(path)
    fill(conn, 1, events, body_bytes)
    conn.close()
    assert not Path(f"{path}-wal").exists()
    return path


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~9 MB journal of 20,000 events, built once; tests copy it before damaging it."""
    return make_journal(tmp_path_factory.mktemp("healthy") / "journal.db", 20_000)


@pytest.fixture
def copy(healthy: Path, tmp_path: Path) -> Path:
    target = tmp_path / "journal.db"
    shutil.copyfile(healthy, target)
    return target


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- probe ------------------------------------------------------------------------------------------


def test_probe_accepts_a_missing_an_empty_and_a_healthy_journal(copy: Path, tmp_path: Path) -> None:
    assert copy.stat().st_size > 8 * 1024 * 1024
    assert probe(copy) is None
    assert probe(tmp_path / "nothing.db") is None
    empty = tmp_path / "empty.db"
    empty.touch()
    assert probe(empty) is None
    # Reading a cleanly closed journal leaves no -wal/-shm behind.
    assert names(tmp_path) == ["empty.db", "journal.db"]


def test_probe_rejects_garbage(tmp_path: Path) -> None:
    garbage = tmp_path / "journal.db"
    garbage.write_bytes(os.urandom(64 * 1024))
    assert probe(garbage) == "file is not a database (no SQLite header)"
    tiny = tmp_path / "tiny.db"
    tiny.write_bytes(b"SQLite format 3\x00garbage")
    assert probe(tiny) == "file is not a database (truncated header: 23 bytes)"
    text = tmp_path / "text.db"
    text.write_text("journal_mode=wal\n" * 1000)
    assert probe(text) == "file is not a database (no SQLite header)"


def test_probe_rejects_a_header_with_garbage_behind_it(copy: Path) -> None:
    """A valid first 100 bytes is not enough: SQLite's own verdict on the pages is reported."""
    with copy.open("r+b") as f:
        f.seek(100)
        f.write(os.urandom(PAGE - 100))
    reason = probe(copy)
    assert reason is not None
    assert "malformed" in reason


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (lambda size: size // 2 // PAGE * PAGE, "database file truncated ("),
        (lambda size: size - 100, "database file truncated mid-page"),
        (lambda size: PAGE + 1000, "database file truncated mid-page"),
        (lambda size: 60, "file is not a database (truncated header: 60 bytes)"),
    ],
    ids=["mid-file", "mid-last-page", "mid-second-page", "mid-header"],
)
def test_probe_rejects_a_truncated_journal(copy: Path, cut: Callable[[int], int], expected: str) -> None:
    os.truncate(copy, cut(copy.stat().st_size))
    reason = probe(copy)
    assert reason is not None
    assert reason.startswith(expected)


def test_probe_finds_damaged_tail_pages_that_the_header_cannot_show(copy: Path) -> None:
    """Same size, same header: the last pages (where the writer appends) are garbage."""
    size = copy.stat().st_size
    with copy.open("r+b") as f:
        f.seek(size - 8 * PAGE)
        f.write(os.urandom(8 * PAGE))
    reason = probe(copy)
    assert reason is not None
    assert "malformed" in reason


def test_probe_rejects_a_meta_seq_that_is_not_a_number(copy: Path) -> None:
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE meta SET value = 'x17' WHERE key = 'last_seq'")
    conn.commit()
    conn.close()
    Path(f"{copy}-wal").unlink(missing_ok=True)
    assert probe(copy) == "meta last_seq is not a seq: 'x17'"


def test_probe_reads_a_journal_left_with_its_wal_after_a_crash(tmp_path: Path) -> None:
    """After a SIGKILL the newest events live only in the -wal: still a healthy journal, salvage sees them."""
    live = tmp_path / "live"
    live.mkdir()
    conn = open_journal_db(live / "journal.db")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    fill(conn, 1, 300)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fill(conn, 301, 500)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(live / f"journal.db{suffix}", crashed / f"journal.db{suffix}")
    conn.close()
    assert Path(crashed / "journal.db-wal").stat().st_size > 0
    assert probe(crashed / "journal.db") is None
    assert salvage_last_seq(crashed / "journal.db") == 500


def test_probe_does_not_call_a_locked_journal_corrupt(copy: Path) -> None:
    """Another process holding the journal is no evidence of damage: an error, never a reason to move it."""
    holder = journal_module.connect(copy)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe(copy, busy_timeout_s=0.05)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def wreck(path: Path) -> None:
    """Overwrite a journal with garbage behind a zeroed header, and drop its companions."""
    path.write_bytes(b"\x00" * 100 + os.urandom(PAGE * 3))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_probe_agrees_with_the_journal(tmp_path: Path) -> None:
    """What the real Journal writes, probe accepts; what the Journal cannot open, probe reports."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(20):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    assert probe(journal.path) is None

    last = journal.last_seq
    wreck(journal.path)
    assert probe(journal.path) is not None
    fresh = new_journal(tmp_path)
    async with running(fresh):
        # Moved aside, started above every seq the old journal may have used, with the alert to send.
        assert fresh.replaced is not None
        assert fresh.replaced["details"]["possibly_lost"] == [1, fresh.last_seq]
        assert fresh.last_seq > last
        assert fresh.submit(pos_draft("R-new", [("SKU-1", "1")]))
    assert probe(fresh.path) is None


# --- move aside and salvage -------------------------------------------------------------------------


def test_move_aside_renames_the_journal_and_its_companions(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    for suffix, content in (("", b"main"), ("-wal", b"wal"), ("-shm", b"shm")):
        Path(f"{path}{suffix}").write_bytes(content)
    (tmp_path / SEQ_FILE).write_text('{"reserved_through": 5}')
    hk = timezone(timedelta(hours=8))
    moved = move_aside(path, datetime(2026, 11, 22, 18, 0, 5, tzinfo=hk))
    assert moved == tmp_path / "journal.db.corrupt-20261122T100005Z"
    assert names(tmp_path) == [
        "journal.db.corrupt-20261122T100005Z",
        "journal.db.corrupt-20261122T100005Z-shm",
        "journal.db.corrupt-20261122T100005Z-wal",
        SEQ_FILE,
    ]
    assert Path(f"{moved}-wal").read_bytes() == b"wal"
    assert moved.read_bytes() == b"main"


def test_move_aside_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    moved = []
    for n in range(3):
        path.write_bytes(b"main %d" % n)
        if n == 1:
            Path(f"{path}-wal").write_bytes(b"wal 1")
        moved.append(move_aside(path, now))
    assert [m.name for m in moved] == [
        "journal.db.corrupt-20260102T030405Z",
        "journal.db.corrupt-20260102T030405Z.2",
        "journal.db.corrupt-20260102T030405Z.3",
    ]
    assert [m.read_bytes() for m in moved] == [b"main 0", b"main 1", b"main 2"]
    assert Path(f"{moved[1]}-wal").read_bytes() == b"wal 1"
    assert not path.exists()


def test_move_aside_uses_the_current_utc_time(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"x")
    before = datetime.now(UTC).replace(microsecond=0)
    moved = move_aside(path)
    stamp = moved.name.removeprefix("journal.db.corrupt-")
    assert datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) >= before


def test_salvage_reads_what_it_can(copy: Path, tmp_path: Path) -> None:
    assert salvage_last_seq(copy) == 20_000
    assert salvage_delivered(copy) == 10_000
    # The events' tail is garbage but meta (an early page) is still readable.
    size = copy.stat().st_size
    with copy.open("r+b") as f:
        f.seek(size - 8 * PAGE)
        f.write(os.urandom(8 * PAGE))
    assert salvage_last_seq(copy) == 20_000
    assert salvage_delivered(copy) == 10_000
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(PAGE))
    assert salvage_last_seq(garbage) is None
    assert salvage_delivered(garbage) is None
    assert salvage_last_seq(tmp_path / "missing.db") is None
    assert not (tmp_path / "missing.db").exists()


# --- the seq reservation ----------------------------------------------------------------------------


def reservation_on_disk(directory: Path) -> object:
    return json.loads((directory / SEQ_FILE).read_text())


def test_reservation_writes_a_block_ahead_and_only_when_needed(tmp_path: Path) -> None:
    res = SeqReservation(tmp_path)
    assert res.load() == 0
    res.ensure(0)
    assert reservation_on_disk(tmp_path) == {"reserved_through": 1_000_000}
    inode = (tmp_path / SEQ_FILE).stat().st_ino
    for seq in (1, 500_000, 900_000):
        res.ensure(seq)
    assert (tmp_path / SEQ_FILE).stat().st_ino == inode, "rewritten before the headroom ran out"
    res.ensure(900_001)
    assert reservation_on_disk(tmp_path) == {"reserved_through": 1_900_001}
    assert res.reserved_through == 1_900_001
    assert names(tmp_path) == [SEQ_FILE]


def test_reservation_survives_a_restart_and_a_lost_journal(tmp_path: Path) -> None:
    assert SeqReservation(tmp_path).start_after_corruption() == 1
    SeqReservation(tmp_path).ensure(42)
    again = SeqReservation(tmp_path)
    assert again.load() == 1_000_042
    assert again.start_after_corruption() == 1_000_043
    # A sidecar that was lost or lags behind: the seq salvaged from the old journal still wins.
    assert again.start_after_corruption(salvaged_last_seq=2_000_000) == 2_000_001
    # ensure() before load() reads the file first: it never lowers a reservation.
    lazy = SeqReservation(tmp_path)
    lazy.ensure(7)
    assert reservation_on_disk(tmp_path) == {"reserved_through": 1_000_042}


def test_a_fresh_journal_after_corruption_reserves_above_its_start(tmp_path: Path) -> None:
    res = SeqReservation(tmp_path, block=1000)
    res.ensure(950)
    assert res.reserved_through == 1950
    start = SeqReservation(tmp_path, block=1000).start_after_corruption()
    assert start == 1951
    fresh = SeqReservation(tmp_path, block=1000)
    fresh.ensure(start - 1)
    assert reservation_on_disk(tmp_path) == {"reserved_through": 2950}


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff garbage", b'{"reserved_through": -5}', b'{"reserved_through": "7"}', b"[1]", b"true"],
)
def test_an_unreadable_reservation_counts_as_none_and_is_logged(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / SEQ_FILE).write_bytes(content)
    res = SeqReservation(tmp_path)
    with caplog.at_level(logging.ERROR, logger="gateway.kernel.recovery"):
        assert res.load() == 0
    assert "unreadable" in caplog.text
    res.ensure(10)
    assert reservation_on_disk(tmp_path) == {"reserved_through": 1_000_010}


def test_a_failed_reservation_write_is_retried_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "not-yet"
    res = SeqReservation(data_dir)
    with caplog.at_level(logging.ERROR, logger="gateway.kernel.recovery"):
        res.ensure(5)
        res.ensure(6)
    assert caplog.text.count("cannot write the seq reservation") == 1
    assert res.reserved_through == 0
    data_dir.mkdir()
    res.ensure(7)
    assert reservation_on_disk(data_dir) == {"reserved_through": 1_000_007}


# --- the alert ----------------------------------------------------------------------------------------


def test_the_alert_names_the_file_and_the_seqs_possibly_lost(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    moved = tmp_path / "journal.db.corrupt-20261122T100005Z"
    payload = corrupt_alert(path, moved, "database disk image is malformed", 10_000, 1_000_043)
    alert = AlertRaised.model_validate(payload)
    assert (alert.rule, alert.severity, alert.subject) == ("journal.corrupt", "critical", "journal.db")
    assert alert.details == {
        "moved_to": str(moved),
        "reason": "database disk image is malformed",
        "possibly_lost": [10_001, 1_000_042],
    }
    assert "journal.db.corrupt-20261122T100005Z" in alert.message
    assert corrupt_alert(path, moved, "x", None, 500)["details"]["possibly_lost"] == [1, 499]
    assert corrupt_alert(path, moved, "x", None, 1)["details"]["possibly_lost"] is None
    odd = corrupt_alert(tmp_path / "j\x01.db", moved, "r" * 2000, None, 5)
    assert AlertRaised.model_validate(odd).subject == "j?.db"


# --- a lost journal, and one gateway per data directory ------------------------------------------------


async def _commit_sales(tmp_path: Path, count: int) -> int:
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(count):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    return journal.last_seq


def _delete_journal_files(directory: Path) -> None:
    for name in ("journal.db", "journal.db-wal", "journal.db-shm"):
        (directory / name).unlink(missing_ok=True)


async def test_a_missing_journal_starts_above_the_reservation_with_an_alert(tmp_path: Path) -> None:
    last = await _commit_sales(tmp_path, 5)
    reserved = SeqReservation(tmp_path).load()
    assert reserved > last
    _delete_journal_files(tmp_path)
    fresh = new_journal(tmp_path)
    async with running(fresh):
        assert fresh.last_seq == reserved
        assert fresh.replaced is not None
        AlertRaised.model_validate(fresh.replaced)
        assert fresh.replaced["rule"] == "journal.missing"
        assert fresh.replaced["severity"] == "critical"
        assert fresh.replaced["details"]["possibly_lost"] == [1, reserved]
        assert fresh.submit(pos_draft("R-new", [("SKU-1", "1")]))
    assert fresh.last_seq == reserved + 1
    # Stopped before the alert was committed: the next start still has it, and commits it.
    pending = new_journal(tmp_path)
    async with running(pending):
        assert pending.replaced == fresh.replaced
        assert pending.submit(pending.replaced_draft())
    assert pending.last_seq == reserved + 2
    # The next start is an ordinary one: the fresh journal remembers where it is, and the alert is sent once.
    again = new_journal(tmp_path)
    async with running(again):
        assert again.replaced is None
        assert again.last_seq == reserved + 2


async def test_a_journal_emptied_to_zero_bytes_counts_as_missing(tmp_path: Path) -> None:
    await _commit_sales(tmp_path, 3)
    reserved = SeqReservation(tmp_path).load()
    _delete_journal_files(tmp_path)
    (tmp_path / "journal.db").write_bytes(b"")
    fresh = new_journal(tmp_path)
    async with running(fresh):
        assert fresh.replaced is not None
        assert fresh.replaced["rule"] == "journal.missing"
        assert fresh.last_seq == reserved
    assert any(name.startswith("journal.db.corrupt-") for name in names(tmp_path))


async def test_a_wal_left_without_its_journal_is_moved_aside_not_replayed(tmp_path: Path) -> None:
    await _commit_sales(tmp_path, 3)
    (tmp_path / "journal.db").unlink()
    (tmp_path / "journal.db-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(4096))
    fresh = new_journal(tmp_path)
    async with running(fresh):
        assert fresh.replaced is not None
    assert any(".orphan-" in name and name.endswith("-wal") for name in names(tmp_path))
    assert probe(fresh.path) is None


async def test_a_journal_lost_with_its_reservation_is_refused_in_a_used_data_dir(tmp_path: Path) -> None:
    await _commit_sales(tmp_path, 3)
    _delete_journal_files(tmp_path)
    (tmp_path / SEQ_FILE).unlink()
    refused = new_journal(tmp_path)
    refused.used_before = True
    with pytest.raises(JournalError, match=r"both missing .* --new-journal"):
        await refused.open()
    await refused.close()
    assert not (tmp_path / "journal.db").exists()

    forced = new_journal(tmp_path)
    forced.used_before = True
    forced.new_journal = True
    async with running(forced):
        assert forced.replaced is not None
        assert forced.replaced["rule"] == "journal.missing"
        assert forced.replaced["details"]["possibly_lost"] is None
    # A first start (the runtime found no lock file) needs no flag.
    first = new_journal(tmp_path / "new")
    async with running(first):
        assert first.replaced is None
        assert first.last_seq == 0


def test_the_data_dir_lock_is_exclusive_and_marks_a_used_directory(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    first.acquire()
    assert not first.existed
    assert (tmp_path / "data" / LOCK_FILE).read_text().split("\n")[0] == str(os.getpid())
    assert not first.used
    second = DataDirLock(tmp_path / "data")
    with pytest.raises(
        DataDirBusyError, match=rf"another store-gateway is using .*data \(pid {os.getpid()}\)"
    ):
        second.acquire()
    first.release()
    second.acquire()
    assert second.existed
    second.release()


# --- corruption found at run time -------------------------------------------------------------------------


def _garble_page(db: Path, pageno: int) -> None:
    with open_journal_db(db) as conn:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    with db.open("r+b") as fh:
        fh.seek((pageno - 1) * page_size)
        fh.write(b"\xa5" * page_size)


def _middle_events_leaf(db: Path) -> int:
    with open_journal_db(db) as conn:
        leaves = [
            r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name='events' AND pagetype='leaf'")
        ]
    assert len(leaves) > 4
    return int(sorted(leaves)[len(leaves) // 2])


async def test_a_journal_damaged_while_running_is_salvaged_at_the_next_start(tmp_path: Path) -> None:
    """A leaf of the events table is garbage: the next start moves the file aside, copies every readable
    undelivered event (same seq, id and dedup key) and lists exactly the seqs it could not read."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(300):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    with open_journal_db(journal.path) as conn:
        before = {int(s): (i, k) for s, i, k in conn.execute("SELECT seq, id, dedup_key FROM events")}
    _garble_page(journal.path, _middle_events_leaf(journal.path))
    mark_damaged(journal.path, "database disk image is malformed")

    fresh = new_journal(tmp_path)
    async with running(fresh):
        alert = fresh.replaced
        assert alert is not None
        AlertRaised.model_validate(alert)
        assert alert["rule"] == "journal.corrupt"
        assert fresh.backlog == alert["details"]["salvaged"]
        # Redeliveries of salvaged sales are still recognised.
        assert fresh.submit(pos_draft("R1", [("SKU-1", "1")]))
    assert not (tmp_path / DAMAGE_MARK).exists()
    with open_journal_db(fresh.path) as conn:
        after = {
            int(s): (i, k)
            for s, i, k in conn.execute(
                "SELECT seq, id, dedup_key FROM events WHERE seq < ?", (fresh.seq_floor + 1,)
            )
        }
    unreadable = {s for a, b in alert["details"]["unreadable_seqs"] for s in range(a, b + 1)}
    assert unreadable, "a whole leaf of events was garbage"
    assert unreadable <= set(before)
    assert after == {s: v for s, v in before.items() if s not in unreadable}
    assert alert["details"]["salvaged"] == len(after)
    assert alert["details"]["possibly_lost"][0] == min(unreadable)
    assert fresh.last_seq > max(before)


async def test_the_integrity_check_finds_a_damaged_page_and_the_journal_stops_acknowledging(
    tmp_path: Path,
) -> None:
    journal = new_journal(tmp_path)
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    try:
        for n in range(300):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
        async with asyncio.timeout(20):
            await journal.flush()
        with open_journal_db(journal.path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _garble_page(journal.path, _middle_events_leaf(journal.path))
        journal.quick_check_interval_s = 0.01
        watch = asyncio.create_task(journal.watch_integrity(), name="journal-integrity-under-test")
        async with asyncio.timeout(20):
            await watch
        assert journal.corrupt is not None
        assert journal.stall is not None
        assert journal.stall[0] == "journal_corrupt"
        acked: list[bool] = []
        refused = not journal.submit(pos_draft("R-late", [("SKU-1", "1")], ack=lambda: acked.append(True)))
        assert refused, "a damaged journal takes nothing more (the driver does not acknowledge it)"
        with pytest.raises(JournalCorruptError):
            async with asyncio.timeout(20):
                await writer
        assert acked == [], "nothing is acknowledged once the journal is known damaged"
        assert read_damage_mark(journal.path) is not None
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, JournalCorruptError):
            await writer
        await journal.close()


def test_deleting_the_lock_file_does_not_let_a_second_gateway_in(tmp_path: Path) -> None:
    """The directory is locked too: a second lock, after someone deleted gateway.lock, is still refused."""
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        first.path.unlink()
        second = DataDirLock(tmp_path)
        with pytest.raises(DataDirBusyError, match="another store-gateway is using"):
            second.acquire()
    finally:
        first.release()
    third = DataDirLock(tmp_path)
    third.acquire()  # released: free again
    third.release()


async def test_a_crash_during_the_salvage_never_lets_seqs_start_again_at_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power lost while the salvage copies into the fresh journal (injected: the copy raises): the fresh file is
    sound but may hold nothing yet. The next start must still number above every seq the old journal used."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(300):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    old_last = journal.last_seq
    _garble_page(journal.path, _middle_events_leaf(journal.path))
    mark_damaged(journal.path, "database disk image is malformed")

    def power_cut(*_: object, **__: object) -> None:
        raise KeyboardInterrupt("power cut during the salvage")

    monkeypatch.setattr(journal_module.Journal, "_salvage_into", power_cut)
    with pytest.raises(KeyboardInterrupt):
        await new_journal(tmp_path).open()
    monkeypatch.undo()
    assert (tmp_path / DAMAGE_MARK).exists(), "the mark stays until the salvage has committed"
    again = new_journal(tmp_path)
    async with running(again):
        assert again.last_seq > old_last
        # The salvage resumed from the file moved aside by the first start (the fresh one was not moved too).
        assert len(_moved_aside(tmp_path)) == 1
        assert again.replaced is not None
        assert again.replaced["details"]["salvaged"] > 0
        assert again.submit(pos_draft("NEW", [("SKU-1", "1")]))
        await again.flush()
        assert again.last_seq > old_last + 1
    assert not (tmp_path / DAMAGE_MARK).exists()


async def test_a_start_on_a_full_disk_never_caps_the_journal_below_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk has no room left (statvfs says 0 bytes free, injected): the cap taken from the disk must not fall
    under what the journal already stores, or the budget would evict undelivered sales at every restart."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(2000):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    real = os.statvfs

    def no_room(path: object) -> os.statvfs_result:
        st = real(path)  # type: ignore[arg-type]
        return os.statvfs_result(
            (st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, 0, 0, 0, st.f_namemax)
        )

    monkeypatch.setattr(os, "statvfs", no_room)
    for _ in range(3):
        again = new_journal(tmp_path)
        async with running(again):
            await again.flush()
            assert again.max_bytes >= again._used_bytes()
        with contextlib.closing(sqlite3.connect(again.path)) as db:
            assert db.execute("SELECT count(*) FROM events WHERE kind='pos.sale'").fetchone() == (2000,)


# --- the reservation holds commits back; the lock file's records; stalls; damaged reads ---------------------


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (polling: the journal has no event for these conditions) until ``condition`` holds."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 - polled state, not an event
            await asyncio.sleep(0.02)


async def test_no_seq_is_committed_past_a_reservation_that_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sidecar cannot be written (its temporary file's name is taken by a directory, which no open for
    writing gets past, root included): commits go on inside the reservation already on disk, then intake waits
    unacknowledged, and resumes once the file can be written. The stall then ends only after RECOVERED_S of
    good commits, its length frozen meanwhile (a blip that healed never turns into a 503 later)."""
    monkeypatch.setattr(journal_health, "RECOVERED_S", 3600.0)
    journal = new_journal(tmp_path)
    journal._reservation = SeqReservation(tmp_path, block=10)
    blocker = tmp_path / (SEQ_FILE + ".tmp")
    acked: list[str] = []
    async with running(journal):
        assert journal.submit(pos_draft("R0", [("SKU-1", "1")], ack=lambda: acked.append("R0")))
        await journal.flush()
        reserved = SeqReservation(tmp_path).load()
        blocker.mkdir()
        for n in range(1, 40):
            journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")], ack=lambda n=n: acked.append(f"R{n}")))
        await _until(lambda: journal.stall is not None and journal.pending > 0)
        assert journal.last_seq <= reserved, "never a committed seq above the reservation on disk"
        assert journal.stall is not None
        assert journal.stall[0] == "journal_stalled"
        assert len(acked) < 40
        blocker.rmdir()
        await _until(lambda: len(acked) == 40)
        frozen = journal.stall
        assert frozen is not None
        await asyncio.sleep(0.05)
        assert journal.stall == frozen
        monkeypatch.setattr(journal_health, "RECOVERED_S", 0.0)
        assert journal.stall is None
    assert SeqReservation(tmp_path).load() >= journal.last_seq


def test_the_lock_file_tells_a_first_start_cut_short_from_a_used_directory(tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    lock.acquire()
    lock.release()  # stopped before any journal was opened
    again = DataDirLock(tmp_path)
    again.acquire()
    assert again.existed
    assert not again.used, "a first start cut short is still a first start"
    again.mark_used()
    again.note_damaged("database disk image\nis malformed", "0190abcd")
    again.release()
    third = DataDirLock(tmp_path)
    third.acquire()
    assert third.used
    assert third.damaged == ("0190abcd", "database disk image is malformed")
    third.clear_damaged()
    third.release()
    fourth = DataDirLock(tmp_path)
    fourth.acquire()
    assert fourth.used
    assert fourth.damaged is None
    fourth.release()
    # A lock file of an older release holds only a pid: that directory was used.
    (tmp_path / LOCK_FILE).write_text("12345\n")
    older = DataDirLock(tmp_path)
    older.acquire()
    assert older.used
    older.release()


async def test_damage_recorded_only_in_the_lock_file_replaces_the_journal(tmp_path: Path) -> None:
    """The disk did not take ``journal.damaged``; the lock file's record is enough for the next start."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(300):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    last = journal.last_seq
    _garble_page(journal.path, _middle_events_leaf(journal.path))
    assert read_damage_mark(journal.path) is None
    fresh = new_journal(tmp_path)
    fresh.damage_hint = ("0190abcd", "database disk image is malformed")
    async with running(fresh):
        assert fresh.replaced is not None
        assert fresh.replaced["rule"] == "journal.corrupt"
        assert fresh.last_seq > last
        assert fresh.submit(fresh.replaced_draft())
    # The lock file's record could not be cleared (a failing card): the journal that replaced the file knows the
    # record as handled, and is not moved aside in its turn.
    again = new_journal(tmp_path)
    again.damage_hint = ("0190abcd", "database disk image is malformed")
    async with running(again):
        assert again.replaced is None
        assert again.last_seq == fresh.last_seq
    assert len(_moved_aside(tmp_path)) == 1


def _moved_aside(directory: Path) -> list[str]:
    names = os.listdir(directory)
    return [p for p in names if p.startswith("journal.db.corrupt-") and p[-4:] not in ("-wal", "-shm")]


@pytest.mark.parametrize("cut", ["before_the_fresh_journal", "after_the_salvage_commit"])
async def test_a_replacement_cut_short_anywhere_is_finished_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """Power lost right after the damaged journal was moved aside (no fresh file yet), or after the salvage
    committed but before the damage records were cleared: the next start finishes that replacement (one file
    aside, its readable sales salvaged, its unreadable seqs in the one alert), never replaces the fresh one."""
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(300):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    _garble_page(journal.path, _middle_events_leaf(journal.path))
    mark_damaged(journal.path, "database disk image is malformed", "0190abcd")

    def power_cut(*_: object, **__: object) -> None:
        raise KeyboardInterrupt("power cut")

    target = "connect" if cut == "before_the_fresh_journal" else "clear_damage_mark"
    monkeypatch.setattr(journal_opening, target, power_cut)
    with pytest.raises(KeyboardInterrupt):
        await new_journal(tmp_path).open()
    monkeypatch.undo()
    again = new_journal(tmp_path)
    async with running(again):
        assert again.replaced is not None
        assert again.replaced["rule"] == "journal.corrupt"
        assert again.replaced["details"]["salvaged"] > 0
        assert again.replaced["details"]["unreadable_seqs"], "the alert names the seqs that could not be read"
        assert again.submit(again.replaced_draft())
    assert len(_moved_aside(tmp_path)) == 1
    assert read_damage_mark(again.path) is None
    once_more = new_journal(tmp_path)
    async with running(once_more):
        assert once_more.replaced is None


async def test_a_damaged_page_read_by_the_uplink_stops_the_journal(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        for n in range(300):
            assert journal.submit(pos_draft(f"R{n}", [("SKU-1", "1")]))
    with open_journal_db(journal.path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damaged = new_journal(tmp_path)
    await damaged.open()
    _garble_page(damaged.path, _middle_events_leaf(damaged.path))  # after the start-up probe
    try:
        with pytest.raises(sqlite3.DatabaseError):
            await damaged.read_class(CLASSES.index("transaction"), 0, 1000, 10**8)
        assert damaged.corrupt is not None
        assert damaged.stall is not None
        assert damaged.stall[0] == "journal_corrupt"
        assert read_damage_mark(damaged.path) is not None
    finally:
        await damaged.close()


async def test_a_commit_held_up_by_another_process_shows_as_a_stall(tmp_path: Path) -> None:
    """Another process holds the write lock (a technician's sqlite3 shell): the commit hangs, then fails, and
    the stall shows while items wait; it ends when the commit gets through."""
    journal = new_journal(tmp_path)
    async with running(journal):
        assert journal.submit(pos_draft("R0", [("SKU-1", "1")]))
        await journal.flush()
        other = sqlite3.connect(journal.path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            acked: list[bool] = []
            journal.submit(pos_draft("R1", [("SKU-1", "1")], ack=lambda: acked.append(True)))
            await _until(lambda: journal.stall is not None)
            assert journal.stall is not None
            assert journal.stall[0] == "journal_stalled"
            assert not acked
            other.execute("ROLLBACK")
        finally:
            other.close()
        await _until(lambda: bool(acked))
        await _until(lambda: journal.stall is None)
