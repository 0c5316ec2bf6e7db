"""Shared fixtures: real mosquitto brokers on free loopback ports, and temporary data directories."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.brokers import Mosquitto


@pytest.fixture
def store_broker() -> Iterator[Mosquitto]:
    broker = Mosquitto().start()
    yield broker
    broker.close()


@pytest.fixture
def hq_broker() -> Iterator[Mosquitto]:
    broker = Mosquitto().start()
    yield broker
    broker.close()


@pytest.fixture
def persistent_hq_broker() -> Iterator[Mosquitto]:
    """An HQ broker that keeps sessions and queued messages across stop()/start(), as a production one does.

    Outage tests need it: without persistence a restarted mosquitto forgets the receiver's subscription, and
    what the gateway delivers before the receiver is back would go nowhere (a harness loss, not the
    gateway's). The log check catches a broker that could not save its state.
    """
    broker = Mosquitto(persistence=True).start()
    try:
        yield broker
        broker.stop()
        log = broker.log.read_text(errors="replace")
        assert "Error" not in log, f"the HQ broker failed (persistence?):\n{log[-2000:]}"
    finally:
        broker.close()


CLOCK_MODULES = frozenset(
    {
        "test_ble_driver",
        "test_clock_watch",
        "test_devices",
        "test_journal",
        "test_modbus_driver",
        "test_outbox",
        "test_serial_driver",
        "test_stock",
        "test_uplink_scheduling",
        "test_uptime",
    }
)
"""Modules whose code under test reads the monotonic clock in this process (token buckets, silence watchdogs,
eviction, uplink pacing, clock anchors, event sizes, serial framing timeouts). They are marked ``clock``: CI
runs them again with the clock shifted to a freshly booted machine's uptime (``pytest -m clock --uptime 30``;
see tests/harness/uptime.py). The MQTT-device, HTTP-intake and API modules read the clock too (rate limits, uptime_s)
and pass at --uptime 0.5 and 30; they stay out of the two extra passes to keep CI under 15 minutes."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in CLOCK_MODULES:
            item.add_marker(pytest.mark.clock)
