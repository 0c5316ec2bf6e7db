"""The event envelope and the typed payloads: the contract between a gateway and HQ.

Every event a gateway commits has the same envelope (:class:`Envelope`); ``data`` is typed per ``kind``
(:data:`PAYLOADS`). Envelopes are serialised once, at commit, with orjson and stored as bytes: the journal,
the uplink and the local API all pass those bytes on untouched.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt, TypeAdapter

from gateway.kernel.model import StrictModel

SCHEMA_VERSION: Final = 1
"""Envelope schema version; bumped on any incompatible change to the envelope or a payload."""

MAX_LINE_ITEMS: Final = 500

Kind = Literal[
    "pos.sale",
    "pos.return",
    "stock.level",
    "alert.raised",
    "device.status",
    "gateway.status",
    "stock.adjusted",
    "document.updated",
    "outbox.evicted",
    "clock.synced",
    "sensor.reading",
    "sensor.sample",
    "rfid.inventory",
    "staff.checkin",
    "barcode.scanned",
    "alert.cleared",
    "alert.acknowledged",
    "notification.sent",
    "notification.failed",
    "alert.escalated",
    "attendance.daily",
    "stock.replenishment_draft",
    "report.daily",
    "action.done",
    "action.failed",
]


Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


def _places(limit: int) -> Callable[[Decimal], Decimal]:
    step = Decimal(1).scaleb(-limit)

    def check(value: Decimal) -> Decimal:
        # The common case first, in one C call: no digit other than 0 past ``limit`` places (a quarter of the
        # cost of reading the digits, measured in bench/decode_mqtt.py).
        try:
            if value.quantize(step) == value:
                return value
        except InvalidOperation:
            pass  # more digits than the context holds: count them below
        _, digits, exponent = value.as_tuple()
        if isinstance(exponent, int) and exponent < -limit:
            # "1.5000" is 1.5: trailing zeros are not decimal places. (normalize() would round tiny values to 0.)
            trailing_zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
            if exponent + trailing_zeros < -limit:
                raise ValueError(f"at most {limit} decimal places")
        return value

    return check


# Bounds plus a cheap exponent check rather than max_digits/decimal_places: the same protection at under
# half the validation cost (measured: 26 us -> 11 us per sale; README "Where the time goes").
# Money is carried, never computed on, so only its magnitude is bounded; quantities move the stock ledger,
# so their precision is bounded too (the ledger keeps 3 decimals).
Money = Annotated[Decimal, Field(ge=-(10**10), le=10**10, allow_inf_nan=False)]
NonNegativeMoney = Annotated[Decimal, Field(ge=0, le=10**10, allow_inf_nan=False)]
Quantity = Annotated[Decimal, Field(gt=0, le=10**6, allow_inf_nan=False), AfterValidator(_places(3))]
ShortText = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
"""Ids and receipt numbers: no control characters (they end up in keys, logs and HQ's database)."""


class LineItem(StrictModel):
    """One line of a receipt."""

    sku: Sku = Field(description="Store SKU; the stock ledger is keyed by it.")
    gtin: Annotated[str, Field(pattern=r"^\d{8}$|^\d{12,14}$")] | None = Field(
        default=None, description="GTIN-8/12/13/14 barcode, if the till scanned one."
    )
    quantity: Quantity = Field(description="Units sold (or returned); decimals allowed for weighed goods.")
    unit_price: Money = Field(description="Price per unit, tax included, in the receipt's currency.")
    discount: NonNegativeMoney = Field(default=Decimal(0), description="Discount on this line, total.")


class Totals(StrictModel):
    """Receipt totals as the till computed them; the gateway does not recompute them."""

    subtotal: Money
    tax: Money = Decimal(0)
    total: Money


class Payment(StrictModel):
    method: Literal["cash", "card", "mobile", "voucher", "other"]
    amount: Money


class PosSale(StrictModel):
    """``pos.sale``: a completed sale at a till."""

    receipt_no: ShortText = Field(description="Receipt number, unique per register; the dedup key.")
    register_id: ShortText = Field(description="Till/register id inside the store.")
    cashier_id: ShortText | None = Field(default=None, description="Staff id; never a name.")
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = Field(description="ISO 4217 code.")
    lines: list[LineItem] = Field(min_length=1, max_length=MAX_LINE_ITEMS)
    totals: Totals
    payments: list[Payment] = Field(default_factory=list, max_length=20)


class PosReturn(PosSale):
    """``pos.return``: goods returned; ``original_receipt_no`` links it to the sale."""

    original_receipt_no: ShortText | None = Field(
        default=None, description="Receipt number of the original sale, when the till knows it."
    )
    reason: Annotated[str, Field(max_length=200)] | None = None


class StockLevel(StrictModel):
    """``stock.level``: the on-hand after a commit changed it (one per SKU per group commit)."""

    sku: Sku
    on_hand: Decimal
    delta: Decimal = Field(description="Change since the previous stock.level of this SKU.")
    safety_stock: Decimal | None = None
    cause_seqs: tuple[int, int] = Field(description="First and last seq of the events that moved it.")


class StockReplenishmentDraft(StrictModel):
    """``stock.replenishment_draft``: a SKU reached its reorder point; the order the store should place."""

    draft_id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="<rule id>/<SKU>/<n>: one per draft, never reused."
    )
    rule_id: ShortText
    sku: Sku
    quantity: Decimal = Field(gt=0, description="Suggested units: a whole number of packs.")
    on_hand: Decimal
    reorder_point: Decimal
    order_up_to: Decimal
    open_before: Decimal = Field(ge=0, description="Units of this SKU's open drafts before this one.")
    pack_size: Decimal = Field(gt=0)
    velocity_per_day: Decimal | None = Field(
        default=None, description="Units sold per day over the rule's history (when it computes order_up_to)."
    )
    seq: int = Field(ge=1, description="The stock.level that reached the reorder point.")


class AlertRaised(StrictModel):
    """``alert.raised``: a local rule fired."""

    rule: ShortText = Field(description="Rule type, for example 'stock.low'.")
    severity: Literal["info", "warning", "critical"]
    subject: ShortText = Field(description="What the alert is about: a SKU, a device id.")
    message: Annotated[str, Field(max_length=500)]
    details: dict[str, Any] = Field(default_factory=dict)


class AlertCleared(StrictModel):
    """``alert.cleared``: what raised an alert is over (or the rule that raised it changed or was removed)."""

    rule: ShortText = Field(description="Rule type, as in the alert.raised it ends.")
    subject: ShortText = Field(description="What the alert was about, as in the alert.raised.")
    alert_id: Annotated[str, Field(max_length=200)] = Field(
        description="The id of the alert it ends: '<rule id>/<subject>/<episode>'."
    )
    reason: Literal["recovered", "rule_changed", "rule_removed", "unwatched"]
    message: Annotated[str, Field(max_length=500)]
    details: dict[str, Any] = Field(default_factory=dict)


class AlertEscalated(StrictModel):
    """``alert.escalated``: an open alert nobody acknowledged, told again (``step`` 0: the rule's own channels,
    re-notified) or to the next channels of its escalation (``step`` 1, 2...)."""

    alert_id: Annotated[str, Field(min_length=1, max_length=200)]
    rule: ShortText
    subject: ShortText
    step: int = Field(ge=0, le=10)
    channels: list[ShortText] = Field(max_length=50, description="The channels told now.")
    message: Annotated[str, Field(max_length=500)]
    details: dict[str, Any] = Field(default_factory=dict)


class AlertAcknowledged(StrictModel):
    """``alert.acknowledged``: someone in the store (or HQ) saw an alert and says what was done about it."""

    alert_id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="The alert's id: '<rule id>/<subject>/<episode>'."
    )
    note: Annotated[str, Field(max_length=1000)] = Field(
        default="", description="The corrective action (for the HACCP log): 'moved stock to the walk-in'."
    )
    role: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")] = Field(
        description="Who acknowledged it, by role: 'manager', 'technician', 'hq'."
    )
    via: Literal["api", "hq", "ui"] = Field(description="The local API, an HQ command, or the local page.")
    by: ShortText | None = Field(
        default=None, description="Who, by the name their login has (the local page's users); None otherwise."
    )


class NotificationSent(StrictModel):
    """``notification.sent``: an alert (raised or cleared) reached a channel; ``notification.failed``: it could
    not (the channel refused it for good: a wrong URL or secret)."""

    alert_id: Annotated[str, Field(min_length=1, max_length=200)]
    channel: ShortText
    level: Literal["raised", "cleared", "escalated"]
    attempts: int = Field(ge=1)
    error: Annotated[str, Field(max_length=500)] | None = None


class NotificationFailed(NotificationSent):
    """``notification.failed``: see :class:`NotificationSent`; ``error`` says why."""


class ActionDone(StrictModel):
    """``action.done``: the gateway acted on a device: a rule's local action for an alert (an MQTT message, a
    Modbus write) or HQ's ``device.write``. ``action.failed``: it did not, and ``reason`` says why."""

    source: Literal["rule", "hq"] = Field(description="A rule's action, or HQ's device.write command.")
    action: ShortText = Field(description="The action's id in its rule; 'device.write' for HQ's command.")
    type: Literal["mqtt_publish", "modbus_write"]
    alert_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    level: Literal["raised", "cleared"] | None = None
    request_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    device_id: ShortText | None = None
    point: ShortText | None = None
    value: StrictBool | StrictInt | StrictFloat | None = None
    topic: Annotated[str, Field(max_length=256)] | None = None
    attempts: int = Field(default=1, ge=0)
    reason: Literal["interlock", "refused", "unreachable", "alert_ended", "invalid"] | None = None
    error: Annotated[str, Field(max_length=500)] | None = None


class ActionFailed(ActionDone):
    """``action.failed``: see :class:`ActionDone`."""


class DeviceStatus(StrictModel):
    """``device.status``: a device's health changed (emitted on every change, never periodically)."""

    status: Literal["online", "offline", "error", "rate_limited"]
    reason: Annotated[str, Field(max_length=500)] | None = None
    driver: ShortText | None = Field(default=None, description="The driver instance that owns the device.")
    last_seen: datetime | None = Field(default=None, description="Gateway time of the last good message.")
    messages: int | None = Field(default=None, ge=0, description="Good messages since the gateway started.")
    errors: int | None = Field(default=None, ge=0, description="I/O errors and timeouts since start.")
    quarantined: int | None = Field(default=None, ge=0, description="Messages quarantined since start.")
    rate_limited: int | None = Field(
        default=None, ge=0, description="Messages dropped by the device's rate limit since start."
    )


class GatewayStatus(StrictModel):
    """``gateway.status``: the gateway started or stopped (also sent as the retained status)."""

    status: Literal["online", "offline"]
    version: str
    config_hash: str | None = None


class StockAdjusted(StrictModel):
    """``stock.adjusted``: HQ moved stock outside a sale (receiving, transfers, stock-take corrections)."""

    sku: Sku
    delta: Annotated[Decimal, Field(ge=-(10**6), le=10**6, allow_inf_nan=False)] | None = Field(
        default=None, description="Units added (negative: removed). Exactly one of delta and set."
    )
    set: Annotated[Decimal, Field(ge=-(10**6), le=10**6, allow_inf_nan=False)] | None = Field(
        default=None, description="New on-hand (a stock-take count). Exactly one of delta and set."
    )
    reason: Literal["receiving", "transfer_in", "transfer_out", "stocktake", "correction"]
    note: Annotated[str, Field(max_length=500)] | None = None
    request_id: ShortText = Field(
        description="The HQ command's request id; the adjustment applies once per id."
    )


class DocumentUpdated(StrictModel):
    """``document.updated``: HQ replaced a stored document (roster, planogram, rules)."""

    name: Literal["roster", "planogram", "rules"]
    version: int = Field(ge=1, description="1, 2, 3... per document name.")
    count: int = Field(ge=0, description="Entries in the new document.")
    request_id: ShortText


class OutboxEvicted(StrictModel):
    """``outbox.evicted``: undelivered events were dropped from the disk (or refused); explains gaps at HQ."""

    class_: Literal["critical", "transaction", "state", "telemetry"] = Field(alias="class")
    reason: Literal["disk_budget", "class_budget", "ttl", "disk_low"]
    count: int = Field(ge=0, description="Events evicted (or refused, for disk_low).")
    bytes: int = Field(ge=0)
    ranges: list[tuple[int, int]] = Field(description="Inclusive runs of the exact seqs evicted.")


class ClockSynced(StrictModel):
    """``clock.synced``: an anchor pairing this boot's monotonic clock with true UTC (see docs/OUTBOX.md)."""

    boot_id: str
    mono_ns: int
    utc: datetime
    step_s: float | None = Field(description="How far the wall clock jumped at sync, if measured.")


class SensorReading(StrictModel):
    """``sensor.reading``: one raw reading (telemetry class)."""

    metric: ShortText = Field(description="What was measured, for example 'temperature'.")
    value: float = Field(allow_inf_nan=False)
    unit: Annotated[str, Field(max_length=16)] | None = None


Metric = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
"""A measurement name: 'temperature', 'humidity', 'door_open', 'probe_2', 'alarm_high_temp'."""


class SensorSample(StrictModel):
    """``sensor.sample``: one decoded reading of a device that measures several things (telemetry class).

    Booleans (door open, defrost running, alarm bits) are 0 or 1. A metric the device reported as faulty (a
    Modbus error sentinel, a Ruuvi "not available") is absent from ``values`` and named in ``faults``."""

    values: dict[Metric, float] = Field(max_length=64, description="Metric -> value, in ``units``.")
    units: dict[Metric, Annotated[str, Field(max_length=16)]] = Field(
        default_factory=dict, max_length=64, description="Metric -> unit, for example '°C', '%', 'V'."
    )
    faults: dict[Metric, Annotated[str, Field(max_length=200)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Metrics the device reported as unavailable, and why.",
    )
    source: ShortText | None = Field(
        default=None, description="Format or profile that decoded it, for example 'bthome.v2', 'dixell-xr'."
    )
    rssi_dbm: int | None = Field(default=None, ge=-127, le=20, description="Radio signal strength (BLE).")
    battery_pct: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    counter: int | None = Field(
        default=None, ge=0, description="The device's own frame counter or packet id, if it sends one."
    )


Epc = Annotated[str, Field(pattern=r"^[0-9A-F]{4,124}$", description="EPC as upper-case hex.")]


class RfidTag(StrictModel):
    epc: Epc
    gtin: Annotated[str, Field(pattern=r"^\d{14}$")] | None = Field(
        default=None, description="GTIN-14 when the EPC is an SGTIN."
    )
    serial: Annotated[str, Field(max_length=32)] | None = Field(default=None, description="SGTIN serial.")
    reads: int = Field(ge=1, description="Reads of this tag in the window.")
    rssi_max: float | None = Field(default=None, ge=-128, le=128, allow_inf_nan=False)
    antenna: int | None = Field(default=None, ge=0, le=255, description="Antenna of the strongest read.")


class RfidInventory(StrictModel):
    """``rfid.inventory``: what one reader or shelf saw in one window, and what changed since the last one."""

    window_s: float = Field(gt=0, le=3600, allow_inf_nan=False, description="Length of the window.")
    reads: int = Field(ge=0, description="Raw tag reads in the window.")
    tags: list[RfidTag] = Field(max_length=5000, description="Tags seen in the window.")
    appeared: list[Epc] = Field(default_factory=list, max_length=5000, description="New since last window.")
    departed: list[Epc] = Field(
        default_factory=list, max_length=5000, description="Not seen for the reader's departure time."
    )
    truncated: int = Field(default=0, ge=0, description="Tags left out because the window had too many.")


class StaffCheckin(StrictModel):
    """``staff.checkin``: a kiosk check-in or check-out. Never a face image or template: only the score."""

    employee_id: ShortText
    direction: Literal["in", "out"] = "in"
    latitude: float = Field(ge=-90, le=90, allow_inf_nan=False)
    longitude: float = Field(ge=-180, le=180, allow_inf_nan=False)
    accuracy_m: float = Field(ge=0, le=100_000, allow_inf_nan=False, description="GPS accuracy radius.")
    face_match_score: float = Field(ge=0, le=1, allow_inf_nan=False, description="Kiosk's match score, 0..1.")


AttendanceFlag = Literal["late", "early_leave", "no_show", "needs_review"]
MAX_ATTENDANCE_EMPLOYEES: Final = 10_000


class AttendanceShift(StrictModel):
    """One employee's shift of the day (or, with ``start`` null, check-ins outside any rostered shift)."""

    start: datetime | None = Field(
        description="The roster's shift start, in the store's local time; null: none."
    )
    end: datetime | None = Field(description="The roster's shift end, in the store's local time.")
    first_in: datetime | None = Field(description="The first accepted check-in, local time; null: none.")
    last_out: datetime | None = Field(description="The last accepted check-out, local time; null: none.")
    minutes_worked: float = Field(ge=0, description="Accepted check-in to check-out, summed, in minutes.")
    flags: list[AttendanceFlag] = Field(max_length=4)
    needs_review: int = Field(ge=0, description="Check-ins of this shift that were not accepted.")


class AttendanceEmployee(StrictModel):
    employee_id: ShortText
    shifts: list[AttendanceShift] = Field(max_length=250)
    minutes_worked: float = Field(ge=0, description="The day's total.")
    flags: list[AttendanceFlag] = Field(max_length=4, description="Every flag of the day's shifts.")


class AttendanceDaily(StrictModel):
    """``attendance.daily``: one attendance rule's summary of one store-local day, made once after it ended.
    Employee ids only: no names, no positions, no biometrics."""

    rule_id: ShortText
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$", description="The store-local day, YYYY-MM-DD.")
    timezone: ShortText
    employees: list[AttendanceEmployee] = Field(max_length=MAX_ATTENDANCE_EMPLOYEES)


class ReportMoney(StrictModel):
    """Receipts of one currency: how many, and their totals summed (to 3 decimal places)."""

    currency: ShortText
    count: int = Field(ge=0)
    amount: Decimal


class ReportSku(StrictModel):
    sku: ShortText
    units: Decimal = Field(description="Units sold (sales only, returns not netted).")
    receipts: int = Field(ge=0, description="Sales receipts with this SKU.")


class ReportLowStock(StrictModel):
    sku: ShortText
    on_hand: Decimal
    safety_stock: Decimal | None


class ReportDraft(StrictModel):
    """An open replenishment draft: ordered and not yet received (what is left of it)."""

    draft_id: Annotated[str, Field(max_length=200)]
    rule_id: ShortText
    sku: ShortText
    quantity: Decimal = Field(description="Units still on order.")


class ReportAlerts(StrictModel):
    """Alerts of one rule type during the day; ``alert_ids`` lists them when there are few (else null)."""

    rule: ShortText
    raised: int = Field(ge=0)
    cleared: int = Field(ge=0)
    acknowledged: int = Field(ge=0)
    alert_ids: list[Annotated[str, Field(max_length=200)]] | None = Field(default=None, max_length=20)


class ReportExcursion(StrictModel):
    alert_id: Annotated[str, Field(max_length=200)]
    start: datetime
    end: datetime | None = Field(description="When it cleared; null: still open when the report was made.")
    minutes: float = Field(ge=0, description="Its whole duration (so far, if open).")
    minutes_in_day: float = Field(ge=0, description="The part of it inside the reported day.")
    max_c: float | None


class ReportFridge(StrictModel):
    """One fridge's day from the HACCP log: minutes are counted in whole HACCP intervals."""

    device_id: ShortText
    limit_c: float | None = Field(description="The lowest max_c of the temperature rules watching it.")
    minutes_with_data: float = Field(ge=0)
    minutes_in_range: float | None = Field(description="Intervals with data whose maximum <= limit_c.")
    gap_minutes: float = Field(ge=0)
    max_c: float | None
    excursions: list[ReportExcursion] = Field(max_length=100)


class ReportAttendance(StrictModel):
    """One attendance rule's day, from its ``attendance.daily``."""

    rule_id: ShortText
    employees: int = Field(ge=0)
    minutes_worked: float = Field(ge=0)
    flags: dict[ShortText, int] = Field(max_length=8)


class ReportDevice(StrictModel):
    """A device's day from its ``device.status`` changes (online and rate-limited count as up)."""

    device_id: ShortText
    minutes_known: float = Field(ge=0, description="Minutes of the day its status was known.")
    minutes_up: float = Field(ge=0)
    uptime_pct: float | None = Field(description="minutes_up / minutes_known, in %; null: never known.")
    changes: int = Field(ge=0, description="Status changes during the day.")


class ReportOutboxClass(StrictModel):
    """One outbox class as the report was made (not at the day's end)."""

    class_: Literal["critical", "transaction", "state", "telemetry"] = Field(alias="class")
    pending: int = Field(ge=0)
    stored: int = Field(ge=0)
    evicted: int = Field(ge=0)
    oldest_undelivered: datetime | None


class ReportDaily(StrictModel):
    """``report.daily``: the store's summary of one store-local day for HQ, made once, at ``report.at`` the day
    after (or at the gateway's start if that time passed while it was down). See docs/REPORTS.md."""

    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$", description="The store-local day, YYYY-MM-DD.")
    timezone: ShortText
    day_start: datetime
    day_end: datetime
    late: bool = Field(description="Made after report.at had passed by more than an hour (a downtime).")
    sales: list[ReportMoney] = Field(max_length=50)
    returns: list[ReportMoney] = Field(max_length=50)
    returns_ratio: float | None = Field(description="Return receipts / sale receipts; null without sales.")
    top_skus: list[ReportSku] = Field(max_length=100)
    low_stock: list[ReportLowStock] = Field(max_length=500)
    low_stock_total: int = Field(ge=0)
    open_drafts: list[ReportDraft] = Field(max_length=500)
    open_drafts_total: int = Field(ge=0)
    alerts: list[ReportAlerts] = Field(max_length=200)
    fridges: list[ReportFridge] = Field(max_length=500)
    attendance: list[ReportAttendance] = Field(max_length=50)
    devices: list[ReportDevice] = Field(max_length=1000)
    outbox: list[ReportOutboxClass] = Field(max_length=4)
    problems: list[Annotated[str, Field(max_length=300)]] = Field(
        default_factory=list, max_length=20, description="Sections that could not be read, and why."
    )


class BarcodeScanned(StrictModel):
    """``barcode.scanned``: a scanner read one code (a receiving or stock-take scanner, not a till's sale)."""

    code: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")] = Field(
        description="The code as read, printable ASCII (a prefix/suffix the scanner adds is stripped)."
    )
    gtin: Annotated[str, Field(pattern=r"^\d{14}$")] | None = Field(
        default=None, description="GTIN-14 when the code is a GTIN-8/12/13/14 with a valid check digit."
    )


PAYLOADS: Final[dict[str, type[StrictModel]]] = {
    "pos.sale": PosSale,
    "pos.return": PosReturn,
    "stock.level": StockLevel,
    "alert.raised": AlertRaised,
    "device.status": DeviceStatus,
    "gateway.status": GatewayStatus,
    "stock.adjusted": StockAdjusted,
    "document.updated": DocumentUpdated,
    "outbox.evicted": OutboxEvicted,
    "clock.synced": ClockSynced,
    "sensor.reading": SensorReading,
    "sensor.sample": SensorSample,
    "rfid.inventory": RfidInventory,
    "staff.checkin": StaffCheckin,
    "barcode.scanned": BarcodeScanned,
    "alert.cleared": AlertCleared,
    "alert.acknowledged": AlertAcknowledged,
    "notification.sent": NotificationSent,
    "notification.failed": NotificationFailed,
    "action.done": ActionDone,
    "action.failed": ActionFailed,
    "alert.escalated": AlertEscalated,
    "attendance.daily": AttendanceDaily,
    "stock.replenishment_draft": StockReplenishmentDraft,
    "report.daily": ReportDaily,
}


class Envelope(StrictModel):
    """The envelope every event carries. Documented for HQ in docs/EVENTS.md."""

    id: uuid.UUID = Field(description="UUIDv7: time-ordered, unique; HQ deduplicates by it.")
    store_id: str
    gateway_id: str
    seq: int = Field(ge=1, description="Per gateway: 1, 2, 3... at commit; never reused or skipped.")
    kind: Kind
    device_id: str | None = Field(description="The device that produced it; null for gateway-made events.")
    occurred_at: datetime | None = Field(description="Device time, as the device sent it, if it did.")
    recorded_at: datetime = Field(description="Gateway wall-clock time at commit (UTC).")
    boot_id: str = Field(description="Random per gateway process start; groups events of one boot.")
    clock_synced: bool = Field(description="False when recorded_at came from an unsynchronised clock.")
    mono_ns: int = Field(description="Monotonic clock at commit, ns since boot (orders events in a boot).")
    schema_: int = Field(alias="schema", description="Envelope schema version.")
    data: (
        PosSale
        | PosReturn
        | StockLevel
        | AlertRaised
        | DeviceStatus
        | GatewayStatus
        | StockAdjusted
        | DocumentUpdated
        | OutboxEvicted
        | ClockSynced
        | SensorReading
        | SensorSample
        | RfidInventory
        | StaffCheckin
        | BarcodeScanned
        | dict[str, Any]
    )


def envelope_json_schema() -> dict[str, Any]:
    """JSON Schema of the envelope and every payload, for `store-gateway config-schema --events`."""
    schema = Envelope.model_json_schema(by_alias=True)
    schema["title"] = "store-gateway event envelope"
    schema["$comment"] = "data is typed by kind: " + ", ".join(
        f"{k} -> {v.__name__}" for k, v in PAYLOADS.items()
    )
    return schema


_SALE_ADAPTER: Final = TypeAdapter(PosSale)
_RETURN_ADAPTER: Final = TypeAdapter(PosReturn)


def payload_adapter(kind: str) -> TypeAdapter[Any]:
    """The validator for one kind's ``data``."""
    if kind == "pos.sale":
        return _SALE_ADAPTER
    if kind == "pos.return":
        return _RETURN_ADAPTER
    return TypeAdapter(PAYLOADS[kind])


_last_v7_ms = 0
_last_v7_seq = 0


def uuid7(random_bits: int | None = None) -> str:
    """A UUIDv7 (RFC 9562) as text: 48-bit ms timestamp, a 12-bit counter that keeps ids monotonic within a
    millisecond (method 1 of RFC 9562 section 6.2), and 62 random bits from os.urandom (or ``random_bits``,
    which the journal draws for a whole commit with one os.urandom call)."""
    global _last_v7_ms, _last_v7_seq
    ms = time.time_ns() // 1_000_000
    if ms <= _last_v7_ms:
        ms = _last_v7_ms
        _last_v7_seq += 1
        if _last_v7_seq > 0xFFF:
            ms += 1
            _last_v7_seq = 0
    else:
        _last_v7_seq = 0
    _last_v7_ms = ms
    rand = (int.from_bytes(os.urandom(8)) if random_bits is None else random_bits) & 0x3FFF_FFFF_FFFF_FFFF
    h = "%032x" % (
        (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7000 << 64 | _last_v7_seq << 64 | 0x8000_0000_0000_0000 | rand
    )
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
