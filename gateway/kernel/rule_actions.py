"""A rule's local actions (docs/RULES.md, "Actions"): what the gateway does in the store when the rule's alert is
raised or cleared: an MQTT message to a store device (a buzzer, a display) or a write to a Modbus device's writable
point (start a defrost), held back by an interlock on the device's latest reading.

The models live in the kernel beside the rule definitions (:mod:`gateway.kernel.rule_config`), which carry them;
:mod:`rules.actions` carries them out.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator

from gateway.kernel.model import Identifier, StrictModel

Level = Literal["raised", "cleared"]
MAX_ACTIONS: Final = 10
"""Actions per rule."""
PLACEHOLDERS: Final = frozenset(
    {"alert_id", "rule_id", "subject", "episode", "device_id", "severity", "level", "message", "store_id"}
)
"""What ``{name}`` in a topic or payload template is replaced with (the alert's own fields)."""
PLACEHOLDER: Final = re.compile(r"\{([a-z_]+)\}")
TOPIC_TEMPLATE: Final = re.compile(r"^[^\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff+#]{1,200}$")


def template_names(template: str) -> set[str]:
    return set(PLACEHOLDER.findall(template))


class Condition(StrictModel):
    """One condition of an interlock on a metric of a device's latest ``sensor.sample``; give exactly one
    comparison."""

    device: Identifier | None = Field(
        default=None, description="The device whose reading is checked; default the action's device."
    )
    metric: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")] = Field(
        description="A value of the device's sensor.sample, e.g. door_open."
    )
    eq: float | None = Field(default=None, description="Holds when the value equals this.")
    ne: float | None = Field(default=None, description="Holds when the value is not this.")
    lt: float | None = Field(default=None, description="Holds when the value is below this.")
    le: float | None = Field(default=None, description="Holds when the value is at most this.")
    gt: float | None = Field(default=None, description="Holds when the value is above this.")
    ge: float | None = Field(default=None, description="Holds when the value is at least this.")

    @model_validator(mode="after")
    def _one_comparison(self) -> Condition:
        given = [op for op in ("eq", "ne", "lt", "le", "gt", "ge") if getattr(self, op) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of eq, ne, lt, le, gt, ge")
        return self

    @property
    def comparison(self) -> tuple[str, float]:
        for op in ("eq", "ne", "lt", "le", "gt", "ge"):
            bound = getattr(self, op)
            if bound is not None:
                return op, float(bound)
        raise AssertionError("validated: one comparison")

    def holds(self, value: float) -> bool:
        op, bound = self.comparison
        return {
            "eq": value == bound,
            "ne": value != bound,
            "lt": value < bound,
            "le": value <= bound,
            "gt": value > bound,
            "ge": value >= bound,
        }[op]


class ActionBase(StrictModel):
    id: Identifier = Field(
        description="Unique within the rule: what the action's record (action.done, action.failed) names, and"
        " part of its once-per-episode key."
    )
    on: list[Level] = Field(
        default_factory=lambda: list[Level](["raised"]),
        min_length=1,
        max_length=2,
        description="When it runs: the alert raised, cleared, or both.",
    )

    @model_validator(mode="after")
    def _levels_once(self) -> ActionBase:
        if len(set(self.on)) != len(self.on):
            raise ValueError("on: a level is named twice")
        return self


class MqttPublishAction(ActionBase):
    """A message on the store broker, e.g. to a buzzer or a display."""

    type: Literal["mqtt_publish"] = Field(description="A message on the store broker.")
    topic: str = Field(
        description="The topic; may hold {alert_id}, {rule_id}, {subject}, {device_id}, {level}, ... (no + or #).",
        pattern=TOPIC_TEMPLATE.pattern,
    )
    payload: Annotated[str, Field(max_length=4096)] = Field(
        default='{"alert": "{alert_id}", "level": "{level}"}',
        description="The message; the same placeholders as the topic.",
    )
    payload_cleared: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="The message when the alert clears (default: payload)."
    )
    qos: Literal[0, 1] = Field(default=1, description="MQTT QoS.")
    retain: bool = Field(default=False, description="Retained on the broker (a display's current state).")

    @model_validator(mode="after")
    def _known_placeholders(self) -> MqttPublishAction:
        for where, text in (
            ("topic", self.topic),
            ("payload", self.payload),
            ("payload_cleared", self.payload_cleared),
        ):
            unknown = sorted(template_names(text or "") - PLACEHOLDERS)
            if unknown:
                raise ValueError(
                    f"{where}: unknown placeholder(s) {', '.join(unknown)}; known: {', '.join(sorted(PLACEHOLDERS))}"
                )
        if self.topic.startswith("/") or self.topic.endswith("/"):
            raise ValueError("topic: no leading or trailing '/'")
        return self


class ModbusWriteAction(ActionBase):
    """A write to a writable point of a device's profile (as HQ's device.write), held back unless the interlock
    holds on the device's latest reading."""

    type: Literal["modbus_write"] = Field(description="A write to a device's writable point.")
    device: Identifier | None = Field(
        default=None, description="The device written; default the alert's own device."
    )
    point: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")] = Field(
        description="A writable point of the device's profile, e.g. defrost_start."
    )
    value: StrictBool | StrictInt | StrictFloat = Field(
        description="A number in engineering units; true or false for a coil (checked against the profile and"
        " the device's range when it runs, as HQ's device.write is)."
    )
    interlock: list[Condition] = Field(
        default_factory=list,
        max_length=10,
        description="Conditions that must all hold on the latest reading(s), or the write is held back; at least"
        " one, so that a write never runs without a fresh reading.",
    )
    max_age_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=300, description="An interlock's reading older than this does not count (held back)."
    )

    @model_validator(mode="after")
    def _some_interlock(self) -> ModbusWriteAction:
        if not self.interlock:
            raise ValueError(
                "interlock: a modbus_write needs at least one condition, so that it writes only on a fresh"
                " reading of the device, e.g. interlock: [{metric: door_open, eq: 0}]"
            )
        return self


Action = Annotated[MqttPublishAction | ModbusWriteAction, Field(discriminator="type")]


def check_action_ids(actions: list[MqttPublishAction | ModbusWriteAction]) -> None:
    ids = [a.id for a in actions]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"actions: ids must be unique within the rule: {', '.join(twice)}")
