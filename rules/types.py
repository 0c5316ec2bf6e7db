"""The rule types the engine knows: what each reads, and its functions (docs/RULES.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from rules import attendance, cold_chain, sales, shelves, silent, stock, temperature, tills
from rules.engine import Context, Observe, RuleType, Track

SAMPLES: Final = frozenset({"sensor.sample"})
RFID: Final = frozenset({"rfid.inventory"})


def on(observe: Callable[[Context, Any, Track, Event, StrictModel], None]) -> Observe:
    """An ``observe`` that takes its own rule model: the engine only ever gives it the rules of its type (the
    registry below pairs them), so the hottest functions skip an isinstance check on every reading."""
    return observe


RULE_TYPES: Final[dict[str, RuleType]] = {
    "temperature": RuleType(SAMPLES, on(temperature.observe), temperature.fire),
    "silent": RuleType(
        SAMPLES | {"sensor.reading", "device.status"},
        on(silent.observe),
        silent.fire,
        start=silent.start,
        recover=silent.recover,
    ),
    "register_silent": RuleType(
        frozenset({"pos.sale", "pos.return"}),
        tills.observe,
        tills.fire,
        start=tills.start,
        recover=tills.recover,
    ),
    "door_open": RuleType(SAMPLES, on(cold_chain.door_observe), cold_chain.door_fire),
    "battery_low": RuleType(SAMPLES, on(cold_chain.battery_observe), cold_chain.no_timer),
    "controller_alarm": RuleType(SAMPLES, on(cold_chain.alarm_observe), cold_chain.no_timer),
    "stock.low": RuleType(
        frozenset({"stock.level"}), stock.low_observe, cold_chain.no_timer, subject=stock.sku_subject
    ),
    "replenishment": RuleType(
        frozenset({"stock.level"}),
        stock.replenish_observe,
        cold_chain.no_timer,
        subject=stock.sku_subject,
        keep=frozenset(
            {"n", "open"}
        ),  # a changed rule goes on numbering its drafts, and knows what is on order
    ),
    "negative_stock": RuleType(
        frozenset({"stock.level"}), stock.negative_observe, cold_chain.no_timer, subject=stock.sku_subject
    ),
    "returns_spike": RuleType(
        frozenset({"pos.sale", "pos.return"}),
        sales.spike_observe,
        sales.spike_fire,
        subject=sales.store_subject,
    ),
    "shelf_low": RuleType(
        RFID, shelves.unused, cold_chain.no_timer, many=shelves.levels_observe, replan=shelves.levels_replan
    ),
    "shelf_empty": RuleType(
        RFID, shelves.unused, cold_chain.no_timer, many=shelves.levels_observe, replan=shelves.levels_replan
    ),
    "possible_shrink": RuleType(
        RFID | {"pos.sale"},
        shelves.unused,
        shelves.shrink_fire,
        many=shelves.shrink_observe,
        replan=shelves.shrink_replan,
        start=shelves.shrink_start,
        any_device=frozenset({"pos.sale"}),
    ),
    "misplaced": RuleType(
        RFID,
        shelves.unused,
        cold_chain.no_timer,
        many=shelves.misplaced_observe,
        replan=shelves.misplaced_replan,
    ),
    "attendance": RuleType(
        frozenset({"staff.checkin"}),
        attendance.unused,
        attendance.fire,
        many=attendance.checkin,
        reroster=attendance.reroster,
        keep=attendance.KEEP,
    ),
}
