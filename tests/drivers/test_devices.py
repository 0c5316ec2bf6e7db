"""The driver framework on a real SQLite journal: device health transitions and their device.status events,
the per-device rate limit and payload limit, quarantine through the sink, and the silence watchdog."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.devices import RATE_LIMIT_QUIET_S, DeviceRegistry
from drivers.limits import DeviceLimits
from drivers.sink import REDACTED, DeviceSink
from gateway.kernel.events import DeviceStatus, SensorSample
from gateway.kernel.journal import Draft, Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.ratelimit import TokenBucket
from tests.harness.driver_harness import query, running_journal


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    journal: Journal
    registry: DeviceRegistry
    sink: DeviceSink
    clock: FakeClock
    metrics: Metrics
    db: Path

    async def flush(self) -> None:
        async with asyncio.timeout(20):
            await self.journal.flush()

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return query(self.db, sql, *params)

    def statuses(self, device_id: str) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT body FROM events WHERE kind='device.status' AND device_id=? ORDER BY seq", device_id
        )
        return [orjson.loads(body)["data"] for (body,) in rows]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    metrics = Metrics()
    async with running_journal(tmp_path / "journal.db", metrics) as journal:
        clock = FakeClock()
        registry = DeviceRegistry(journal.submit, monotonic=clock)
        yield Harness(
            journal, registry, DeviceSink("drv", journal, metrics), clock, metrics, tmp_path / "journal.db"
        )


def sample(value: float = 4.0) -> SensorSample:
    return SensorSample(values={"temperature": value}, units={"temperature": "°C"}, source="test")


async def test_first_message_puts_a_device_online_once(harness: Harness) -> None:
    device = harness.registry.add("fridge-1", "drv", DeviceLimits(), "dixell-xr")
    for n in range(5):
        assert harness.sink.emit(device, "sensor.sample", sample(n), size=10)
    await harness.flush()
    statuses = harness.statuses("fridge-1")
    assert [s["status"] for s in statuses] == ["online"]
    assert statuses[0]["driver"] == "drv"
    DeviceStatus.model_validate(statuses[0])
    assert harness.rows("SELECT count(*) FROM events WHERE kind='sensor.sample'") == [(5,)]
    assert device.health.messages == 5


async def test_rate_limit_drops_the_excess_counts_it_and_reports_it(harness: Harness) -> None:
    limits = DeviceLimits(rate_limit_per_s=10, rate_burst=20)
    noisy = harness.registry.add("noisy", "drv", limits)
    quiet = harness.registry.add("quiet", "drv", limits)
    acked: list[int] = []
    taken = 0
    # 10x the rate for 3 simulated seconds (clock steps of 10 ms), while the quiet device sends 5/s.
    for step in range(300):
        harness.clock.now += 0.01
        taken += harness.sink.emit(noisy, "sensor.sample", sample(), size=10, ack=lambda: acked.append(1))
        if step % 20 == 0:
            assert harness.sink.emit(quiet, "sensor.sample", sample(), size=10)
    await harness.flush()
    # Burst 20 plus 10/s over 3 s (token refill), nothing more.
    assert 45 <= taken <= 51
    assert noisy.health.rate_limited == 300 - taken
    assert len(acked) == 300  # dropped messages are acknowledged too: counted and reported, not redelivered
    assert quiet.health.rate_limited == 0
    assert quiet.health.messages == 15
    assert harness.metrics.dropped.labels("drv", "rate_limited")._value.get() == 300 - taken
    statuses = harness.statuses("noisy")
    assert [s["status"] for s in statuses] == ["online", "rate_limited"]
    # Quiet for long enough: back online, and the status event carries the count of everything dropped.
    harness.clock.now += RATE_LIMIT_QUIET_S
    for device in harness.registry:
        device.watch(harness.clock.now)
    await harness.flush()
    back = harness.statuses("noisy")[-1]
    assert back["status"] == "online"
    assert back["rate_limited"] == 300 - taken
    assert [s["status"] for s in harness.statuses("quiet")] == ["online"]


async def test_oversized_and_rejected_payloads_are_quarantined_with_a_reason(harness: Harness) -> None:
    device = harness.registry.add("kiosk-1", "drv", DeviceLimits(max_payload_bytes=100))
    raw = b"x" * 500
    assert not harness.sink.emit(device, "sensor.sample", sample(), size=len(raw), raw=raw)
    harness.sink.reject(device, "bad_json", "unexpected end of input at byte 3", b'{"a')
    harness.sink.reject(
        device, "biometric_refused", "a face image is never stored", b"\xff\xd8jpeg", redact=True
    )
    await harness.flush()
    rows = harness.rows("SELECT device_id, reason, detail, size, payload FROM quarantine ORDER BY qid")
    assert [(r[0], r[1]) for r in rows] == [
        ("kiosk-1", "too_large"),
        ("kiosk-1", "bad_json"),
        ("kiosk-1", "biometric_refused"),
    ]
    assert rows[0][2] == "500 bytes > max_payload_bytes 100"
    assert rows[0][3] == 500
    assert rows[1][4] == b'{"a'
    assert rows[2][4] == REDACTED
    assert rows[2][3] == 6
    assert device.health.quarantined == 3
    assert harness.rows("SELECT count(*) FROM events WHERE kind='sensor.sample'") == [(0,)]


async def test_errors_and_recovery_are_reported_on_change_only(harness: Harness) -> None:
    device = harness.registry.add("fridge-2", "drv")
    harness.sink.emit(device, "sensor.sample", sample(), size=10)
    for n in range(3):
        harness.sink.failed(device, f"no answer from unit 2 after {n + 3} tries")
    harness.sink.failed(device, "CRC error")
    harness.sink.reachable(device)
    harness.sink.failed(device, "CRC error")
    harness.sink.emit(device, "sensor.sample", sample(), size=10)
    await harness.flush()
    statuses = harness.statuses("fridge-2")
    # One event per spell, however often and however differently it fails; the last error is in the health.
    assert [(s["status"], s.get("reason")) for s in statuses] == [
        ("online", None),
        ("error", "no answer from unit 2 after 3 tries"),
        ("online", None),
        ("error", "CRC error"),
        ("online", None),
    ]
    assert statuses[-1]["errors"] == 5
    assert statuses[-1]["messages"] == 2
    assert device.health.last_error == "CRC error"


async def test_watchdog_reports_a_silent_device_offline_and_back(harness: Harness) -> None:
    limits = DeviceLimits(offline_after_s=0.2)
    # The watchdog runs on real time here: switch before any device exists, so its token bucket and silence
    # timer start on the same clock (the fake one starts at 1000 s, above a freshly booted machine's uptime).
    harness.registry.monotonic = asyncio.get_running_loop().time
    silent = harness.registry.add("probe-1", "drv", limits)
    talking = harness.registry.add("probe-2", "drv", limits)
    watchdog = asyncio.create_task(harness.registry.run(), name="watchdog-under-test")
    try:
        async with asyncio.timeout(20):
            while silent.health.status != "offline":
                harness.sink.emit(talking, "sensor.sample", sample(), size=10)
                await asyncio.sleep(0.02)
        assert talking.health.status == "online"
        harness.sink.emit(silent, "sensor.sample", sample(), size=10)
        assert silent.health.status == "online"
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    await harness.flush()
    statuses = harness.statuses("probe-1")
    assert [s["status"] for s in statuses] == ["offline", "online"]
    assert statuses[0]["reason"] == "nothing received for 0.2 s"
    snapshot = {row["device_id"]: row for row in harness.registry.snapshot()}
    assert snapshot["probe-1"]["status"] == "online"
    assert snapshot["probe-1"]["last_seen"] is not None
    assert snapshot["probe-2"]["messages"] > 0


async def test_a_device_id_is_registered_once(harness: Harness) -> None:
    harness.registry.add("pos-01", "a")
    with pytest.raises(ValueError, match="registered twice"):
        harness.registry.add("pos-01", "b")


@given(
    rate=st.floats(min_value=0.5, max_value=1000),
    burst=st.integers(min_value=1, max_value=1000),
    steps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=200),
)
def test_token_bucket_never_admits_more_than_burst_plus_refill(
    rate: float, burst: int, steps: list[float]
) -> None:
    now = 0.0
    bucket = TokenBucket(rate, burst, now)
    taken = 0
    for step in steps:
        now += step
        taken += bucket.take(now)
    assert taken <= burst + rate * now + 1e-6


async def test_admit_then_submit_is_emit_in_two_halves(harness: Harness) -> None:
    """The path of a driver that applies the limits before decoding (one message may become several events):
    rate-limited drops are counted and acked at once, events are acked only after their commit, and messages
    counted with note_received reach the metric with the next commit."""
    device = harness.registry.add("shelf-1", "drv", DeviceLimits(rate_limit_per_s=1, rate_burst=1))
    received = harness.metrics.received.labels("drv")
    acked: list[str] = []
    harness.sink.note_received()
    assert harness.sink.admit(device, 10, lambda: acked.append("first")) == "ok"
    for n in range(2):
        ack = (lambda: acked.append("events")) if n == 1 else None
        body = orjson.dumps(sample(n).model_dump(mode="json"))
        assert harness.sink.submit(Draft("sensor.sample", device.id, body, ack=ack, driver="drv"), device)
    assert acked == []  # the message's ack waits for the commit of its last event
    harness.sink.note_received()
    assert harness.sink.admit(device, 10, lambda: acked.append("dropped")) == "rate_limited"
    assert acked == ["dropped"]
    assert received._value.get() == 2  # a drop shows in the counts at once, without a commit
    assert harness.metrics.dropped.labels("drv", "rate_limited")._value.get() == 1
    assert harness.sink.admit(device, 10**9) == "too_large"  # the caller quarantines it, with its detail
    harness.sink.note_received()
    await harness.flush()
    assert acked == ["dropped", "events"]
    assert received._value.get() == 3
    assert device.health.messages == 2
    assert device.health.rate_limited == 1
    assert harness.rows("SELECT count(*) FROM events WHERE kind='sensor.sample'") == [(2,)]
