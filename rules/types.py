"""The rule types the engine knows: what each reads, and its functions (docs/RULES.md)."""

from __future__ import annotations

from typing import Final

from rules import cold_chain, sales, silent, stock, temperature, tills
from rules.engine import RuleType

SAMPLES: Final = frozenset({"sensor.sample"})

RULE_TYPES: Final[dict[str, RuleType]] = {
    "temperature": RuleType(SAMPLES, temperature.observe, temperature.fire),
    "silent": RuleType(
        SAMPLES | {"sensor.reading", "device.status"}, silent.observe, silent.fire, start=silent.start
    ),
    "register_silent": RuleType(
        frozenset({"pos.sale", "pos.return"}), tills.observe, tills.fire, start=tills.start
    ),
    "door_open": RuleType(SAMPLES, cold_chain.door_observe, cold_chain.door_fire),
    "battery_low": RuleType(SAMPLES, cold_chain.battery_observe, cold_chain.no_timer),
    "controller_alarm": RuleType(SAMPLES, cold_chain.alarm_observe, cold_chain.no_timer),
    "negative_stock": RuleType(
        frozenset({"stock.level"}), stock.negative_observe, cold_chain.no_timer, subject=stock.sku_subject
    ),
    "returns_spike": RuleType(
        frozenset({"pos.sale", "pos.return"}),
        sales.spike_observe,
        sales.spike_fire,
        subject=sales.store_subject,
    ),
}
