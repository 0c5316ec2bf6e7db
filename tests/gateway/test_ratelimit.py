"""The one token bucket, in both its uses: all-or-nothing takes (a device's message rate limit) and spending
into debt that is waited out (the drain rate limit to HQ, one bucket for events/s and one for bytes/s); and the
sliding window of the chat channels."""

from __future__ import annotations

import pytest

from gateway.kernel.ratelimit import SlidingWindow, TokenBucket


def test_take_is_all_or_nothing_and_refills_up_to_the_burst() -> None:
    bucket = TokenBucket(2, 3, now=10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(10.5)  # half a second at 2/s: one token
    assert not bucket.take(10.5)
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]  # capped at the burst
    assert not bucket.take(1000.0, 0.5)
    assert bucket.take(1001.0, 2)  # n tokens at once
    assert not bucket.take(1001.0)


def test_a_clock_going_back_refills_nothing() -> None:
    bucket = TokenBucket(10, 1, now=100.0)
    assert bucket.take(100.0)
    assert not bucket.take(50.0)
    assert not bucket.take(50.05)  # refilling starts again from the last reading


def test_spend_goes_into_debt_and_delay_waits_it_out() -> None:
    """The drain limit's events bucket: one second of burst (burst = rate), a batch may overdraw."""
    now = 100.0
    events = TokenBucket(100, 100, now)
    assert events.delay(now) == 0.0  # a full second of burst to start with
    events.spend(now, 150)
    assert events.delay(now) == pytest.approx(0.5)  # 50 events of debt at 100/s
    now += 0.25
    assert events.delay(now) == pytest.approx(0.25)
    now += 0.25
    assert events.delay(now) == 0.0
    now += 10
    events.spend(now, 100)  # the refill is capped at the burst: a long idle does not bank a bigger one
    assert events.delay(now) == 0.0
    events.spend(now, 1)
    assert events.delay(now) == pytest.approx(0.01)


def test_events_and_bytes_buckets_side_by_side() -> None:
    """How the uplink limits a batch by both: spend on each, wait for the longer debt."""
    now = 100.0
    events, nbytes = TokenBucket(100, 100, now), TokenBucket(1000, 1000, now)
    events.spend(now, 150)
    nbytes.spend(now, 400)
    assert max(events.delay(now), nbytes.delay(now)) == pytest.approx(0.5)
    now += 0.5
    events.spend(now, 0)
    nbytes.spend(now, 1600)  # 600 + 0.5 s * 1000 refilled = 1000 (capped), minus 1600
    assert max(events.delay(now), nbytes.delay(now)) == pytest.approx(0.6)


def test_rate_zero_means_unlimited() -> None:
    bucket = TokenBucket(0, 0, now=0.0)
    assert all(bucket.take(0.0) for _ in range(1000))
    bucket.spend(0.0, 10**12)
    assert bucket.delay(0.0) == 0.0


def test_one_limited_one_unlimited_side_by_side() -> None:
    """A drain limit on events only (bytes/s 0): the bytes bucket never delays."""
    events, nbytes = TokenBucket(10, 10, now=0.0), TokenBucket(0, 0, now=0.0)
    events.spend(0.0, 20)
    nbytes.spend(0.0, 10**12)
    assert max(events.delay(0.0), nbytes.delay(0.0)) == pytest.approx(1.0)


def test_a_sliding_window_allows_at_most_its_limit_in_any_window() -> None:
    window = SlidingWindow(3, 60.0)
    for at in (0.0, 1.0, 2.0):
        assert window.wait(at) == 0
        window.use(at)
    assert window.wait(2.0) == 58.0  # the oldest (at 0) leaves the window at 60
    assert window.wait(59.5) == 0.5
    assert window.wait(60.0) == 0
    window.use(60.0)
    assert window.wait(60.0) == 1.0  # now the one at 1 is the oldest of the last three


def test_a_sliding_window_of_one_and_a_clock_set_back() -> None:
    window = SlidingWindow(1, 60.0)
    window.use(100.0)
    assert window.wait(130.0) == 30.0
    assert window.wait(0.0) == 60.0  # never longer than a window, whatever the clock did


def test_a_sliding_window_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SlidingWindow(0, 60.0)
