"""Rule definitions: what the store config's ``rules:`` section holds (docs/RULES.md).

One pydantic model per rule type, a discriminated union by ``type``. They live in the kernel because more than
one layer reads them: the config, the rule engine (:mod:`rules`), and the protocol's ``rules`` document.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from typing import Annotated, Final, Literal

import orjson
from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.kernel.model import Identifier, StrictModel
from gateway.kernel.rule_actions import MAX_ACTIONS, Action, check_action_ids

Metric = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
Seconds = Annotated[float, Field(ge=0, le=7 * 86_400)]


class Selector(StrictModel):
    """Which devices a rule watches. Empty: every device that sends what the rule reads."""

    devices: list[Identifier] = Field(default_factory=list, description="Device ids.")
    sources: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list,
        description="Profiles or formats that decoded the readings (a sensor.sample's 'source'), e.g. 'dixell-xr'.",
    )
    skus: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, description="SKUs, for the stock rules. Empty: every SKU."
    )

    def matches(self, device_id: str | None, source: str | None = None) -> bool:
        if device_id is None:
            return False
        if self.devices and device_id not in self.devices:
            return False
        return not self.sources or source in self.sources

    def matches_sku(self, sku: str) -> bool:
        return not self.skus or sku in self.skus


MAX_CHANNELS: Final = 50
"""Channels a rule (or an escalation step) may name: the alert.escalated event carries at most this many."""

NOT_EVALUATED: Final = frozenset(
    {"description", "severity", "notify", "renotify_s", "escalate", "enabled", "actions"}
)
"""Rule fields that do not change what the rule decides (left out of its fingerprint)."""


class Escalation(StrictModel):
    """A step of an alert nobody acknowledged: after ``after_s`` (from the alert), tell these channels too."""

    after_s: Annotated[float, Field(ge=60, le=7 * 86_400)] = Field(
        description="Seconds after the alert (60+)."
    )
    notify: list[Identifier] = Field(
        min_length=1, max_length=MAX_CHANNELS, description="The channels told at this step."
    )


class RuleBase(StrictModel):
    id: Identifier = Field(description="Unique among the rules; part of each alert's id.")
    description: Annotated[str, Field(max_length=500)] | None = Field(default=None, description="For people.")
    severity: Literal["info", "warning", "critical"] = Field(default="warning", description="Of its alerts.")
    enabled: bool = Field(default=True, description="False: kept, but evaluates nothing (open alerts clear).")
    select: Selector = Field(default_factory=Selector, description="The devices it watches.")
    notify: list[Identifier] = Field(
        default_factory=list,
        max_length=MAX_CHANNELS,
        description="Channels (notifications.channels ids) its alerts are sent to.",
    )
    renotify_s: Annotated[float, Field(ge=60, le=7 * 86_400)] | None = Field(
        default=None, description="While nobody acknowledges an open alert, tell 'notify' again this often."
    )
    escalate: list[Escalation] = Field(
        default_factory=list,
        max_length=10,
        description="Steps for an alert nobody acknowledges, in time order.",
    )
    actions: list[Action] = Field(
        default_factory=list,
        max_length=MAX_ACTIONS,
        description="Local actions when its alerts are raised or cleared: MQTT messages, Modbus writes.",
    )

    @model_validator(mode="after")
    def _escalation_in_order(self) -> RuleBase:
        check_action_ids(list(self.actions))
        times = [step.after_s for step in self.escalate]
        if times != sorted(set(times)):
            raise ValueError("escalate: the steps' after_s must grow from one step to the next")
        for where, ids in [("notify", self.notify), *(("escalate", s.notify) for s in self.escalate)]:
            if len(set(ids)) != len(ids):
                raise ValueError(f"{where}: a channel is named twice")
        return self

    def channels(self) -> list[str]:
        """Every channel the rule's alerts may reach."""
        return [*self.notify, *(c for step in self.escalate for c in step.notify)]

    def fingerprint(self) -> str:
        """Changes when what the rule decides does (its type, selector and thresholds): such a rule starts fresh
        (its open alerts are cleared). Its wording, severity and who it tells can change without that."""
        fields = self.model_dump(mode="json", exclude=set(NOT_EVALUATED))
        return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class TemperatureRule(RuleBase):
    """A fridge or freezer too warm for too long: ``max_c`` exceeded for ``for_s``; cleared once readings stay
    below ``clear_below_c`` for ``clear_for_s`` (hysteresis). Readings during a defrost and for
    ``post_defrost_grace_s`` after it, and for ``door_grace_s`` after the door closes (and while it is open),
    count for nothing; neither does a faulty probe (it is not an in-range reading either)."""

    type: Literal["temperature"] = Field(description="A fridge or freezer too warm for too long.")
    metric: Metric = Field(default="temperature", description="The sensor.sample value to watch.")
    max_c: float = Field(ge=-100, le=100, description="Above this is too warm.")
    for_s: Seconds = Field(default=600, description="Too warm for this long raises the alert.")
    clear_below_c: float | None = Field(
        default=None, ge=-100, le=100, description="Below this counts as recovered; default max_c."
    )
    clear_for_s: Seconds = Field(default=300, description="Recovered for this long clears the alert.")
    defrost_metric: Metric = Field(default="defrost_active", description="1 while the controller defrosts.")
    post_defrost_grace_s: Seconds = Field(default=1800, description="Readings ignored after a defrost ends.")
    door_metric: Metric = Field(default="door_open", description="1 while the door is open.")
    door_grace_s: Seconds = Field(default=300, description="Readings ignored after the door closes.")

    @model_validator(mode="after")
    def _hysteresis(self) -> TemperatureRule:
        if self.clear_below_c is not None and self.clear_below_c > self.max_c:
            raise ValueError("clear_below_c must not be above max_c (it is the recovery threshold)")
        return self

    @property
    def clear_c(self) -> float:
        return self.max_c if self.clear_below_c is None else self.clear_below_c


class SilentRule(RuleBase):
    """A device that went quiet: no reading for ``after_s``, or its driver says it is offline or in error.
    Cleared by its next reading (or it coming back online)."""

    type: Literal["silent"] = Field(description="A device that went quiet.")
    after_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = Field(
        default=900, description="No reading for this long raises the alert."
    )


class RegisterSilentRule(RuleBase):
    """A till that went quiet while the store is open: no sale or return for ``after_s`` of opening hours
    (``store.opening_hours``, in the store's timezone; always open without them). Its next receipt clears."""

    type: Literal["register_silent"] = Field(description="A till that sent nothing during opening hours.")
    after_s: Annotated[float, Field(ge=60, le=86_400)] = Field(
        default=1800, description="Opening-hours time without a receipt that raises the alert."
    )


class DoorOpenRule(RuleBase):
    """A fridge door left open: open (``metric`` 1) for longer than ``open_s``; closing it clears."""

    type: Literal["door_open"] = Field(description="A door left open.")
    metric: Metric = Field(default="door_open", description="1 while the door is open.")
    open_s: Seconds = Field(default=180, description="Open longer than this raises the alert.")


class BatteryLowRule(RuleBase):
    """A battery running out: ``metric`` (percent) at or below ``min_pct``, or the device's own low-battery flag;
    cleared above ``clear_above_pct`` (a battery reading wobbles with temperature)."""

    type: Literal["battery_low"] = Field(description="A sensor's battery running out.")
    metric: Metric = Field(default="battery_pct", description="Battery charge, percent.")
    flag_metric: Metric = Field(
        default="battery_low", description="1 when the device says its battery is low."
    )
    min_pct: float = Field(default=15, ge=0, le=100, description="At or below this raises the alert.")
    clear_above_pct: float = Field(
        default=25, ge=0, le=100, description="Above this clears it (a new battery)."
    )

    @model_validator(mode="after")
    def _band(self) -> BatteryLowRule:
        if self.clear_above_pct < self.min_pct:
            raise ValueError("clear_above_pct must not be below min_pct (a reading between them would flap)")
        return self


class ControllerAlarmRule(RuleBase):
    """The fridge controller's own alarm bits: any of ``metrics`` (default: every metric named ``alarm_*`` or
    ``*_alarm``) set raises; all of them clear clears."""

    type: Literal["controller_alarm"] = Field(description="A controller's own alarm bits.")
    metrics: list[Metric] = Field(
        default_factory=list,
        description="The alarm bits to watch; empty: every 'alarm_*' or '*_alarm' metric.",
    )


class SkuRuleBase(RuleBase):
    """A rule about SKUs (on the stock ledger's stock.level): it selects SKUs, not devices."""

    @model_validator(mode="after")
    def _skus_not_devices(self) -> SkuRuleBase:
        if self.select.devices or self.select.sources:
            raise ValueError("a stock rule selects SKUs (select.skus), not devices or sources")
        return self


STOCK_LOW_ID: Final = "stock.low"
"""The id of the always-present stock.low alerts (their alert ids are stock.low/<SKU>/<episode>)."""


class StockLowAlerts(SkuRuleBase):
    """The ``stock.low`` alerts: a SKU at or below its safety stock (the stock ledger's threshold, carried by each
    ``stock.level``) raises; above it again clears. Always in force; ``stock.low_alert`` in the config sets its
    severity, who it tells and which SKUs (``select.skus``)."""

    id: Literal["stock.low"] = Field(default="stock.low", description="Part of each alert's id.")
    type: Literal["stock.low"] = Field(default="stock.low", description="The stock ledger's low-stock alert.")


class ReplenishmentRule(SkuRuleBase):
    """Replenishment drafts: a SKU at or below its reorder point gets a ``stock.replenishment_draft`` for the
    order-up-to level minus on-hand minus its open drafts, rounded up to whole packs. The order-up-to level is
    ``order_up_to``, or sales velocity over ``velocity_days`` x (``lead_time_days`` + ``review_days``) +
    ``safety_stock``."""

    type: Literal["replenishment"] = Field(description="Suggested orders at the reorder point.")
    reorder_point: Annotated[float, Field(ge=0, le=10**6)] | None = Field(
        default=None, description="At or below this a draft is made (default: the SKU's safety stock)."
    )
    order_up_to: Annotated[float, Field(gt=0, le=10**6)] | None = Field(
        default=None, description="A fixed order-up-to level (or give velocity_days)."
    )
    velocity_days: Annotated[int, Field(ge=1, le=90)] | None = Field(
        default=None, description="Compute the order-up-to level from the units sold per day over these days."
    )
    lead_time_days: Annotated[float, Field(ge=0, le=90)] = Field(
        default=2, description="Days from order to delivery."
    )
    review_days: Annotated[float, Field(ge=0, le=90)] = Field(default=7, description="Days between orders.")
    safety_stock: Annotated[float, Field(ge=0, le=10**6)] | None = Field(
        default=None, description="Added to the computed level (default: the SKU's safety stock)."
    )
    pack_size: Annotated[float, Field(gt=0, le=10**5)] = Field(
        default=1, description="Orders are whole packs."
    )
    open_days: Annotated[float, Field(gt=0, le=90)] | None = Field(
        default=None,
        description="A draft counts as open (on order) this long unless stock arrives first (default: lead"
        " time + review period, at least 1 day).",
    )

    @model_validator(mode="after")
    def _one_level(self) -> ReplenishmentRule:
        if (self.order_up_to is None) == (self.velocity_days is None):
            raise ValueError("give either order_up_to (a fixed level) or velocity_days (a level from sales)")
        if (
            self.order_up_to is not None
            and self.reorder_point is not None
            and self.order_up_to <= self.reorder_point
        ):
            raise ValueError("order_up_to must be above reorder_point")
        return self

    @property
    def open_s(self) -> float:
        days = (
            self.open_days if self.open_days is not None else max(1.0, self.lead_time_days + self.review_days)
        )
        return days * 86_400


class NegativeStockRule(SkuRuleBase):
    """A data-quality alert: the stock ledger says a SKU's on-hand went below zero (sales of goods it never
    received, a missed delivery, a wrong count). Cleared when it is back at zero or above."""

    type: Literal["negative_stock"] = Field(description="On-hand below zero.")


class ReturnsSpikeRule(RuleBase):
    """Returns out of line with sales: in the last ``window_s``, returns over sales above ``max_ratio`` by count
    or by amount, once there were at least ``min_sales`` sales (a quiet hour's one return is no spike). The
    store's example: more than 15 % in 30 minutes. Cleared when both ratios are back at or below ``clear_ratio``
    (default 0.8 times ``max_ratio``: hysteresis, so a ratio hovering at the limit does not raise and clear over and
    over)."""

    type: Literal["returns_spike"] = Field(description="Returns out of line with sales (the whole store).")
    window_s: Annotated[float, Field(ge=60, le=86_400)] = Field(
        default=1800, description="The sliding window."
    )
    max_ratio: float = Field(default=0.15, gt=0, le=10, description="Returns / sales above this is a spike.")
    min_sales: int = Field(default=10, ge=1, le=100_000, description="Sales in the window before it counts.")
    clear_ratio: float | None = Field(
        default=None, ge=0, le=10, description="Cleared at or below this (default: 0.8 times max_ratio)."
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> ReturnsSpikeRule:
        if self.clear_ratio is not None and self.clear_ratio > self.max_ratio:
            raise ValueError("clear_ratio must not be above max_ratio (it is the recovery threshold)")
        return self

    @property
    def clear_at(self) -> float:
        return self.max_ratio * 0.8 if self.clear_ratio is None else self.clear_ratio


class ShelfLowRule(RuleBase):
    """A shelf running low, seen by its RFID reader: fewer tags of the shelf's GTIN in the reader's latest window
    than the planogram's ``min_on_shelf``. Cleared at or above ``min_on_shelf`` (``clear_at: min``) or at or above
    the larger of ``min_on_shelf`` and ``facings`` (``clear_at: facings``, the default: the shelf was refilled)."""

    type: Literal["shelf_low"] = Field(description="A shelf below its planogram minimum (RFID).")
    clear_at: Literal["min", "facings"] = Field(
        default="facings",
        description="Cleared at or above min_on_shelf ('min'), or the larger of min_on_shelf and facings.",
    )


class ShelfEmptyRule(RuleBase):
    """A shelf with none of its GTIN in its RFID reader's latest window. Cleared once it holds at least its
    ``min_on_shelf`` again (at least one): a single unit read or put back does not end it."""

    type: Literal["shelf_empty"] = Field(description="A shelf with none of its goods left (RFID).")


class PossibleShrinkRule(RuleBase):
    """Tagged goods that left their shelf and were not sold: a departed tag with no till sale of its GTIN within
    ``sale_window_s`` (each sale line consumes one departure per unit). An event alert: it clears when all its
    tags are seen on the shelf again, or ``clear_after_s`` after it was raised."""

    type: Literal["possible_shrink"] = Field(description="Goods gone from a shelf and not sold (RFID).")
    sale_window_s: Annotated[float, Field(ge=10, le=86_400)] = Field(
        default=600, description="A sale of the GTIN within this long of the departure accounts for it."
    )
    clear_after_s: Annotated[float, Field(ge=60, le=7 * 86_400)] = Field(
        default=3600, description="The alert clears this long after it was raised (it reports an event)."
    )


class MisplacedRule(RuleBase):
    """Goods on the wrong shelf: a GTIN the RFID reader of a shelf sees that the planogram does not put on the
    shelves it watches. Cleared when the reader no longer sees it there."""

    type: Literal["misplaced"] = Field(
        description="Goods on a shelf the planogram does not put them on (RFID)."
    )


AttendanceFlag = Literal["late", "early_leave", "no_show", "needs_review"]
ATTENDANCE_FLAGS: Final[tuple[AttendanceFlag, ...]] = ("late", "early_leave", "no_show", "needs_review")


class AttendanceRule(RuleBase):
    """Staff attendance from the kiosks' ``staff.checkin`` events against HQ's roster, in the store's timezone.

    A check-in is accepted only inside the store's geofence (``store.location``) with a good fix and face match;
    otherwise it needs review. Accepted check-ins are compared with the roster's shifts (late, early leave, no
    show), and each store-local day ends with an ``attendance.daily`` summary. ``select.devices``: the kiosks."""

    type: Literal["attendance"] = Field(description="Check-ins against the geofence and HQ's roster.")
    max_accuracy_m: Annotated[float, Field(gt=0, le=10_000)] = Field(
        default=50, description="A fix less accurate than this (metres) needs review."
    )
    min_face_score: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.8, description="A face-match score below this needs review."
    )
    grace_s: Annotated[float, Field(ge=0, le=7200)] = Field(
        default=300,
        description="Late: first check-in after shift start + this; early leave: last out before"
        " shift end - this.",
    )
    no_show_after_s: Annotated[float, Field(ge=60, le=43_200)] = Field(
        default=900, description="Nobody checked in this long after a shift's start: no_show."
    )
    report_after_s: Annotated[float, Field(ge=0, le=43_200)] = Field(
        default=3600,
        description="The day's attendance.daily is made this long after the day (and its last shift) ended.",
    )
    alerts: list[AttendanceFlag] = Field(
        default_factory=lambda: list(ATTENDANCE_FLAGS),
        description="The findings that raise an alert (all are in the daily summary either way).",
    )
    clear_after_s: Annotated[float, Field(ge=60, le=7 * 86_400)] = Field(
        default=3600, description="An alert clears this long after it was raised (it reports a finding)."
    )


EngineRule = (
    ReplenishmentRule
    | TemperatureRule
    | SilentRule
    | RegisterSilentRule
    | DoorOpenRule
    | BatteryLowRule
    | ControllerAlarmRule
    | NegativeStockRule
    | ReturnsSpikeRule
    | ShelfLowRule
    | ShelfEmptyRule
    | PossibleShrinkRule
    | MisplacedRule
    | AttendanceRule
)
"""Every rule type of the engine but ``stock.low``, whose settings differ between the store config
(:class:`StockLowAlerts`) and HQ's ``rules`` document (its thresholds)."""
RuleDefinition = Annotated[StockLowAlerts | EngineRule, Field(discriminator="type")]


def check_one_attendance_rule(rules: list[RuleBase]) -> None:
    """A store has one attendance rule: its staff's day is one (two would flag one check-in differently)."""
    if sum(r.type == "attendance" for r in rules if isinstance(r, AttendanceRule)) > 1:
        raise ValueError("one attendance rule per store: its select.devices can list every kiosk")


def check_unique_ids(rules: list[RuleBase]) -> None:
    """A list of rules as the config and rule files give them: unique ids, and no ``stock.low`` (it is always in
    force, set under ``stock.low_alert``)."""
    if any(isinstance(r, StockLowAlerts) for r in rules):
        raise ValueError(
            "type 'stock.low' is not set here: the stock.low alerts are always in force; set who they tell under"
            " stock.low_alert, their thresholds as safety_stock under stock (or HQ's rules)"
        )
    ids = [r.id for r in rules]
    if STOCK_LOW_ID in ids:
        raise ValueError(f"rule id {STOCK_LOW_ID!r} is the stock.low alerts' own: give this rule another id")
    check_one_attendance_rule(rules)
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"rule ids must be unique: {', '.join(twice)}")


class RuleFile(StrictModel):
    """A file of rules (``store-gateway rules check FILE``): the ``rules:`` list, as in the store config."""

    rules: list[RuleDefinition] = Field(default_factory=list, max_length=2000)

    @model_validator(mode="after")
    def _unique(self) -> RuleFile:
        check_unique_ids(list(self.rules))
        return self


class Channel(StrictModel):
    """Where alerts are sent: a chat group's robot, or any HTTPS endpoint."""

    id: Identifier = Field(description="What rules name in 'notify'.")
    type: Literal["dingtalk", "wecom", "slack", "webhook"] = Field(
        description="dingtalk (a group robot, signed), wecom (a group robot), slack (an incoming webhook, or"
        " any Slack-compatible one), webhook (JSON, signed with HMAC-SHA256)."
    )
    url: SecretStr = Field(
        description="The robot's or endpoint's URL (it holds its token): https (http only to this box),"
        " as {file: PATH}."
    )

    @field_validator("url")
    @classmethod
    def _https(cls, value: SecretStr) -> SecretStr:
        parts = urllib.parse.urlsplit(value.get_secret_value())
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as err:
            raise ValueError("not a URL: its port is not a number") from err
        if (
            not parts.hostname
            or parts.scheme not in ("https", "http")
            or (parts.scheme == "http" and not loopback)
        ):
            raise ValueError("an https:// URL (http:// only to this box)")  # the value itself is a secret
        return value

    secret: SecretStr | None = Field(
        default=None, description="dingtalk: the robot's signing secret (SEC...); webhook: the HMAC key."
    )
    per_minute: int = Field(default=20, ge=1, le=600, description="At most this many messages a minute.")


class Notifications(StrictModel):
    """Alerts sent to people: each rule names its channels in ``notify`` (docs/RULES.md)."""

    language: Literal["en", "zh-Hant", "zh-Hans"] = Field(default="en", description="Of the messages.")
    channels: list[Channel] = Field(default_factory=list, max_length=50, description="Where alerts go.")

    @model_validator(mode="after")
    def _unique(self) -> Notifications:
        ids = [c.id for c in self.channels]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"channel ids must be unique: {', '.join(twice)}")
        for channel in self.channels:
            if channel.type in ("dingtalk", "webhook") and channel.secret is None:
                what = (
                    "a dingtalk robot needs its signing secret"
                    if channel.type == "dingtalk"
                    else "a webhook is signed"
                )
                raise ValueError(f"channel {channel.id}: {what} ('secret')")
        return self
