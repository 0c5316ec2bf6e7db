"""Replays outlive their events: dedup keys (receipts, signed webhooks, HQ command ids) are remembered in the
journal's own ``idempotency`` table for ``journal.dedup_retention_days``, whatever TTL or the disk budget removed,
on real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from gateway.kernel.config import JournalConfig
from tests.gateway.test_journal import new_journal, running
from tests.harness.pos_drafts import pos_draft


def _sales(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [r[0] for r in db.execute("SELECT dedup_key FROM events WHERE kind = 'pos.sale' ORDER BY seq")]


def _remove_events(path: Path) -> None:
    """What TTL or the disk budget does to old events (their rows go; nothing else of the journal changes)."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM events WHERE kind = 'pos.sale'")
        db.commit()


async def test_a_replay_after_its_event_expired_is_still_a_duplicate(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        assert journal.submit(pos_draft("R1", [("SKU-1", "1")]))
    first = _sales(journal.path)
    assert len(first) == 1
    _remove_events(journal.path)
    again = new_journal(tmp_path)
    async with running(again):
        assert again.submit(pos_draft("R1", [("SKU-1", "1")]))
        assert again.submit(pos_draft("R2", [("SKU-1", "1")]))
        await again.flush()
        loop_seq = await again.query("SELECT seq FROM idempotency WHERE key = ?", (first[0],))
    assert len(_sales(again.path)) == 1, "R1 was taken a second time after its event was gone"
    assert loop_seq


async def test_keys_are_forgotten_after_the_retention_unless_a_clock_far_behind_stamped_them(
    tmp_path: Path,
) -> None:
    """The retention is the promise, whether the key's event is still stored or not (a journal made before the
    events lost their UNIQUE dedup_key keeps such keys: tests/gateway/test_sd_wear.py)."""
    journal = new_journal(tmp_path, config=JournalConfig(dedup_retention_days=1))
    async with running(journal):
        assert journal.submit(pos_draft("R1", [("SKU-1", "1")]))
        assert journal.submit(pos_draft("R2", [("SKU-1", "1")]))
        assert journal.submit(pos_draft("R3", [("SKU-1", "1")]))
    keys = _sales(journal.path)
    with closing(sqlite3.connect(journal.path)) as db:
        db.execute("UPDATE idempotency SET expires_at = ?", (time.time() - 1,))
        # Stamped by a clock near 1970 (a box without a real-time clock, before NTP): not trusted to be old.
        db.execute("UPDATE idempotency SET expires_at = 86400 WHERE key = ?", (keys[2],))
        db.execute("DELETE FROM events WHERE dedup_key IN (?, ?)", (keys[0], keys[2]))
        db.commit()
    again = new_journal(tmp_path, config=JournalConfig(dedup_retention_days=1))
    async with running(again):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(again._writer, again._expire_idempotency)
        left = await again.query("SELECT key, expires_at FROM idempotency ORDER BY key")
    assert [k for k, _ in left] == [keys[2]], "expired keys go, their events stored or not"
    assert all(expires > time.time() for _, expires in left), "the 1970 one is kept for another period"


async def test_a_journal_from_before_the_table_keeps_its_keys(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        assert journal.submit(pos_draft("R1", [("SKU-1", "1")]))
    with closing(sqlite3.connect(journal.path)) as db:
        db.execute("DROP TABLE idempotency")
        db.execute("DELETE FROM meta WHERE key = 'idempotency'")
        db.commit()
    again = new_journal(tmp_path)
    async with running(again):
        assert again.submit(pos_draft("R1", [("SKU-1", "1")]))
        await again.flush()
    assert len(_sales(again.path)) == 1


async def test_deleted_rows_are_overwritten(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    async with running(journal):
        assert journal._conn is not None
        assert journal._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
