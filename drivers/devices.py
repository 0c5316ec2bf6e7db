"""The device registry: each configured device's health, limits and counters, and its ``device.status`` events.

Every driver registers its devices here and reports through :class:`drivers.sink.DeviceSink`. A device is
``unknown`` until its first good message, then ``online``; ``offline`` when silent for its
``offline_after_s``; ``error`` when its driver reports an I/O error or timeout; ``rate_limited`` while it
sends more than its limit. Every change commits a ``device.status`` event (state class) with the counters,
so HQ sees each rate-limit drop and each silence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

from drivers.limits import DeviceLimits
from gateway.kernel.events import DeviceStatus
from gateway.kernel.journal import Draft
from gateway.kernel.ratelimit import TokenBucket

_LOGGER = logging.getLogger(__name__)

Status = Literal["unknown", "online", "offline", "error", "rate_limited"]

RATE_LIMIT_QUIET_S: Final = 10.0
"""A rate-limited device is back to ``online`` after this long without a drop."""
WATCH_MAX_INTERVAL_S: Final = 5.0
"""The silence watchdog wakes at most this often (idle CPU stays near zero)."""


@dataclass(slots=True)
class DeviceHealth:
    """What the registry knows about one device (served by the local API at ``/api/devices``)."""

    device_id: str
    driver: str
    profile: str | None
    status: Status = "unknown"
    reason: str | None = None
    last_seen: datetime | None = None
    messages: int = 0
    errors: int = 0
    quarantined: int = 0
    rate_limited: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "driver": self.driver,
            "profile": self.profile,
            "status": self.status,
            "reason": self.reason,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "messages": self.messages,
            "errors": self.errors,
            "quarantined": self.quarantined,
            "rate_limited": self.rate_limited,
            "last_error": self.last_error,
        }


class Device:
    """One registered device, as its driver holds it. All methods run on the event loop."""

    __slots__ = ("_bucket", "_last_drop", "_last_seen_mono", "_registry", "health", "id", "limits")

    def __init__(self, registry: DeviceRegistry, health: DeviceHealth, limits: DeviceLimits) -> None:
        self._registry = registry
        self.id = health.device_id
        self.health = health
        self.limits = limits
        now = registry.monotonic()
        self._bucket = TokenBucket(limits.rate_limit_per_s, limits.rate_burst, now)
        self._last_seen_mono = now
        self._last_drop = 0.0

    def admit(self, size: int) -> Literal["ok", "rate_limited", "too_large"]:
        """Whether a message of ``size`` bytes may go on. A rate-limited one is counted here (and reported)."""
        if size > self.limits.max_payload_bytes:
            return "too_large"
        now = self._registry.monotonic()
        if self._bucket.take(now):
            return "ok"
        self._last_drop = now
        self.health.rate_limited += 1
        if self.health.status != "rate_limited":
            self._set(
                "rate_limited",
                f"over {self.limits.rate_limit_per_s:g} messages/s (burst {self.limits.rate_burst});"
                " the excess is dropped and counted",
            )
        return "rate_limited"

    def seen(self) -> None:
        """A good message arrived."""
        health = self.health
        health.messages += 1
        self._last_seen_mono = self._registry.monotonic()  # wall time is derived from it only when reported
        if health.status not in ("online", "rate_limited"):
            self._set("online", None)

    def quarantined(self) -> None:
        self.health.quarantined += 1

    def reachable(self) -> None:
        """The device answered (a poll with nothing to report, a port that opened): online again if it was in
        error or offline, without counting a message."""
        self._last_seen_mono = self._registry.monotonic()
        if self.health.status in ("unknown", "offline", "error"):
            self._set("online", None)

    def failed(self, reason: str) -> None:
        """An I/O error or timeout talking to the device (after the driver's own retries). Reported once per
        spell: a device that keeps failing updates ``last_error`` and the count, not the journal."""
        health = self.health
        health.errors += 1
        health.last_error = reason[:500]
        if health.status != "error":
            self._set("error", health.last_error)

    def _set(self, status: Status, reason: str | None) -> None:
        self.health.status = status
        self.health.reason = reason
        self._registry.changed(self)

    def watch(self, now: float) -> None:
        """Called by the registry's watchdog: silence and the end of a rate-limited spell."""
        status = self.health.status
        if status == "rate_limited" and now - self._last_drop >= RATE_LIMIT_QUIET_S:
            self._set("online", f"rate back under the limit; {self.health.rate_limited} dropped so far")
        elif status in ("unknown", "online") and now - self._last_seen_mono >= self.limits.offline_after_s:
            # An 'error' device stays 'error': it is already reported as failing, silence adds nothing.
            self._set("offline", f"nothing received for {self.limits.offline_after_s:g} s")

    def last_seen_ago(self, now: float) -> float:
        return now - self._last_seen_mono


class DeviceRegistry:
    """Every configured device of every driver; commits ``device.status`` on each change."""

    def __init__(
        self,
        submit: Callable[[Draft], object],
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._submit = submit
        self.monotonic = monotonic
        self._wall = wall
        self._devices: dict[str, Device] = {}
        self._wake = asyncio.Event()

    def add(
        self, device_id: str, driver: str, limits: DeviceLimits | None = None, profile: str | None = None
    ) -> Device:
        """Register one device; its id is unique across all drivers (the config validates that)."""
        if device_id in self._devices:
            raise ValueError(f"device {device_id!r} is registered twice")
        device = Device(self, DeviceHealth(device_id, driver, profile), limits or DeviceLimits())
        self._devices[device_id] = device
        self._wake.set()
        return device

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.monotonic()
        wall = self._wall()
        out = []
        for device in self._devices.values():
            row = device.health.as_dict()
            if device.health.messages:
                row["last_seen"] = _ago(wall, device.last_seen_ago(now)).isoformat()
            out.append(row)
        return out

    def changed(self, device: Device) -> None:
        health = device.health
        now = self.monotonic()
        last_seen = _ago(self._wall(), device.last_seen_ago(now)) if health.messages else None
        health.last_seen = last_seen
        status = DeviceStatus(
            status="online" if health.status == "unknown" else health.status,
            reason=health.reason,
            driver=health.driver,
            last_seen=last_seen,
            messages=health.messages,
            errors=health.errors,
            quarantined=health.quarantined,
            rate_limited=health.rate_limited,
        )
        log = _LOGGER.warning if health.status in ("offline", "error", "rate_limited") else _LOGGER.info
        log(
            "device %s (%s): %s%s",
            health.device_id,
            health.driver,
            health.status,
            f": {health.reason}" if health.reason else "",
        )
        self._submit(
            Draft(
                "device.status",
                health.device_id,
                orjson.dumps(status.model_dump(mode="json", exclude_none=True)),
            )
        )

    async def run(self) -> None:
        """The silence watchdog: one wake-up every few seconds at most, whatever the number of devices."""
        while True:
            if not self._devices:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.monotonic()
            for device in list(self._devices.values()):
                device.watch(now)
            shortest = min(d.limits.offline_after_s for d in self._devices.values())
            await asyncio.sleep(min(WATCH_MAX_INTERVAL_S, max(0.05, shortest / 4)))


def _ago(wall: datetime, seconds: float) -> datetime:
    return datetime.fromtimestamp(wall.timestamp() - seconds, UTC)
