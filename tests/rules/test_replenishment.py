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
    rig: Rig, on_hand: str, sku: str = "TEA", safety: str | None = None, delta: str = "-1"
) -> list[StockReplenishmentDraft]:
    """A stock.level as the ledger derives it; the drafts the rules made of it."""
    rig.seq += 1
    model = StockLevel(
        sku=sku,
        on_hand=Decimal(on_hand),
        delta=Decimal(delta),
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
    assert level(rig, "3") == []  # on hand and on order: 21, above the reorder point
    assert level(rig, "-5", delta="-8") == []  # 13
    [more] = level(rig, "-14", delta="-9")  # 4: 20 + 14 - 18 = 16 missing, three packs
    assert (more.draft_id, more.quantity, more.open_before) == ("reorder/TEA/2", 18, 18)
    assert level(rig, "22", delta="36") == []  # both delivered: nothing on order any more
    [next_one] = level(rig, "5", delta="-17")
    assert (next_one.draft_id, next_one.quantity, next_one.open_before) == ("reorder/TEA/3", 18, 0)


def test_stock_hovering_at_the_reorder_point_orders_once(rig_at: Any, time: Time) -> None:
    rig = rig_at([FIXED])
    assert len(level(rig, "4")) == 1  # 18 on order
    assert level(rig, "6", delta="2") == []  # a customer's return: counted against what is on order (16)
    assert level(rig, "5") == []  # 5 + 16: far above the reorder point
    assert level(rig, "13", delta="8") == []  # part of the order arrived: 8 still on order
    assert level(rig, "4", delta="-9") == []  # 4 + 8 = 12
    [again] = level(rig, "-3", delta="-7")  # 5: 20 + 3 - 8 = 15 missing, three packs
    assert (again.quantity, again.open_before) == (18, 8)


def test_a_changed_rule_goes_on_numbering_and_knows_what_is_on_order(rig_at: Any, time: Time) -> None:
    rig = rig_at([FIXED])
    assert len(level(rig, "4")) == 1
    rig.conn.close()
    rig = rig_at([{**FIXED, "pack_size": 12}])
    assert level(rig, "3") == []  # still 18 on order
    [draft] = level(rig, "-14", delta="-17")
    assert (draft.draft_id, draft.quantity, draft.open_before) == ("reorder/TEA/2", 24, 18)


def test_draft_ids_keep_their_number_with_long_rule_ids_and_skus(rig_at: Any, time: Time) -> None:
    rule = {**FIXED, "id": "r" * 64}
    rig = rig_at([rule])
    sku = "S" * 64
    assert [d.draft_id for d in level(rig, "4", sku=sku)] == [f"{'r' * 64}/{sku}/1"]


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


async def test_velocity_counts_only_days_the_clock_knew_and_forgets_days_ahead(tmp_path: Path) -> None:
    rule = {"id": "reorder", "type": "replenishment", "velocity_days": 7}
    day: list[Any] = [20_000]
    async with gateway_journal(tmp_path / "journal.db", day, [rule]) as (journal, ledger):
        journal.submit(pos("R1", ("TEA", "7")))
        await journal.flush()
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.db")) as conn, conn:
        conn.execute(
            "INSERT INTO stock_sold_daily VALUES ('TEA', 30000, 70)"
        )  # a day "ahead": a clock set wrong
    async with gateway_journal(tmp_path / "journal.db", day, [rule]) as (journal, ledger):
        assert ledger.velocity("TEA", 7) == 1  # 7 in a week: the day ahead does not count
        day[0] = None  # the clock is not synchronised: the day is not known
        journal.submit(pos("R3", ("TEA", "700")))
        await journal.flush()
        assert ledger.velocity("TEA", 7) is None
        day[0] = 20_000
        journal.submit(pos("R4", ("TEA", "7")))  # the sale not counted while unsynced stays uncounted
        await journal.flush()
        assert ledger.velocity("TEA", 7) == 2
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.db")) as conn:
        assert conn.execute("SELECT day, sold FROM stock_sold_daily").fetchall() == [(20_000, 14.0)]


def test_stock_rules_select_skus_and_the_stock_low_id_is_reserved() -> None:
    from cloud_bridge.documents import RuleSet
    from gateway.kernel.rule_config import RuleFile

    adapter = TypeAdapter(RuleDefinition)
    with pytest.raises(ValidationError, match=r"selects SKUs \(select.skus\), not devices"):
        adapter.validate_python({"id": "neg", "type": "negative_stock", "select": {"devices": ["pos-1"]}})
    with pytest.raises(ValidationError, match=r"is the stock\.low alerts. own"):
        RuleFile.model_validate({"rules": [{"id": "stock.low", "type": "negative_stock"}]})
    with pytest.raises(ValidationError, match=r"is the stock\.low alerts. own"):
        RuleSet.model_validate({"rules": [{"id": "stock.low", "type": "negative_stock"}]})
    # HQ's threshold rule may be so named
    threshold = {"id": "stock.low", "type": "stock.low", "threshold": 3}
    RuleSet.model_validate({"rules": [threshold]})
