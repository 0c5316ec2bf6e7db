"""Logging setup: plain or JSON lines on stderr, with registered secret values masked as a last line of defence.

Secrets are never passed to log calls on purpose; the mask catches accidents (an exception text that quotes a
URL with a password, for example).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Final

import orjson

_SECRETS: set[str] = set()
MASK: Final = "***"


def register_secret(value: str | None) -> None:
    """Mask this value wherever it would appear in a log line (values under 4 characters are ignored)."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def _mask(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _mask(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        # Mask before encoding: JSON escapes quotes and backslashes, and an escaped secret would not match.
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _mask(record.getMessage()),
        }
        if record.exc_info:
            doc["exception"] = _mask(self.formatException(record.exc_info))
        return orjson.dumps(doc).decode()


def setup_logging(level: str = "INFO", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx and httpcore log every request's URL at INFO: a chat robot's URL is its token.
    for noisy in ("amqtt", "transitions", "uvicorn.error", "passlib", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
