"""The stock rules, on the stock ledger's ``stock.level``: ``stock.low`` (at or below safety stock) and
``negative_stock`` (data quality)."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from typing import Any

from gateway.kernel.events import StockLevel, StockReplenishmentDraft
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import NegativeStockRule, ReplenishmentRule, RuleDefinition, StockLowAlerts
from rules.engine import ACTIVE, Context, Track


def sku_subject(rule: RuleDefinition, event: Event) -> str | None:
    """The subject of a stock rule: the SKU, when the rule selects it."""
    level = event.model
    if not isinstance(level, StockLevel) or not rule.select.matches_sku(level.sku):
        return None
    return level.sku


def low_observe(ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel) -> None:
    """At or below the SKU's safety stock raises; above it (or no threshold any more) clears."""
    assert isinstance(rule, StockLowAlerts)
    level = model
    assert isinstance(level, StockLevel)
    on_hand = format(level.on_hand, "f")
    safety = None if level.safety_stock is None else format(level.safety_stock, "f")
    low = level.safety_stock is not None and level.on_hand <= level.safety_stock
    evidence = {
        "on_hand": on_hand,
        "safety_stock": safety,
        "seq": event.seq,
        "cause_seqs": list(level.cause_seqs),
    }
    if low and track.state != ACTIVE:
        ctx.raise_alert(
            rule, track, f"{level.sku}: on hand {on_hand} is at or below safety stock {safety}", evidence
        )
    elif not low and track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"{level.sku}: on hand {on_hand}, above safety stock {safety}", evidence)


def negative_observe(
    ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel
) -> None:
    assert isinstance(rule, NegativeStockRule)
    level = model
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


def replenish_observe(
    ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel
) -> None:
    """The inventory position (on-hand plus the open drafts: what is on order) at or below the reorder point: a
    draft for what is missing up to the order-up-to level, in whole packs. Stock that rises (a delivery, a
    return) counts against the oldest open drafts, unit for unit; a draft not delivered after ``open_days`` is
    dropped (an order that never came is suggested again)."""
    assert isinstance(rule, ReplenishmentRule)
    level = model
    assert isinstance(level, StockLevel)
    reorder = _dec(rule.reorder_point) if rule.reorder_point is not None else level.safety_stock
    kept = [d for d in track.data.get("open", []) if ctx.now - float(d[1]) < rule.open_s]
    open_drafts = _received(kept, level.delta) if level.delta > 0 else kept
    if open_drafts != track.data.get("open", []):
        track.data = {**track.data, "open": open_drafts}
    on_order = sum((Decimal(d[0]) for d in open_drafts), Decimal(0))
    if reorder is None or level.on_hand + on_order > reorder:
        return
    velocity: Decimal | None = None
    if rule.order_up_to is not None:
        up_to = _dec(rule.order_up_to)
    else:
        assert rule.velocity_days is not None
        velocity = ctx.velocity(level.sku, rule.velocity_days)
        if velocity is None:
            return  # no sales history here (a backtest without the ledger)
        safety = (
            _dec(rule.safety_stock) if rule.safety_stock is not None else level.safety_stock or Decimal(0)
        )
        up_to = velocity * _dec(rule.lead_time_days + rule.review_days) + safety
    missing = up_to - level.on_hand - on_order
    if missing <= 0:
        return
    pack = _dec(rule.pack_size)
    quantity = (missing / pack).to_integral_value(ROUND_CEILING) * pack
    number = int(track.data.get("n", 0)) + 1
    ctx.emit(
        StockReplenishmentDraft(
            draft_id=f"{rule.id}/{level.sku}/{number}",
            rule_id=rule.id,
            sku=level.sku,
            quantity=_plain(quantity),
            on_hand=level.on_hand,
            reorder_point=_plain(reorder),
            order_up_to=_plain(up_to.quantize(Decimal("0.001"))),
            open_before=_plain(on_order),
            pack_size=_plain(pack),
            velocity_per_day=None if velocity is None else _plain(velocity.quantize(Decimal("0.001"))),
            seq=event.seq,
        )
    )
    track.data = {**track.data, "n": number, "open": [*open_drafts, [format(quantity, "f"), ctx.now]]}


def _received(drafts: list[list[Any]], units: Decimal) -> list[list[Any]]:
    """The open drafts after ``units`` arrived: the oldest are delivered first, the last one maybe in part."""
    left = units
    out: list[list[Any]] = []
    for quantity, at in drafts:
        still = Decimal(str(quantity)) - left
        left = max(Decimal(0), -still)
        if still > 0:
            out.append([format(still, "f"), at])
    return out


def _dec(value: float) -> Decimal:
    return Decimal(repr(value))


def _plain(value: Decimal) -> Decimal:
    """No exponent, no trailing zeros: 10 not 1E+1, 2.5 not 2.500."""
    return Decimal(format(value.normalize(), "f")) if value else Decimal(0)
