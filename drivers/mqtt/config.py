"""Config of the MQTT intake driver: topic patterns on the store broker and what they carry."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from drivers.base import Driver, DriverContext

TOPIC_TEMPLATE = r"^[^#+]*\{device_id\}[^#+]*$"


class TopicRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: Annotated[str, Field(pattern=TOPIC_TEMPLATE, max_length=200)] = Field(
        description="Topic template with exactly one '{device_id}' level, for example 'store/pos/{device_id}/sale'."
    )
    kind: Literal["pos.sale", "pos.return", "sensor.reading"] = Field(
        description="Event kind that messages on this topic become."
    )

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


class MqttDriverConfig(BaseModel):
    """Subscribes on the store broker (``store_broker``) and turns messages into events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mqtt"] = Field(
        default="mqtt", description="Driver family; selects this driver's settings. Always write it in YAML."
    )
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
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

    def topic_regexes(self) -> list[tuple[re.Pattern[str], str]]:
        return [
            (re.compile("^" + re.escape(r.pattern).replace(r"\{device_id\}", "([^/]+)") + "$"), r.kind)
            for r in self.routes
        ]
