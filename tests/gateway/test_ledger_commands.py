"""HQ's stock.adjust on a real journal: the answer says what the stock ledger did with it."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from cloud_bridge.commands import CommandError, StockAdjust
from gateway.kernel.metrics import Metrics
from gateway.ledger.commands import stock_adjust
from gateway.ledger.stock import StockLedger
from tests.gateway.test_journal import new_journal, query, running, stock_ledger


async def test_an_adjustment_answers_the_new_on_hand(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(10, None))])
    async with running(journal):
        args = StockAdjust(sku="TEA", delta=Decimal(24), reason="receiving")
        assert await stock_adjust(journal, "req-1", args) == ("ok", {"seq": 1, "on_hand": "34"})
        assert await stock_adjust(journal, "req-1", args) == ("duplicate", {"seq": 1, "on_hand": "34"})


async def test_an_adjustment_the_ledger_failed_on_is_answered_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored (the event is evidence), but the stock did not move: HQ must not believe it did."""
    metrics = Metrics()
    journal = new_journal(tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(10, None))])

    def broken(self: StockLedger, seq: int, adjustment: object) -> None:
        raise RuntimeError("ledger bug")

    monkeypatch.setattr(StockLedger, "_adjust", broken)
    async with running(journal):
        args = StockAdjust(sku="TEA", delta=Decimal(24), reason="receiving")
        with pytest.raises(CommandError, match="skipped it") as refused:
            await stock_adjust(journal, "req-2", args)
        assert refused.value.code == "failed"
    assert query(journal, "SELECT on_hand FROM stock WHERE sku='TEA'") == [(10.0,)]
    kinds = [k for (k,) in query(journal, "SELECT kind FROM events ORDER BY seq")]
    assert kinds == ["stock.adjusted", "alert.raised"]
