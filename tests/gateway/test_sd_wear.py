"""What the journal writes, and when (docs/OUTBOX.md, "Durability by class"), on real SQLite files: telemetry
waits for the commit window and a sale does not; HQ's acknowledgements and consumers' cursors ride other commits;
the outbox counters are recounted at open; a new journal's lean layout, and an older journal still works."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

from gateway.config_loader import ConfigError, load_config
from gateway.kernel.config import ClassBudget, JournalConfig, OutboxConfig
from gateway.kernel.journal import Committed, Draft, Journal
from gateway.kernel.journal import writer as writer_module
from gateway.kernel.journal.reader import _RECEIPT_EVENTS
from gateway.kernel.journal.store import PAGE_SIZE, state_as_stored
from gateway.kernel.outbox import TELEMETRY, TRANSACTION, of_class
from rules.report import _DAY_EVENTS
from tests.gateway.test_journal import flushed, query, running, until
from tests.gateway.test_outbox import check_counters, outbox_journal

HOUR_MS = 3_600_000


def held(**more: int) -> JournalConfig:
    """A config whose telemetry window is an hour (past the config's limit: a test's way to see what waits)."""
    return JournalConfig(**more).model_copy(update={"telemetry_commit_window_ms": HOUR_MS})


def written_watermark(journal: Journal) -> list[tuple[int]]:
    """The transaction class's delivered watermark as written on disk."""
    return query(journal, "SELECT delivered_seq FROM outbox_state WHERE cls=?", (TRANSACTION,))


async def one_sale_committed(journal: Journal, acked: list[str]) -> None:
    assert journal.submit(sale(1, acked))
    await until(lambda: acked == ["sale 1"], "the sale committed")


def reading(i: int, acked: list[str]) -> Draft:
    body = orjson.dumps({"metric": "temperature", "value": 4.0 + i / 10, "unit": "C"})
    return Draft("sensor.reading", f"probe-{i}", body, ack=lambda: acked.append(f"reading {i}"))


def sale(i: int, acked: list[str]) -> Draft:
    body = orjson.dumps({"receipt_no": f"r-{i}", "total": 1.5})
    return Draft(
        "pos.sale", "till-01", body, dedup_key=f"till-01:r-{i}", ack=lambda: acked.append(f"sale {i}")
    )


async def test_telemetry_waits_for_the_window_and_a_sale_takes_it_along(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path, config=held())
    commits: list[Committed] = []
    journal.add_listener(commits.append)
    acked: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running(journal))
        assert journal.submit(reading(1, acked))
        assert journal.submit(reading(2, acked))
        await asyncio.sleep(0.2)  # the window is an hour: nothing may be committed, however slow this machine
        assert acked == []
        assert query(journal, "SELECT COUNT(*) FROM events WHERE cls=?", (TELEMETRY,)) == [(0,)]
        assert journal.submit(sale(1, acked))
        await until(lambda: len(acked) == 3, "the sale and the readings acknowledged")
        # One commit: the sale did not wait, and the readings went with it; each acknowledged after it.
        assert sorted(acked) == ["reading 1", "reading 2", "sale 1"]
        intake = [c for c in commits if "pos.sale" in c.kinds]
        assert len(intake) == 1
        assert intake[0].kinds == {"sensor.reading": 2, "pos.sale": 1}
        assert query(journal, "SELECT kind FROM events ORDER BY seq") == [
            ("sensor.reading",),
            ("sensor.reading",),
            ("pos.sale",),
        ]


async def test_telemetry_commits_when_its_window_ends(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path, config=JournalConfig(telemetry_commit_window_ms=50))
    acked: list[str] = []
    async with running(journal):
        assert journal.submit(reading(1, acked))
        await until(lambda: acked == ["reading 1"], "the reading committed by the end of its window")
        assert query(journal, "SELECT COUNT(*) FROM events") == [(1,)]


async def test_a_full_batch_of_telemetry_does_not_wait(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path, config=held(commit_max_events=5))
    acked: list[str] = []
    async with running(journal):
        for i in range(5):
            assert journal.submit(reading(i, acked))
        await until(lambda: len(acked) == 5, "a full batch committed at once")


async def test_flush_and_stop_commit_what_waits(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path, config=held())
    acked: list[str] = []
    async with running(journal):
        assert journal.submit(reading(1, acked))
        await flushed(journal)
        assert acked == ["reading 1"]
        assert journal.submit(reading(2, acked))
    # running() flushed, stopped and closed the journal: nothing waited for the hour.
    assert acked == ["reading 1", "reading 2"]


async def test_acknowledgements_wait_to_be_written_until_due_or_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "ACK_HOLD_S", 3600.0)
    journal = outbox_journal(tmp_path, config=held())
    acked: list[str] = []
    async with running(journal):
        assert journal.submit(sale(1, acked))
        assert journal.submit(sale(2, acked))
        await until(lambda: len(acked) == 2, "the sales committed")
        persisted = journal.ack_generation[1]
        journal.note_delivered(TRANSACTION, 1)
        assert journal.submit(sale(3, acked))  # a commit goes by: the watermark is not due yet
        await until(lambda: len(acked) == 3, "the third sale committed")
        await asyncio.sleep(0.2)  # held for an hour: not written, however slow this machine
        assert journal.ack_generation[1] == persisted
        assert written_watermark(journal) == [(0,)]
        journal.note_delivered(TRANSACTION, 2)
        journal.hurry_acks()  # the uplink's window is half held by them
        await until(lambda: journal.acks_persisted, "the watermarks written when the uplink asked")
        assert written_watermark(journal) == [(2,)]


async def test_acknowledgements_ride_the_first_commit_once_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "ACK_HOLD_S", 0.0)
    journal = outbox_journal(tmp_path, config=held())
    acked: list[str] = []
    async with running(journal):
        await one_sale_committed(journal, acked)
        journal.note_delivered(TRANSACTION, 1)
        await until(lambda: journal.acks_persisted, "the watermark written in a commit of its own")
        assert written_watermark(journal) == [(1,)]


async def test_cursors_ride_a_commit_only_once_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "CURSOR_FLUSH_S", 3600.0)
    journal = outbox_journal(tmp_path)
    acked: list[str] = []
    async with running(journal):
        await journal.save_cursor("notifier", 1)
        assert journal.submit(sale(1, acked))
        await until(lambda: acked == ["sale 1"], "the sale committed")
        assert query(journal, "SELECT value FROM meta WHERE key = 'cursor:notifier'") == []
        assert journal.pending_cursor("notifier") == 1
    # A stop writes it.
    assert query(journal, "SELECT value FROM meta WHERE key = 'cursor:notifier'") == [("1",)]


async def test_counters_are_recounted_from_what_was_stored_after_they_were_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits that only add events do not rewrite ``outbox_state``; a crash then loses nothing of the counters:
    the next open adds the events above ``through_seq``."""
    monkeypatch.setattr(writer_module, "STATE_SAVE_S", 3600.0)
    journal = outbox_journal(tmp_path, config=JournalConfig(telemetry_commit_window_ms=0))
    acked: list[str] = []
    crashed = tmp_path / "crashed"
    async with running(journal):
        for i in range(20):
            assert journal.submit(sale(i, acked) if i % 2 else reading(i, acked))
            await until(lambda n=i: len(acked) == n + 1, "committed one by one")
        journal.note_delivered(TRANSACTION, 4)
        journal.hurry_acks()
        await until(lambda: journal.acks_persisted, "the watermark written")
        for i in range(20, 30):
            assert journal.submit(sale(i, acked))
        await until(lambda: len(acked) == 30, "all committed")
        written = query(journal, "SELECT through_seq FROM outbox_state")
        assert max(t for (t,) in written) < journal.last_seq  # written before the last ten: behind
        in_memory = dict(journal.state)
        # What a power cut leaves: the file and its WAL as they are, the process gone.
        crashed.mkdir()
        for name in ("journal.db", "journal.db-wal"):
            shutil.copy(tmp_path / name, crashed / name)
    with contextlib.closing(sqlite3.connect(crashed / "journal.db")) as conn:
        assert state_as_stored(conn) == in_memory
    reopened = outbox_journal(crashed)
    async with running(reopened):
        assert reopened.state == in_memory
        check_counters(reopened)


async def test_a_new_journal_has_the_lean_layout(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path)
    async with running(journal):
        conn = journal._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        pragma = await loop.run_in_executor(journal._writer, conn.execute, "PRAGMA wal_autocheckpoint")
        assert pragma.fetchone()[0] == 4096  # 4 MiB of 1 KiB pages
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 1024
        indexes = {row[1]: row for row in conn.execute("PRAGMA index_list(events)")}
        assert set(indexes) == {"events_kind", "events_cls"}  # no autoindex on id or dedup_key
        assert indexes["events_kind"][4] == 1  # partial: telemetry is not in it
        plans = {
            "receipts": _RECEIPT_EVENTS.format(test="1") % (),
            "day": _DAY_EVENTS,
            "alerts": "SELECT body FROM events WHERE kind = 'alert.raised' AND cls < 3 ORDER BY seq DESC LIMIT 1",
        }
        params = {"receipts": (5,), "day": ("pos.sale", 1, 9, "", "~"), "alerts": ()}
        for name, sql in plans.items():
            plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params[name]))
            assert "events_kind" in plan, (name, plan)


async def test_a_journal_made_before_keeps_working(tmp_path: Path) -> None:
    """A journal with 4 KiB pages and UNIQUE indexes on id and dedup_key: duplicates are still dropped, the
    counters come from its older outbox_state, and a key whose event is stored is kept past its expiry."""
    path = tmp_path / "journal.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE events(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, device_id TEXT,
                recorded_at TEXT NOT NULL, dedup_key TEXT UNIQUE, body BLOB NOT NULL, cls INTEGER NOT NULL DEFAULT 1);
            CREATE INDEX events_kind ON events(kind, seq);
            CREATE TABLE outbox_state(cls INTEGER PRIMARY KEY, delivered_seq INTEGER NOT NULL,
                stored_events INTEGER NOT NULL, stored_bytes INTEGER NOT NULL, pending_events INTEGER NOT NULL,
                evicted_events INTEGER NOT NULL);
            """
        )
    journal = outbox_journal(tmp_path, config=JournalConfig(telemetry_commit_window_ms=0))
    acked: list[str] = []
    async with running(journal):
        assert journal.key_unique
        assert journal.submit(sale(1, acked))
        assert journal.submit(sale(2, acked))
        await until(lambda: len(acked) == 2, "committed")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    again = outbox_journal(tmp_path, config=JournalConfig(telemetry_commit_window_ms=0))
    async with running(again):
        assert again.state[TRANSACTION].stored_events == 2
        assert again.submit(sale(1, acked))
        assert again.submit(sale(3, acked))
        await until(lambda: len(acked) == 4, "committed")
        assert await again.seq_of_dedup_key("till-01:r-1") == 1
        check_counters(again)
        # Its UNIQUE index would refuse a replay whose key was forgotten: a key whose event is stored stays.
        await again.query("SELECT 1")  # the reader is up
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("UPDATE idempotency SET expires_at = ?", (time.time() - 1,))
            conn.commit()
        await asyncio.get_running_loop().run_in_executor(again._writer, again._expire_idempotency)
        assert len(await again.query("SELECT key FROM idempotency")) == 3
    assert query(again, "SELECT COUNT(*) FROM events WHERE kind = 'pos.sale'") == [(3,)]


def test_config_refuses_to_make_a_read_back_kind_telemetry(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        "gateway_id: gw-1\nstore: {id: hk-0042, name: Test, timezone: Asia/Hong_Kong}\n"
        f"data_dir: {tmp_path / 'data'}\nstore_broker: {{host: 127.0.0.1}}\nhq: {{host: 127.0.0.1}}\n"
        "outbox:\n  kinds:\n    pos.sale: telemetry\n    sensor.reading: state\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "pos.sale cannot be telemetry" in str(err.value)
    assert OutboxConfig(kinds={"sensor.reading": "state"}).kinds == {"sensor.reading": "state"}


async def test_the_uplink_gets_its_watermarks_while_telemetry_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "ACK_HOLD_S", 3600.0)
    journal = outbox_journal(tmp_path, config=held())
    acked: list[str] = []
    async with running(journal):
        await one_sale_committed(journal, acked)
        assert journal.submit(reading(1, acked))  # held for an hour
        journal.note_delivered(TRANSACTION, 1)
        journal.hurry_acks()
        await until(lambda: journal.acks_persisted, "the watermark written at once, the reading with it")
        assert "reading 1" in acked


async def test_waiting_for_the_window_is_not_a_stall(tmp_path: Path) -> None:
    journal = outbox_journal(tmp_path, config=held())
    acked: list[str] = []
    async with running(journal):
        assert journal.submit(reading(1, acked))
        await asyncio.sleep(1.5)  # longer than a stall takes to show; the window is an hour
        assert acked == []
        assert journal.stall is None
        assert journal.failing_now() is None


async def test_telemetry_is_found_from_its_floor_without_an_index(tmp_path: Path) -> None:
    """Telemetry is in neither the kind nor the class index: the class budget evicts its oldest readings from the
    class's floor, which moves past them, is written with the counters and read back at the next open. No
    reading is ever below it."""
    cap = 64 * 1024
    outbox = OutboxConfig(min_free_bytes=0, classes={"telemetry": ClassBudget(max_bytes=cap)})
    journal = outbox_journal(tmp_path, outbox, config=JournalConfig(telemetry_commit_window_ms=0))
    acked: list[str] = []
    async with running(journal):
        for i in range(600):
            assert journal.submit(reading(i, acked))
            if i % 7 == 0:
                assert journal.submit(sale(i, acked))
        await until(lambda: len(acked) == 600 + 86, "all committed")
        await until(lambda: journal.state[TELEMETRY].stored_bytes <= cap, "telemetry back within its budget")
        await flushed(journal)
        floor = journal.state[TELEMETRY].floor_seq
        assert floor > 1
        (lowest,) = query(journal, "SELECT MIN(seq) FROM events WHERE cls=?", (TELEMETRY,))[0]
        assert floor <= lowest
        assert query(journal, "SELECT COUNT(*) FROM events WHERE cls=? AND seq<?", (TELEMETRY, floor)) == [
            (0,)
        ]
        plan = query(
            journal, f"EXPLAIN QUERY PLAN SELECT seq FROM events WHERE {of_class(TRANSACTION)} AND seq>0"
        )
        assert "events_cls" in str(plan)
    again = outbox_journal(tmp_path, outbox)
    async with running(again):
        assert again.state[TELEMETRY].floor_seq == floor
        check_counters(again)
    with contextlib.closing(sqlite3.connect(journal.path)) as conn:
        assert {row[1]: row[4] for row in conn.execute("PRAGMA index_list(events)")}["events_cls"] == 1
