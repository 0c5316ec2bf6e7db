"""Freshness windows: a webhook signed too long ago (or too far ahead) is refused, whatever its dedup key.

The dedup key makes a replay harmless only while the journal remembers it; the window makes a captured request
useless once it is older than the window, so the two together leave no gap as long as the window is shorter
than the journal's ``dedup_retention_days``. Only a time the sender signed counts:

- ``generic``: ``X-Webhook-Timestamp`` (Unix seconds), covered by the HMAC (drivers/http/signatures.py). A
  sender's retry is signed again with a new time, so the window can be short (300 s by default).
- ``square``: the event's ``created_at``, inside the signed body. Square resends a notification it could not
  deliver for up to 24 hours with the same body (developer.squareup.com/docs/webhooks/troubleshooting), so the
  window must cover that (25 h by default).
- ``lightspeed``: X-Series signs the body only, and the body has no delivery time (``sale_date`` is when the
  sale was made, and a later update of an old sale is genuine): no window; the dedup keys alone refuse replays.

Pure functions: the caller gives the time, and decides what an unsynchronised clock means (drivers/http/driver.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from drivers.errors import DecodeError
from drivers.http.config import Window
from drivers.http.mapped import parse_time, printable


def square_signed_at(body: bytes) -> float | None:
    """The Unix time of a Square event's ``created_at``; None when the body is not a JSON object (the mapper
    quarantines it); :class:`DecodeError` ``no_timestamp`` when the object has no readable ``created_at``."""
    try:
        event: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    created = event.get("created_at")
    if not isinstance(created, str) or not created:
        raise DecodeError("no_timestamp", "the event has no created_at")
    try:
        parsed = parse_time(created[:64])
    except DecodeError as err:
        raise DecodeError("no_timestamp", f"created_at: {err.detail}") from err
    assert parsed is not None  # parse_time returns None only for an empty string
    return datetime.fromisoformat(parsed).timestamp()


def check(signed_at: float, now: float, window: Window) -> None:
    """Returns when ``signed_at`` is inside ``window`` around ``now`` (Unix seconds); otherwise
    :class:`DecodeError` ``stale`` or ``ahead``."""
    age = now - signed_at
    if age > window.max_age_s:
        raise DecodeError(
            "stale",
            f"signed at {_iso(signed_at)}, {age:.0f} s before the gateway's clock; the window is"
            f" {window.max_age_s:.0f} s",
        )
    if -age > window.max_ahead_s:
        raise DecodeError(
            "ahead",
            f"signed at {_iso(signed_at)}, {-age:.0f} s after the gateway's clock; at most"
            f" {window.max_ahead_s:.0f} s ahead is accepted",
        )


def _iso(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return printable(repr(timestamp), 40)
