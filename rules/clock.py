"""The rules' clock: seconds that run with the monotonic clock and carry on across restarts.

Durations ("above 8 °C for 10 minutes") are measured on it, never on the wall clock, so a wall-clock step at
NTP sync does not throw a timer. Across a restart it carries on where it was, plus the time the gateway was away.
On the same boot of the machine (the gateway restarted, the box did not) that is the monotonic clock's time since
the last reading of the rules' clock was saved, exact and needing no NTP. After a reboot it is the wall-clock
time since then, when the wall clock was synchronised when it was saved (a reading saved while it was not carries
the last synchronised one forward). A box that starts before its clock synchronises (no real-time clock, after a
power cut) counts the time away when the clock first syncs; until then the timers that were waiting wait on:
late, never early.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS rule_clock(id INTEGER PRIMARY KEY CHECK (id = 1), at REAL, wall REAL, mono REAL,"
    " boot TEXT)"
)
BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")


def kernel_boot_id() -> str | None:
    """The Linux kernel's id of this boot: the same while the machine runs, whatever the gateway does."""
    try:
        return BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


SAVE_EVERY_S: Final = 60.0
"""While timers wait, the clock is saved at least this often (so that an unsynchronised restart loses less)."""


class RuleClock:
    """``now()``: the rules' time, in seconds. ``synced``: whether the wall clock can be trusted now."""

    def __init__(
        self,
        synced: Callable[[], bool],
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        boot: Callable[[], str | None] = kernel_boot_id,
    ) -> None:
        self._boot = boot
        self._synced = synced
        self._monotonic = monotonic
        self._wall = wall
        self._base = 0.0
        self._mono0 = monotonic()
        self._saved_at: float | None = None
        self._trusted: tuple[float, float] | None = None
        """A saved (rules' time, wall time) pair waiting for the wall clock to sync, to count the time away."""
        self._carry: tuple[float, float] | None = None
        """A (rules' time, wall time) pair the saved readings carry forward while the wall clock is not synced,
        so that a reboot before it syncs can still count the time away."""
        self.away = 0.0
        """The time away counted at the last start (or at the sync after it)."""

    def synced(self) -> bool:
        return self._synced()

    def now(self) -> float:
        if self._trusted is not None and self._synced():
            at, wall = self._trusted
            self._trusted = None
            expected = wall + (self._base + (self._monotonic() - self._mono0) - at)  # had it never been away
            self.away = max(0.0, self._wall() - expected)
            self._base += self.away
        return self._base + (self._monotonic() - self._mono0)

    def load(self, conn: sqlite3.Connection) -> float:
        """Carry on from the saved reading (at start): returns how long the gateway was away, as counted."""
        conn.execute(SCHEMA)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(rule_clock)")}
        for name, kind in (("mono", "REAL"), ("boot", "TEXT")):
            if name not in columns:
                conn.execute(f"ALTER TABLE rule_clock ADD COLUMN {name} {kind}")
        row = conn.execute("SELECT at, wall, mono, boot FROM rule_clock WHERE id = 1").fetchone()
        self.away = 0.0
        if row is not None:
            at, wall, mono, boot = float(row[0]), row[1], row[2], row[3]
            self._base = at
            self._mono0 = self._monotonic()
            if mono is not None and boot is not None and boot == self._boot():
                self.away = max(
                    0.0, self._mono0 - float(mono)
                )  # the machine ran on: its monotonic clock says
                self._base += self.away
                if wall is not None and not self._synced():
                    self._carry = (self._base, float(wall) + self.away)
            elif wall is not None and self._synced():
                self.away = max(0.0, self._wall() - float(wall))
                self._base += self.away
            elif wall is not None:
                self._trusted = self._carry = (at, float(wall))
        return self.away

    def save(self, conn: sqlite3.Connection, force: bool = False) -> None:
        """Save the reading (inside the caller's transaction); at most every SAVE_EVERY_S unless ``force``."""
        now = self.now()
        if not force and self._saved_at is not None and now - self._saved_at < SAVE_EVERY_S:
            return
        if self._synced():
            wall: float | None = self._wall()
        elif self._carry is not None:  # not synced yet: carry the last trusted reading forward
            wall = self._carry[1] + (now - self._carry[0])
        else:
            wall = None
        conn.execute(
            "INSERT OR REPLACE INTO rule_clock(id, at, wall, mono, boot) VALUES (1, ?, ?, ?, ?)",
            (now, wall, self._monotonic(), self._boot()),
        )
        self._saved_at = now
