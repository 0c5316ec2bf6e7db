"""Replenishment drafts: at the reorder point, what is missing up to the order-up-to level in whole packs,
counting open drafts; the order-up-to level fixed or from the stock ledger's sales velocity (kept across
restarts); exactly one draft per need, on a real SQLite file and through a real journal."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from gateway.kernel.clock import ClockState
from gateway.kernel.config import JournalConfig
from gateway.kernel.events import StockLevel, StockReplenishmentDraft
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.pipeline import Event
from gateway.kernel.rule_config import RuleDefinition
from gateway.ledger.config import StockConfig, StockItem
from gateway.ledger.stock import StockLedger
from rules.clock import RuleClock
from rules.engine import RuleEngine
from tests.gateway.test_pipeline import Writer
from tests.gateway.test_stock import pos
from tests.rules.conftest import Rig, Time

FIXED = {"id": "reorder", "type": "replenishment", "reorder_point": 5, "order_up_to": 20, "pack_size": 6}


def level(
    rig: Rig, on_hand: str, sku: str = "TEA", safety: str | None = None
) -> list[StockReplenishmentDraft]:
    """A stock.level as the ledger derives it; the drafts the rules made of it."""
    rig.seq += 1
    model = StockLevel(
        sku=sku,
        on_hand=Decimal(on_hand),
        delta=Decimal(-1),
        safety_stock=None if safety is None else Decimal(safety),
        cause_seqs=(rig.seq, rig.seq),
    )
    event = Event(rig.seq, "stock.level", None, model.model_dump_json().encode(), model)
    writer = Writer(rig.seq)
    rig.conn.execute("BEGIN IMMEDIATE")
    rig.pipeline.run(rig.conn, [event], writer.append)
    rig.conn.execute("COMMIT")
    rig.pipeline.committed()
    rig.seq = writer.last_seq
    return [e.model for e in writer.emitted if isinstance(e.model, StockReplenishmentDraft)]


def test_a_draft_at_the_reorder_point_in_whole_packs_counting_open_drafts(rig_at: Any, time: Time) -> None:
    rig = rig_at([FIXED])
    assert level(rig, "10") == []
    [draft] = level(rig, "4")  # 20 - 4 = 16 missing: 3 packs of 6
    assert (draft.draft_id, draft.quantity, draft.open_before, draft.seq) == ("reorder/TEA/1", 18, 0, 2)
    assert (draft.order_up_to, draft.reorder_point, draft.pack_size) == (20, 5, 6)
    assert level(rig, "3") == []  # 20 - 3 - 18 on order: nothing more
    [more] = level(rig, "-5")  # sold 8 more: 25 missing, 18 on order: 7 more, two packs
    assert (more.draft_id, more.quantity, more.open_before) == ("reorder/TEA/2", 12, 18)
    assert level(rig, "30") == []  # the goods arrived: the open drafts close
    [next_one] = level(rig, "5")
    assert (next_one.draft_id, next_one.quantity, next_one.open_before) == ("reorder/TEA/3", 18, 0)


def test_open_drafts_expire_and_survive_a_restart(rig_at: Any, time: Time) -> None:
    rule = {**FIXED, "open_days": 2}
    rig = rig_at([rule])
    assert len(level(rig, "4")) == 1
    rig.conn.close()
    rig = rig_at([rule])
    assert level(rig, "4") == []  # still on order after the restart
    time.advance(2 * 86_400)  # never delivered: suggested again
    [again] = level(rig, "4")
    assert (again.draft_id, again.open_before) == ("reorder/TEA/2", 0)


def test_the_reorder_point_defaults_to_the_skus_safety_stock(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "reorder", "type": "replenishment", "order_up_to": 12}])
    assert level(rig, "4") == []  # no reorder point and no safety stock: nothing to compare with
    assert level(rig, "4", safety="3") == []
    [draft] = level(rig, "3", safety="3")
    assert (draft.quantity, draft.reorder_point) == (9, 3)


def test_a_rule_needs_one_order_up_to_level() -> None:
    adapter = TypeAdapter(RuleDefinition)
    with pytest.raises(ValidationError, match="either order_up_to"):
        adapter.validate_python({"id": "r", "type": "replenishment"})
    with pytest.raises(ValidationError, match="either order_up_to"):
        adapter.validate_python({"id": "r", "type": "replenishment", "order_up_to": 9, "velocity_days": 7})
    with pytest.raises(ValidationError, match="above reorder_point"):
        adapter.validate_python({"id": "r", "type": "replenishment", "order_up_to": 5, "reorder_point": 5})


@contextlib.asynccontextmanager
async def gateway_journal(path: Path, day: list[int], rules: list[dict[str, Any]]) -> Any:
    """The stock ledger and the rules in a real journal, as the runtime wires them (the ledger's day moved by
    the test)."""
    metrics = Metrics()
    ledger = StockLedger(
        StockConfig(items=[StockItem(sku="TEA", on_hand=100, safety_stock=10)]), metrics, today=lambda: day[0]
    )
    defs = [TypeAdapter(RuleDefinition).validate_python(r) for r in rules]
    engine = RuleEngine(defs, RuleClock(lambda: True), velocity=ledger.velocity)
    journal = Journal(
        path, "hk-0042", "gw-1", JournalConfig(), metrics, [ledger, engine], ClockState(override=True)
    )
    await journal.open()
    writer = asyncio.create_task(journal.run())
    try:
        yield journal, ledger
    finally:
        async with asyncio.timeout(20):
            await journal.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()


async def test_the_order_up_to_level_from_sales_velocity_kept_by_the_ledger(tmp_path: Path) -> None:
    rule = {
        "id": "reorder",
        "type": "replenishment",
        "velocity_days": 7,
        "lead_time_days": 2,
        "review_days": 5,
        "reorder_point": 40,
        "pack_size": 12,
    }
    day = [20_000]
    receipt = iter(range(1, 1000))
    async with gateway_journal(tmp_path / "journal.db", day, [rule]) as (journal, ledger):
        for _ in range(6):  # 8 a day for six days (and the returns take off)
            journal.submit(pos(f"R{next(receipt)}", ("TEA", "9")))
            journal.submit(pos(f"R{next(receipt)}", ("TEA", "1"), kind="return"))
            await journal.flush()
            day[0] += 1
    async with gateway_journal(tmp_path / "journal.db", day, [rule]) as (journal, ledger):
        assert ledger.velocity("TEA", 7) == Decimal(48) / 7  # kept across the restart
        journal.submit(pos(f"R{next(receipt)}", ("TEA", "14")))  # day 7: 62 -> 38, at the reorder point
        await journal.flush()
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.db")) as conn:
        rows = conn.execute("SELECT body FROM events WHERE kind='stock.replenishment_draft'").fetchall()
    [draft] = [orjson.loads(body)["data"] for (body,) in rows]
    # 62 sold over the last 7 days: 62/7 a day x (2 + 5) days + safety 10 = 72; 72 - 38 = 34: 3 packs of 12
    assert (draft["velocity_per_day"], draft["order_up_to"], draft["quantity"]) == ("8.857", "72", "36")
