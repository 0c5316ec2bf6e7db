"""The journal's health: commits that fail (a stall /health reports, and when it ends), and damage found while
running (acknowledge nothing more, leave the mark, stop), including the background integrity check."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from gateway.kernel.events import uuid7
from gateway.kernel.journal.core import Core
from gateway.kernel.journal.recovery import mark_damaged, quick_check

_LOGGER = logging.getLogger("gateway.kernel.journal")  # one log name for the whole journal


QUICK_CHECK_S: Final = 600.0
"""How often a background ``PRAGMA quick_check`` looks for damaged pages before a commit trips on them."""
QUICK_CHECK_FIRST_S: Final = 30.0
"""The first background check runs this soon after start: a damaged page the start-up probe missed (and whose
damage mark could not be written) is found before the process has run long on it."""
STALL_S: Final = 10.0
"""A journal that has not been able to commit for this long makes /health say so (503)."""
RECOVERED_S: Final = 10.0
"""A stall ends after this long of commits without a failure (not at the first one that succeeds)."""


class Health(Core):
    """Failure and damage tracking (event loop only)."""

    def _setup(self) -> None:
        super()._setup()
        self.corrupt: str | None = None
        """Why the database was found damaged while running (then nothing more is committed or acknowledged)."""
        self.damage_id: str | None = None
        """Names the damage found while running (in ``journal.damaged`` and the lock file)."""
        self.quick_check_interval_s = QUICK_CHECK_S
        self._failing = False
        self._failing_since: float | None = None
        self._failure = "journal_stalled"
        self._ok_since: float | None = None
        """First intake commit that succeeded since the last failure: the stall ends RECOVERED_S after it."""
        self._waiting_since: float | None = None
        """Since when items have waited in the queue without a commit taking any (None: the queue is empty)."""
        self.beat = time.monotonic()
        """When the writer last finished a step: a commit (or a failed one), or a round of its loop (at least every
        second while it idles). A commit or a housekeeping step hung on a card that stopped answering stops it
        (the systemd watchdog reads it)."""

    def declare_corrupt(self, reason: str) -> None:
        """The database is damaged (a commit, a read or the integrity check said so): acknowledge nothing more,
        leave the mark for the next start, and wake the writer, which stops (the runtime exits, the supervisor
        restarts, the start-up path moves the file aside and salvages). Event loop only."""
        if self.corrupt is not None:
            return
        self.corrupt = reason
        self.damage_id = uuid7()
        self._failure = "journal_corrupt"
        self._note_failure()
        _LOGGER.critical(
            "journal %s is damaged (%s): stopping; the next start replaces it", self.path, reason
        )
        mark_damaged(self.path, reason, self.damage_id)
        self._wakeup.set()

    def _note_failure(self) -> None:
        now = time.monotonic()
        if self._failing_since is None or self._recovered(now):
            self._failing_since = now
        self._ok_since = None

    def _recovered(self, now: float) -> bool:
        return self.corrupt is None and self._ok_since is not None and now - self._ok_since >= RECOVERED_S

    @property
    def stall(self) -> tuple[str, float] | None:
        """(reason, seconds) while commits fail, or one has not returned for a second: ``journal_corrupt``,
        ``disk_full`` or ``journal_stalled``. A stall ends only after RECOVERED_S of commits without a failure:
        a disk that takes one small commit in three is still failing, and /health must not flap."""
        now = time.monotonic()
        if self._failing_since is not None and not self._recovered(now):
            # Frozen while commits work again: a short blip that healed never grows into a 503 later.
            until = now if self._ok_since is None else self._ok_since
            return self._failure, until - self._failing_since
        # Items waiting with no commit taking them: a commit hung in fsync, or the writer held up by anything else
        # (a checkpoint, an eviction step, a transaction) on a card that stopped answering.
        waiting = None if self._waiting_since is None else now - self._waiting_since - self._hold_allowance()
        if waiting is not None and waiting >= 1.0:
            return "journal_stalled", waiting
        return None

    def failing_now(self) -> tuple[str, float] | None:
        """(reason, seconds) while commits fail right now, or items have waited that long with no commit taking
        them; unlike :attr:`stall` (which /health keeps showing for RECOVERED_S), None as soon as commits work."""
        now = time.monotonic()
        if self.corrupt is not None:
            return "journal_corrupt", 0.0 if self._failing_since is None else now - self._failing_since
        if self._failing and self._failing_since is not None:
            return self._failure, now - self._failing_since
        waiting = None if self._waiting_since is None else now - self._waiting_since - self._hold_allowance()
        if waiting is not None and waiting >= 1.0:
            return "journal_stalled", waiting
        return None

    def _hold_allowance(self) -> float:
        """Seconds items may wait in the queue by design (the writer's telemetry commit window) before waiting
        counts as a stall."""
        return 0.0

    async def watch_integrity(self) -> None:
        """Every ``quick_check_interval_s``, run ``PRAGMA quick_check`` on its own read-only connection and
        thread: a damaged page deep in the file is found before a commit or the uplink trips on it."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-check")
        try:
            wait = min(QUICK_CHECK_FIRST_S, self.quick_check_interval_s)
            while self.corrupt is None:
                await asyncio.sleep(wait)
                wait = self.quick_check_interval_s
                try:
                    problem = await loop.run_in_executor(pool, quick_check, self.path)
                except (sqlite3.Error, OSError) as err:
                    _LOGGER.warning("journal integrity check could not run: %s", err)
                    continue
                if problem is not None:
                    self.declare_corrupt(f"quick_check: {problem}")
        finally:
            # Never wait here for a check still running (it may take minutes on a large journal): the event
            # loop would stall with it. The thread ends with its check; its read-only connection is its own.
            pool.shutdown(wait=False)
