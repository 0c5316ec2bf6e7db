"""The explicit registry of drivers: a new driver is one folder under drivers/ plus one line here.

``DriverConfig`` is the discriminated union (by ``type``) the gateway config uses for ``drivers:``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from drivers.mqtt.config import MqttDriverConfig

DriverConfig = Annotated[MqttDriverConfig, Field(discriminator="type")]
"""Union of every driver's config model. Add a driver: ``MqttDriverConfig | NewDriverConfig``."""
