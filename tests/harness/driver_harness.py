"""What the driver tests share: a real SQLite journal with its writer running, and reads of what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.kernel.clock import ClockState
from gateway.kernel.config import JournalConfig
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics


@contextlib.asynccontextmanager
async def running_journal(db: Path, metrics: Metrics) -> AsyncIterator[Journal]:
    """A journal at ``db`` with its writer task; on the way out: flush (bounded), stop the writer, close."""
    journal = Journal(db, "hk-0042", "gw-1", JournalConfig(), metrics, (), ClockState(override=True))
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    try:
        yield journal
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await journal.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()
