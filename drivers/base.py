"""What every driver is and what it is given.

A driver is three things: a config model with ``type: Literal[...]`` and a ``create`` method (in
``drivers/<family>/config.py``, listed once in :mod:`drivers.registry`), an async I/O loop (the object
``create`` returns, satisfying :class:`Driver`), and pure decode/encode functions that tests call with bytes.
The config model imports its I/O module inside ``create``, so an unused driver's libraries (bleak, pymodbus,
pyserial) are never imported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from drivers.devices import DeviceRegistry
from drivers.errors import DecodeError as DecodeError
from drivers.errors import DriverError as DriverError
from drivers.mqtt.devices import DeviceConfig
from drivers.sink import DeviceSink
from gateway.kernel.clock import ClockState
from gateway.kernel.config import ApiConfig, BrokerConfig
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics


class DriverSettings(Protocol):
    """What drivers read of the gateway's config. The whole config (:class:`gateway.config.GatewayConfig`, which
    satisfies this) is assembled above the drivers, from their own sections among others."""

    @property
    def store_broker(self) -> BrokerConfig: ...

    @property
    def devices(self) -> Sequence[DeviceConfig]: ...

    @property
    def api(self) -> ApiConfig: ...

    def client_id(self, role: str, broker: BrokerConfig) -> str: ...


class Driver(Protocol):
    """The running side of one driver instance."""

    name: str

    async def run(self) -> None:
        """Read the devices until cancelled. Device trouble is reported, never raised."""

    def pause(self) -> None:
        """Shutdown: take nothing more from the devices (what is already in hand still commits)."""


@dataclass
class DriverState:
    """A driver's own health: connected to its peer (broker, bus, adapter) or not, and why not."""

    connected: bool = False
    error: str | None = None


@dataclass
class DriverContext:
    """Everything a driver may use; built once by the runtime."""

    journal: Journal
    metrics: Metrics
    devices: DeviceRegistry
    config: DriverSettings
    """The store broker, the top-level MQTT ``devices``, whether the local API serves, client ids."""
    api_routers: list[Any] = field(default_factory=list)
    """FastAPI routers a driver adds to the local API (HTTP intake); mounted when the API starts."""
    states: dict[str, DriverState] = field(default_factory=dict)
    device_writers: dict[str, Callable[[str, str, float], Awaitable[None]]] = field(default_factory=dict)
    """Device id -> ``async write(device_id, point, value)`` for drivers that can write (Modbus setpoints)."""
    clock: ClockState = field(default_factory=ClockState)
    """The gateway's answer to "is the wall clock synchronised?" (freshness windows need it)."""
    state_changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever a driver's connection state is set (who waits for one clears it first)."""

    def client_id(self, role: str) -> str:
        """The stable MQTT client id for a role on the store broker (e.g. ``intake-<driver>``)."""
        return self.config.client_id(role, self.config.store_broker)

    def sink(self, driver: str) -> DeviceSink:
        return DeviceSink(driver, self.journal, self.metrics)

    def state(self, driver: str) -> DriverState:
        """The driver's health entry (shown in ``/health``); also sets ``storegw_driver_connected``."""
        return self.states.setdefault(driver, DriverState())

    def set_state(self, driver: str, connected: bool, error: str | None = None) -> None:
        state = self.state(driver)
        state.connected = connected
        state.error = None if connected else error
        self.state_changed.set()
        self.metrics.driver_connected.labels(driver).set(1 if connected else 0)
