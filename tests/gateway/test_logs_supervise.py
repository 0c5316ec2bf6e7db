"""Logging (plain/JSON, secret masking) and supervision (backoff with full jitter, log once then quiet)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random

import pytest

from gateway.kernel.logs import JsonFormatter, PlainFormatter, register_secret, setup_logging
from gateway.kernel.supervise import Backoff, QuietLog, reconnect_forever


def _render(formatter: logging.Formatter, msg: str, *args: object) -> str:
    record = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, msg, args, None)
    return formatter.format(record)


def test_json_lines_carry_time_level_logger_message() -> None:
    doc = json.loads(_render(JsonFormatter(), "hello %s", "store"))
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "gateway.test"
    assert doc["message"] == "hello store"
    assert doc["time"].endswith("+00:00")


def test_registered_secrets_never_reach_a_log_line() -> None:
    register_secret("s3cret-password-value")
    register_secret("abc")  # too short to mask safely: ignored
    for formatter in (PlainFormatter(), JsonFormatter()):
        line = _render(formatter, "connect failed: mqtt://user:%s@hq", "s3cret-password-value")
        assert "s3cret-password-value" not in line
        assert "***" in line


def test_setup_logging_installs_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        setup_logging("INFO", "json")
        assert len(root.handlers) == 1
        logging.getLogger("gateway.x").info("ready")
        assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["message"] == "ready"
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    ceilings = [min(30.0, 0.5 * 2**n) for n in range(12)]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[8:]) > 1.0  # it really grows
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_quiet_log_warns_once_per_outage() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("gateway.quiet-test")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    quiet = QuietLog(logger, "HQ broker")
    for _ in range(5):
        quiet.failed("refused")
    quiet.recovered()
    quiet.failed("refused again")
    lines = stream.getvalue().splitlines()
    assert sum("unavailable: refused (retrying quietly)" in line for line in lines) == 1
    assert sum("still unavailable" in line for line in lines) == 4
    assert sum("is back" in line for line in lines) == 1
    assert "unavailable: refused again" in lines[-1]


async def test_reconnect_forever_retries_and_resets_after_success() -> None:
    attempts: list[str] = []

    async def session(up: object) -> str:
        attempts.append("try")
        if len(attempts) < 3:
            raise OSError("connection refused")
        assert callable(up)
        up()
        if len(attempts) == 3:
            return "closed by peer"
        await asyncio.sleep(3600)
        return "never"

    task = asyncio.create_task(
        reconnect_forever("peer", session, logging.getLogger("t"), (OSError,), Backoff(base=0.001, cap=0.01))
    )
    for _ in range(200):
        if len(attempts) >= 4:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(attempts) == 4
