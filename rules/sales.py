"""The till rules, on ``pos.sale`` and ``pos.return``: ``returns_spike``.

Sales and returns are counted in one-minute buckets of the rules' clock, so the window slides without keeping
every receipt; the buckets that leave the window are dropped, and a timer re-checks the ratio when the oldest
one does, so a spike also ends while the tills are quiet.
"""

from __future__ import annotations

import math
from typing import Final

from gateway.kernel.events import PosReturn, PosSale
from gateway.kernel.model import StrictModel
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import ReturnsSpikeRule, RuleDefinition
from rules.engine import ACTIVE, Context, Track

BUCKET_S: Final = 60.0
STORE: Final = "store"
"""The subject of the store-wide rules."""


def store_subject(rule: RuleDefinition, event: Event) -> str | None:
    """The whole store, for the tills the rule selects (all by default)."""
    if event.device_id is not None and rule.select.devices and event.device_id not in rule.select.devices:
        return None
    return STORE


def spike_observe(ctx: Context, rule: RuleDefinition, track: Track, event: Event, model: StrictModel) -> None:
    assert isinstance(rule, ReturnsSpikeRule)
    if not isinstance(model, PosSale):
        return
    amount = float(abs(model.totals.total))
    slot = str(math.floor(ctx.now / BUCKET_S))
    # A new dict and a new list for this minute, not the ones in place: the engine writes a track whose data
    # compares different (the other minutes' lists are shared, unchanged).
    buckets = dict(track.data.get("buckets", {}))
    counts = list(buckets.get(slot, (0, 0.0, 0, 0.0)))
    buckets[slot] = counts
    track.data["buckets"] = buckets
    if isinstance(model, PosReturn):
        counts[2] += 1
        counts[3] += amount
    else:
        counts[0] += 1
        counts[1] += amount
    _check(ctx, rule, track, event.seq)


def spike_fire(ctx: Context, rule: RuleDefinition, track: Track) -> None:
    assert isinstance(rule, ReturnsSpikeRule)
    _check(ctx, rule, track, None)


def _check(ctx: Context, rule: ReturnsSpikeRule, track: Track, seq: int | None) -> None:
    oldest = math.floor((ctx.now - rule.window_s) / BUCKET_S)
    buckets: dict[str, list[float]] = track.data.get("buckets", {})
    first = min(map(int, buckets), default=None)
    if first is not None and first <= oldest:  # minutes left the window: drop them (a new dict)
        buckets = {s: c for s, c in buckets.items() if int(s) > oldest}
        track.data["buckets"] = buckets
        first = min(map(int, buckets), default=None)
    sales = sum(c[0] for c in buckets.values())
    sales_amount = sum(c[1] for c in buckets.values())
    returns = sum(c[2] for c in buckets.values())
    returns_amount = sum(c[3] for c in buckets.values())
    by_count = returns / sales if sales else 0.0
    by_amount = returns_amount / sales_amount if sales_amount else 0.0
    # Returns with no sale left in the window: no ratio to report, but not calm either.
    ratio = math.inf if returns and not sales else max(by_count, by_amount)
    spike = sales >= rule.min_sales and ratio > rule.max_ratio
    calm = ratio <= rule.clear_at  # whatever the number of sales: a quiet hour does not end a spike
    figures = {
        "sales": int(sales),
        "returns": int(returns),
        "ratio_by_count": round(by_count, 4),
        "ratio_by_amount": round(by_amount, 4),
        "window_s": rule.window_s,
        "seq": seq,
    }
    if spike and track.state != ACTIVE:
        ctx.raise_alert(
            rule,
            track,
            f"returns at {max(by_count, by_amount):.0%} of sales in the last {rule.window_s / 60:g} min"
            f" ({int(returns)} returns, {int(sales)} sales)",
            figures,
        )
    elif calm and track.state == ACTIVE:
        ctx.clear_alert(rule, track, f"returns back to {max(by_count, by_amount):.0%} of sales", figures)
    # Look again when the oldest bucket leaves the window (the ratio moves without a receipt).
    track.due = (first + 1) * BUCKET_S + rule.window_s if first is not None else None
