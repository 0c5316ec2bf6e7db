"""Wall-clock trust: a Raspberry Pi has no real-time clock, so until NTP syncs, wall time may be years off.

``clock_synced()`` asks the kernel (adjtimex, read-only) whether the clock is synchronised, the same flag
``timedatectl`` shows as "System clock synchronized". Every event carries the answer, the boot id and a
monotonic timestamp, so HQ can re-place events recorded before the sync (see docs/EVENTS.md).
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
import uuid
from typing import Any, Final

BOOT_ID: Final = uuid.uuid4().hex[:16]
"""Random per process start: groups the events of one run, whose mono_ns values are comparable."""

_TIME_ERROR: Final = 5
_STA_UNSYNC: Final = 0x0040


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux, 64-bit): the fields we read come first; the tail is padding.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


@functools.cache
def _adjtimex() -> Any:
    """libc's adjtimex(2), looked up once in the symbols this process already has loaded (no search of the
    library path, which forks ``ldconfig -p``); None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None


def _kernel_says_synced() -> bool | None:
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    try:
        timex = _Timex()
        state = adjtimex(ctypes.byref(timex))
    except OSError:
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not timex.status & _STA_UNSYNC


def _systemd_says_synced() -> bool:
    """systemd-timesyncd touches this file once the clock is synchronised (readable inside any sandbox)."""
    return os.path.exists("/run/systemd/timesync/synchronized")


class ClockState:
    """Caches the kernel's answer; re-asks at most every ``refresh_s`` seconds."""

    def __init__(self, refresh_s: float = 10.0, override: bool | None = None) -> None:
        self._refresh_s = refresh_s
        self._override = override
        self._checked_at = -refresh_s
        self._synced = False

    def synced(self) -> bool:
        if self._override is not None:
            return self._override
        now = time.monotonic()
        if now - self._checked_at >= self._refresh_s:
            answer = _kernel_says_synced()
            # Cannot tell (not Linux, a seccomp filter): say "not synced". A wrong "false" costs HQ a correction;
            # a wrong "true" would hide exactly the power-cut case the flag exists for.
            self._synced = bool(answer) or _systemd_says_synced()
            self._checked_at = now
        return self._synced
