"""The stock rules, on the stock ledger's ``stock.level``: ``negative_stock`` (data quality)."""

from __future__ import annotations

from gateway.kernel.events import StockLevel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import NegativeStockRule, RuleDefinition
from rules.engine import ACTIVE, Context, Track


def sku_subject(rule: RuleDefinition, event: Event) -> str | None:
    """The subject of a stock rule: the SKU, when the rule selects it."""
    level = event.model
    if not isinstance(level, StockLevel) or not rule.select.matches_sku(level.sku):
        return None
    return level.sku


def negative_observe(ctx: Context, rule: RuleDefinition, track: Track, event: Event) -> None:
    assert isinstance(rule, NegativeStockRule)
    level = event.model
    assert isinstance(level, StockLevel)
    if level.on_hand < 0 and track.state != ACTIVE:
        ctx.raise_alert(
            rule,
            track,
            f"{level.sku}: on hand {level.on_hand} is below zero (stock data is wrong: a missed delivery, a miscount)",
            {"on_hand": str(level.on_hand), "seq": event.seq, "cause_seqs": list(level.cause_seqs)},
        )
    elif level.on_hand >= 0 and track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{level.sku}: on hand {level.on_hand}", {"seq": event.seq})
