"""The rule types the engine knows: what each reads, and its two functions (docs/RULES.md)."""

from __future__ import annotations

from typing import Final

from rules import silent, temperature
from rules.engine import RuleType

RULE_TYPES: Final[dict[str, RuleType]] = {
    "temperature": RuleType(frozenset({"sensor.sample"}), temperature.observe, temperature.fire),
    "silent": RuleType(
        frozenset({"sensor.sample", "sensor.reading", "device.status"}), silent.observe, silent.fire
    ),
}
