"""The explicit registry of drivers: a new driver is one folder under drivers/ plus one line here.

``DriverConfig`` is the discriminated union (by ``type``) the gateway config uses for ``drivers:``. Each
member's ``create(ctx)`` builds its running driver (see :mod:`drivers.base`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from drivers.ble.config import BleDriverConfig
from drivers.http.config import HttpDriverConfig
from drivers.modbus.config import ModbusDriverConfig
from drivers.mqtt.config import MqttDriverConfig
from drivers.serial.config import SerialDriverConfig

DriverConfig = Annotated[
    MqttDriverConfig | SerialDriverConfig | BleDriverConfig | HttpDriverConfig | ModbusDriverConfig,
    Field(discriminator="type"),
]
"""Union of every driver's config model: one line per driver."""
