"""Config of the MQTT intake driver: topic patterns on the store broker and what they carry."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator

from drivers.mqtt.profile import SENSOR_READING_PROFILE, MqttProfile, PayloadMapping
from drivers.profiles import check_profile, get_profile
from gateway.kernel.model import ID_PATTERN, StrictModel

if TYPE_CHECKING:
    from drivers.base import Driver, DriverContext

TOPIC_TEMPLATE = r"^[^#+]*\{device_id\}[^#+]*$"


class TopicRoute(StrictModel):
    pattern: Annotated[str, Field(pattern=TOPIC_TEMPLATE, max_length=200)] = Field(
        description="Topic template with exactly one '{device_id}' level, for example 'store/pos/{device_id}/sale'."
    )
    kind: Literal["pos.sale", "pos.return", "sensor.reading"] | None = Field(
        default=None,
        description="Event kind of a till's messages (pos.sale, pos.return) or of the legacy sensor.reading;"
        " other devices' kinds come from their profile.",
    )
    profile: str | None = Field(
        default=None,
        description="MQTT profile of the devices publishing here (firmware_configs/profiles), e.g."
        " 'checkin-kiosk', 'rfid-shelf-mqtt', 'generic-json-sensor'. Without it: pos-terminal for pos kinds.",
    )
    mapping: PayloadMapping | None = Field(
        default=None,
        description="Payload mapping for this route, instead of the profile's (sensor profiles).",
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        return None if value is None else check_profile(value, MqttProfile)

    @model_validator(mode="after")
    def _kind_or_profile(self) -> TopicRoute:
        if self.profile is None:
            if self.kind is None:
                raise ValueError("give the route a 'profile' (or a 'kind' for tills: pos.sale, pos.return)")
            if self.mapping is not None:
                raise ValueError("'mapping' needs a sensor 'profile' (e.g. generic-json-sensor)")
            return self
        decoder = get_profile(self.profile, MqttProfile).decoder
        if decoder == "pos" and self.kind not in ("pos.sale", "pos.return"):
            raise ValueError(
                f"profile {self.profile!r} carries sales and returns: give kind pos.sale or pos.return"
            )
        if decoder != "pos" and self.kind is not None:
            raise ValueError(f"profile {self.profile!r} decides the event kind: leave 'kind' out")
        if self.mapping is not None and decoder != "sample":
            raise ValueError(f"'mapping' is for sensor profiles; {self.profile!r} has decoder {decoder!r}")
        return self

    @property
    def device_profile(self) -> str:
        """The profile of the devices on this route (the legacy kinds imply one)."""
        if self.profile is not None:
            return self.profile
        return SENSOR_READING_PROFILE if self.kind == "sensor.reading" else "pos-terminal"

    @field_validator("pattern")
    @classmethod
    def _one_whole_level(cls, value: str) -> str:
        levels = value.split("/")
        if value.count("{device_id}") != 1 or "{device_id}" not in levels:
            raise ValueError("'{device_id}' must appear exactly once, as a whole topic level")
        if value.startswith("/") or value.endswith("/") or "" in levels:
            raise ValueError("no empty topic levels, and no leading or trailing '/'")
        return value

    @property
    def subscription(self) -> str:
        """The MQTT subscription filter: '{device_id}' becomes '+'."""
        return self.pattern.replace("{device_id}", "+")

    @property
    def device_level(self) -> int:
        return self.pattern.split("/").index("{device_id}")


class MqttDriverConfig(StrictModel):
    """Subscribes on the store broker (``store_broker``) and turns messages into events."""

    type: Literal["mqtt"] = Field(
        default="mqtt", description="Driver family; selects this driver's settings. Always write it in YAML."
    )
    name: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        default="store-mqtt", description="Driver instance name, used in metrics and logs."
    )
    routes: list[TopicRoute] = Field(
        min_length=1, description="Topic templates and the event kind each carries."
    )
    qos: Literal[0, 1] = Field(default=1, description="Subscription QoS; 1 gives acknowledge-after-commit.")
    max_payload_bytes: int = Field(
        default=64 * 1024, ge=256, le=4 * 1024 * 1024, description="Larger is rejected."
    )
    unknown_devices: Literal["quarantine", "accept"] = Field(
        default="quarantine", description="What to do with a device id that is not under 'devices'."
    )

    def create(self, ctx: DriverContext) -> Driver:
        from drivers.mqtt.driver import MqttIntake

        return MqttIntake(self, ctx)

    def topic_regexes(self) -> list[tuple[re.Pattern[str], TopicRoute]]:
        return [
            (re.compile("^" + re.escape(r.pattern).replace(r"\{device_id\}", "([^/]+)") + "$"), r)
            for r in self.routes
        ]

    def profiles(self) -> set[str]:
        """The device profiles this driver has routes for."""
        return {r.device_profile for r in self.routes}
