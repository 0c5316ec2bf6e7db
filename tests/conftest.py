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
