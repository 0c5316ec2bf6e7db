"""``--uptime SECONDS``: run the tests as if the machine had booted that long ago.

``time.monotonic()`` counts from boot on Linux, so a test (or the code) that assumes a clock value passes on a
machine that has been up for hours and fails minutes after boot. With ``--uptime 30`` the monotonic clock of
this pytest process (``time.monotonic``, ``time.monotonic_ns`` and with them every asyncio loop's ``time()``)
reads 30 s at start and runs at its real rate; ``--uptime 100000000`` shifts it forward instead. CI runs the
tests marked ``clock`` this way at small uptimes, so an assumption about the clock's value cannot come back.

Loaded with ``-p tests.harness.uptime`` (pyproject's addopts), before any conftest or project module is imported:
modules that bind the clock at import time (``clock=time.monotonic`` defaults) take the shifted one.
Subprocesses (a gateway under SIGKILL tests) keep the real clock.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

_real_monotonic_ns = time.monotonic_ns
shifted_at_ns: int | None = None
"""The real monotonic clock when ``--uptime`` shifted it (None: not shifted)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--uptime",
        type=float,
        default=None,
        metavar="SECONDS",
        help="shift this process's monotonic clock so it reads SECONDS at start (simulates a fresh boot)",
    )


class _Shifted:
    """The real monotonic clock minus an offset, in ns or in seconds. An instance, not a function: code that
    keeps ``time.monotonic`` as a class attribute (pyserial's transport does) must not get it bound as a
    method."""

    def __init__(self, offset_ns: int, in_ns: bool) -> None:
        self._offset_ns = offset_ns
        self._in_ns = in_ns

    def __call__(self) -> float:
        elapsed = _real_monotonic_ns() - self._offset_ns
        return elapsed if self._in_ns else elapsed / 1e9


def shift_monotonic(uptime_s: float) -> None:
    """From now on, time.monotonic() and time.monotonic_ns() read ``uptime_s`` plus the time elapsed since."""
    if uptime_s < 0:
        raise pytest.UsageError("--uptime must be 0 or more")
    global shifted_at_ns
    shifted_at_ns = _real_monotonic_ns()
    offset_ns = shifted_at_ns - int(uptime_s * 1e9)
    time.monotonic_ns = _Shifted(offset_ns, in_ns=True)  # type: ignore[assignment]
    time.monotonic = _Shifted(offset_ns, in_ns=False)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: Any) -> None:
    uptime = early_config.known_args_namespace.uptime
    if uptime is not None:
        shift_monotonic(uptime)


def pytest_report_header(config: pytest.Config) -> str | None:
    uptime = config.getoption("uptime")
    if uptime is None:
        return None
    return (
        f"monotonic clock shifted: uptime {uptime:g} s at start (time.monotonic() = {time.monotonic():.1f})"
    )
