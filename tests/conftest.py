"""Shared fixtures: real mosquitto brokers on free loopback ports, and temporary data directories."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.brokers import Mosquitto


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
