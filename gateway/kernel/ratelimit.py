"""The gateway's one token bucket: per-device message limits and the drain rate limit to HQ both use it.
(And a sliding window, for chat robots that count their calls per minute.)

A bucket holds at most ``burst`` tokens and gains ``rate`` per second; it starts full. Time is given by the
caller (``now``, seconds on a monotonic clock): each user already has its clock (the device registry's,
which tests replace; ``time.monotonic`` for the uplink), and one reading serves several buckets.

Two ways to spend, for two kinds of limit:

- :meth:`TokenBucket.take` is all or nothing: a message that finds no token is refused (a device over its
  rate: the message is dropped and counted);
- :meth:`TokenBucket.spend` always succeeds and may overdraw: the caller sends now and waits the debt out
  before the next send (:meth:`TokenBucket.delay`), so a batch bigger than the burst still goes, and the
  average stays at ``rate``.

A ``rate`` of 0 means unlimited: every take succeeds and the delay is always 0.
"""

from __future__ import annotations

from collections import deque


class TokenBucket:
    """A token bucket on the caller's monotonic clock: ``rate`` tokens per second, at most ``burst`` saved up
    (it starts full)."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> float:
        # max(): a clock that went back (a caller switching clocks) refills nothing rather than draining.
        tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        return tokens

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are that many (True); otherwise take none (False)."""
        if not self._rate:
            return True
        tokens = self._refill(now)
        if tokens >= n:
            self._tokens = tokens - n
            return True
        self._tokens = tokens
        return False

    def spend(self, now: float, n: float) -> None:
        """Take ``n`` tokens, going into debt if there are fewer; :meth:`delay` says how long the debt lasts."""
        if self._rate:
            self._tokens = self._refill(now) - n

    def delay(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0: spend now)."""
        if not self._rate:
            return 0.0
        self._tokens = tokens = self._refill(now)
        return -tokens / self._rate if tokens < 0 else 0.0


class SlidingWindow:
    """At most ``limit`` uses in any ``window_s`` seconds: for a service that counts its own calls that way (a
    chat robot's "20 messages a minute"), where a bucket's burst on top of its rate would overrun it."""

    __slots__ = ("_limit", "_used", "_window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        if limit < 1:
            raise ValueError(f"a sliding window needs a limit of at least 1, not {limit}")
        self._limit = limit
        self._window_s = window_s
        self._used: deque[float] = deque(maxlen=limit)

    def wait(self, now: float) -> float:
        """Seconds until one more use fits (0: now)."""
        if len(self._used) < self._limit:
            return 0.0
        return min(self._window_s, max(0.0, self._used[0] + self._window_s - now))  # min: a clock set back

    def use(self, now: float) -> None:
        """Count a use at ``now`` (the oldest falls out: only the last ``limit`` matter)."""
        self._used.append(now)
