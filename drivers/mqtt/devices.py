"""The MQTT devices (the config's top-level ``devices:``): an id, a profile, and limits over the profile's."""

from __future__ import annotations

from pydantic import Field, field_validator

from drivers.limits import DeviceLimits
from drivers.mqtt.profile import SENSOR_READING_PROFILE, MqttProfile, resolve_profile
from drivers.profiles import check_profile
from gateway.kernel.model import Identifier


class DeviceConfig(DeviceLimits):
    """An MQTT device; limits not written here come from its profile's ``limits``."""

    id: Identifier = Field(description="Device id as it appears in the device's topic.")
    profile: str = Field(
        description="What the device is: an MQTT profile (pos-terminal, checkin-kiosk, rfid-shelf-mqtt,"
        " generic-json-sensor...; 'pos_terminal' is pos-terminal) or 'sensor' (sensor.reading messages)."
    )
    name: str | None = Field(default=None, description="Free text for technicians.")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value == SENSOR_READING_PROFILE:
            return value
        check_profile(resolve_profile(value), MqttProfile)
        return value

    def limits_over(self, defaults: DeviceLimits) -> DeviceLimits:
        """The device's limits: what it sets here, the profile's ``defaults`` for the rest."""
        own = {k: getattr(self, k) for k in self.model_fields_set if k in DeviceLimits.model_fields}
        return defaults.model_copy(update=own)
