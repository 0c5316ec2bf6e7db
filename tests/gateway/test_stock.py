"""The stock ledger inside real journal commits: initial levels, sales and returns moved exactly once,
stock.level and stock.low events, decimal quantities, and the state after a restart or a kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.kernel.clock import ClockState
from gateway.kernel.config import JournalConfig
from gateway.kernel.events import AlertRaised, StockLevel
from gateway.kernel.journal import Draft, Journal
from gateway.kernel.metrics import Metrics
from gateway.ledger.config import StockConfig, StockItem
from gateway.ledger.stock import StockConfigError, StockLedger, read_initial_csv
from rules.clock import RuleClock
from rules.engine import RuleEngine
from tests.harness.pos_drafts import pos_draft

# --- helpers --------------------------------------------------------------------------------------


def config(
    *items: tuple[str, float, float | None], csv: Path | None = None, default: float | None = None
) -> StockConfig:
    return StockConfig(
        initial_csv=csv,
        items=[StockItem(sku=sku, on_hand=on_hand, safety_stock=safety) for sku, on_hand, safety in items],
        default_safety_stock=default,
    )


class Store:
    """A journal with a stock ledger on one data directory, as the runtime wires them."""

    def __init__(self, path: Path, stock: StockConfig) -> None:
        self.metrics = Metrics()
        self.ledger = StockLedger(stock, self.metrics)
        self.rules = RuleEngine([stock.low_alert], RuleClock(lambda: True))  # raises and clears stock.low
        self.journal = Journal(
            path / "journal.db",
            "hk-0042",
            "gw-1",
            JournalConfig(),
            self.metrics,
            [self.ledger, self.rules],
            ClockState(override=True),
        )

    def submit(self, *drafts: Draft) -> None:
        for draft in drafts:
            assert self.journal.submit(draft)

    async def commit(self, *drafts: Draft) -> None:
        """Submit drafts together (one group commit) and wait for it."""
        self.submit(*drafts)
        async with asyncio.timeout(20):
            await self.journal.flush()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with contextlib.closing(sqlite3.connect(self.journal.path)) as conn:
            return conn.execute(sql, params).fetchall()

    def events(self, kind: str, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        rows = self.rows("SELECT seq, body FROM events WHERE kind=? AND seq>? ORDER BY seq", (kind, after))
        return [(seq, orjson.loads(body)["data"]) for seq, body in rows]

    def levels(self, after: int = 0) -> list[dict[str, Any]]:
        found = [data for _, data in self.events("stock.level", after)]
        for data in found:
            StockLevel.model_validate(data)
        return found

    def alerts(self, after: int = 0) -> list[dict[str, Any]]:
        found = [data for _, data in self.events("alert.raised", after)]
        for data in found:
            AlertRaised.model_validate(data)
        return found

    def stock(self) -> dict[str, tuple[float, float | None, int]]:
        return {
            sku: (on_hand, safety, low)
            for sku, on_hand, safety, low in self.rows("SELECT sku, on_hand, safety_stock, low FROM stock")
        }

    def unknown_sku_count(self) -> float:
        return self.metrics.registry.get_sample_value("storegw_stock_unknown_sku_total") or 0.0


@contextlib.asynccontextmanager
async def store(path: Path, stock: StockConfig) -> AsyncIterator[Store]:
    s = Store(path, stock)
    await s.journal.open()
    writer = asyncio.create_task(s.journal.run(), name="journal-writer-under-test")
    try:
        yield s
        async with asyncio.timeout(20):
            await s.journal.flush()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await s.journal.close()


def pos(receipt: str, *lines: tuple[str, str], kind: str = "sale", device: str = "pos1") -> Draft:
    return pos_draft(receipt, lines, kind=kind, device=device)


def ret(receipt: str, *lines: tuple[str, str]) -> Draft:
    return pos(receipt, *lines, kind="return")


def sums_of_events(s: Store) -> dict[str, Decimal]:
    """The net quantity each SKU moved, recomputed from the committed sale and return events."""
    moved: dict[str, Decimal] = {}
    for kind, sign in (("pos.sale", -1), ("pos.return", 1)):
        for _, data in s.events(kind):
            for line in data["lines"]:
                moved[line["sku"]] = moved.get(line["sku"], Decimal(0)) + sign * Decimal(line["quantity"])
    return moved


# --- initial levels -------------------------------------------------------------------------------


async def test_initial_levels_from_config_items(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, 2), ("RICE", 5.5, None), default=1)) as s:
        # NULL threshold = "the configured default", resolved at load (so a changed default applies).
        assert s.stock() == {"TEA": (10.0, 2.0, 0), "RICE": (5.5, None, 0)}
        assert s.rows("SELECT COUNT(*) FROM events") == [(0,)]
        await s.commit(pos("R1", ("RICE", "0.5")))
        assert s.levels() == [
            {"sku": "RICE", "on_hand": "5", "delta": "-0.5", "safety_stock": "1", "cause_seqs": [1, 1]}
        ]


def test_read_initial_csv_with_header_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_text(
        "sku,on_hand,safety_stock\n"
        "# counted on 2024-05-01\n"
        "\n"
        "TEA-100G,24,6\n"
        " RICE-KG , 12.5 ,\n"
        "SOAP,3\n"
        ",,\n"
        "# SKU,on_hand\n"
        "GLOVES,0,0\n",
        encoding="utf-8",
    )
    assert read_initial_csv(path) == [
        ("TEA-100G", 24.0, 6.0),
        ("RICE-KG", 12.5, None),
        ("SOAP", 3.0, None),
        ("GLOVES", 0.0, 0.0),
    ]


def test_read_initial_csv_with_crlf_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_bytes(b"SKU,On_Hand\r\nTEA,1\r\nRICE,2,1\r\n")
    assert read_initial_csv(path) == [("TEA", 1.0, None), ("RICE", 2.0, 1.0)]


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("sku,on_hand\nTEA,1\nRICE\n", 3),
        ("TEA,ten\n", 1),
        ("sku,on_hand\n\n# note\nTEA,1\nRICE,2,lots\n", 5),
        ("TEA,\n", 1),
    ],
)
def test_bad_csv_rows_name_file_and_line(tmp_path: Path, content: str, line: int) -> None:
    path = tmp_path / "stock.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(StockConfigError) as info:
        read_initial_csv(path)
    assert str(info.value).startswith(f"{path}:{line}: expected sku,on_hand[,safety_stock]")


def test_missing_csv_is_a_stock_config_error(tmp_path: Path) -> None:
    with pytest.raises(StockConfigError, match="cannot read"):
        read_initial_csv(tmp_path / "absent.csv")


async def test_a_bad_csv_stops_the_journal_from_opening(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_text("sku,on_hand\nTEA,x\n", encoding="utf-8")
    s = Store(tmp_path, config(csv=path))
    with pytest.raises(StockConfigError, match=r"stock\.csv:2:"):
        await s.journal.open()
    await s.journal.close()


def test_csv_saved_by_excel_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_text("sku,on_hand,safety_stock\nTEA,24,6\n", encoding="utf-8-sig")
    assert read_initial_csv(path) == [("TEA", 24.0, 6.0)]


@pytest.mark.parametrize("row", ["TEA,nan", "TEA,inf", "TEA,-inf", "TEA,1,-5", "TEA,1,nan"])
def test_csv_refuses_non_finite_and_negative_values(tmp_path: Path, row: str) -> None:
    """float() takes 'nan' and 'inf': a NaN on_hand used to drop the SKU silently (SQLite stores NULL and
    INSERT OR IGNORE ignores the NOT NULL failure), 'inf' broke Journal.open() with InvalidOperation."""
    path = tmp_path / "stock.csv"
    path.write_text(f"sku,on_hand,safety_stock\n{row}\n", encoding="utf-8")
    with pytest.raises(StockConfigError, match=r"stock\.csv:2:"):
        read_initial_csv(path)


async def test_initial_levels_from_csv_and_items(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_text("sku,on_hand,safety_stock\nTEA,24,6\nRICE,12.5\n", encoding="utf-8")
    async with store(tmp_path, config(("SOAP", 3, 1), csv=path)) as s:
        assert s.stock() == {"TEA": (24.0, 6.0, 0), "RICE": (12.5, None, 0), "SOAP": (3.0, 1.0, 0)}


async def test_initial_levels_apply_once_but_thresholds_follow_config(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, 2))) as s:
        await s.commit(pos("R1", ("TEA", "3")))
    async with store(tmp_path, config(("TEA", 100, 5), ("RICE", 8, None))) as s:
        assert s.stock() == {"TEA": (7.0, 5.0, 0), "RICE": (8.0, None, 0)}
        await s.commit(pos("R2", ("TEA", "1")))
        assert s.levels(after=2)[-1] == {
            "sku": "TEA",
            "on_hand": "6",
            "delta": "-1",
            "safety_stock": "5",
            "cause_seqs": [3, 3],
        }


async def test_changed_default_threshold_applies_on_restart(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None), default=2)) as s:
        await s.commit(pos("R1", ("TEA", "4")), pos("R2", ("NEW", "1")))
        assert [lv["safety_stock"] for lv in s.levels()] == ["2", "2"]
        assert [a["subject"] for a in s.alerts()] == ["NEW"]
    async with store(tmp_path, config(("TEA", 10, None), default=5)) as s:
        await s.commit(pos("R3", ("TEA", "1")), pos("R4", ("NEW", "1")))
        assert [lv["safety_stock"] for lv in s.levels(after=4)] == ["5", "5"]
        assert [a["subject"] for a in s.alerts()] == ["NEW", "TEA"]


async def test_removing_a_sku_threshold_falls_back_to_the_default(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, 8), default=1)) as s:
        assert s.stock()["TEA"][1] == 8.0
    async with store(tmp_path, config(("TEA", 10, None), default=1)) as s:
        await s.commit(pos("R1", ("TEA", "5")))
        assert s.levels()[0]["safety_stock"] == "1"
        assert s.alerts() == []


# --- sales and returns move stock exactly once ----------------------------------------------------


async def test_sale_lowers_and_return_raises_exactly_once(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None))) as s:
        await s.commit(pos("R1", ("TEA", "2")))
        await s.commit(ret("R1", ("TEA", "1")))
        await s.commit(pos("R1", ("TEA", "2")), ret("R1", ("TEA", "1")))
        assert s.stock()["TEA"][0] == 9.0
        assert [lv["on_hand"] for lv in s.levels()] == ["8", "9"]
    async with store(tmp_path, config(("TEA", 10, None))) as s:
        await s.commit(pos("R1", ("TEA", "2")))
        assert s.stock()["TEA"][0] == 9.0
        assert s.levels(after=4) == []
        await s.commit(pos("R2", ("TEA", "4")))
        assert s.stock()["TEA"][0] == 5.0
        assert s.levels(after=4)[0]["on_hand"] == "5"


async def test_same_receipt_number_from_two_tills_are_two_sales(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None))) as s:
        await s.commit(pos("R1", ("TEA", "1"), device="pos1"), pos("R1", ("TEA", "1"), device="pos2"))
        assert s.stock()["TEA"][0] == 8.0


async def test_events_other_than_sales_and_returns_do_not_move_stock(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None))) as s:
        await s.commit(Draft("device.status", "pos1", orjson.dumps({"status": "online"})))
        assert s.levels() == []
        assert s.stock()["TEA"] == (10.0, None, 0)


# --- stock.level events ---------------------------------------------------------------------------


async def test_one_stock_level_per_sku_per_commit(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None), ("RICE", 5, 1))) as s:
        await s.commit(
            pos("R1", ("TEA", "1")),
            pos("R2", ("RICE", "1.5"), ("TEA", "2.000")),
            pos("R3", ("TEA", "0.5")),
        )
        rows = s.rows("SELECT seq, kind FROM events ORDER BY seq")
        assert rows == [
            (1, "pos.sale"),
            (2, "pos.sale"),
            (3, "pos.sale"),
            (4, "stock.level"),
            (5, "stock.level"),
        ]
        assert s.levels() == [
            {"sku": "TEA", "on_hand": "6.5", "delta": "-3.5", "safety_stock": None, "cause_seqs": [1, 3]},
            {"sku": "RICE", "on_hand": "3.5", "delta": "-1.5", "safety_stock": "1", "cause_seqs": [2, 2]},
        ]
        await s.commit(pos("R4", ("TEA", "1.5")))
        assert s.levels(after=5) == [
            {"sku": "TEA", "on_hand": "5", "delta": "-1.5", "safety_stock": None, "cause_seqs": [6, 6]}
        ]


async def test_sale_and_return_netting_to_zero_still_report_a_level(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None))) as s:
        await s.commit(pos("R1", ("TEA", "2")), ret("R9", ("TEA", "2")))
        assert s.levels() == [
            {"sku": "TEA", "on_hand": "10", "delta": "0", "safety_stock": None, "cause_seqs": [1, 2]}
        ]


@pytest.mark.parametrize(
    ("initial", "sold", "on_hand", "delta"),
    [
        (10, "10", "0", "-10"),
        (10, "11.5", "-1.5", "-11.5"),
        (1_000_000, "1", "999999", "-1"),
        (2_000_000, "1000000", "1000000", "-1000000"),
        (0.5, "0.250", "0.25", "-0.25"),
        (100, "0.001", "99.999", "-0.001"),
    ],
)
async def test_level_text_has_no_exponent_or_trailing_zeros(
    tmp_path: Path, initial: float, sold: str, on_hand: str, delta: str
) -> None:
    async with store(tmp_path, config(("TEA", initial, None))) as s:
        await s.commit(pos("R1", ("TEA", sold)))
        level = s.levels()[0]
        assert (level["on_hand"], level["delta"]) == (on_hand, delta)


# --- stock.low alerts -----------------------------------------------------------------------------


async def test_low_stock_raises_once_per_downward_crossing_and_clears_above_it(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, 5))) as s:
        await s.commit(pos("R1", ("TEA", "4")))
        assert s.alerts() == []
        await s.commit(pos("R2", ("TEA", "1")))
        assert s.alerts() == [
            {
                "rule": "stock.low",
                "severity": "warning",
                "subject": "TEA",
                "message": "TEA: on hand 5 is at or below safety stock 5",
                "details": {
                    "alert_id": "stock.low/TEA/1",
                    "rule_id": "stock.low",
                    "episode": 1,
                    "channels": [],
                    "on_hand": "5",
                    "safety_stock": "5",
                    "seq": 4,
                    "cause_seqs": [3, 3],
                },
            }
        ]
        kinds = [k for _, k in s.rows("SELECT seq, kind FROM events WHERE seq > 2 ORDER BY seq")]
        assert kinds == ["pos.sale", "stock.level", "alert.raised"]
        assert s.stock()["TEA"] == (5.0, 5.0, 1)
        await s.commit(pos("R3", ("TEA", "1")))
        await s.commit(pos("R4", ("TEA", "3")))
        assert len(s.alerts()) == 1
        await s.commit(ret("R4", ("TEA", "3.5")))
        assert s.stock()["TEA"] == (4.5, 5.0, 1)
        assert s.events("alert.cleared") == []
        await s.commit(ret("R3", ("TEA", "1")))
        assert s.stock()["TEA"] == (5.5, 5.0, 0)
        [(_, cleared)] = s.events("alert.cleared")
        assert (cleared["alert_id"], cleared["message"]) == (
            "stock.low/TEA/1",
            "TEA: on hand 5.5, above safety stock 5",
        )
        assert len(s.alerts()) == 1
        await s.commit(pos("R5", ("TEA", "0.5")))
        alerts = s.alerts()
        assert len(alerts) == 2
        assert alerts[1]["message"] == "TEA: on hand 5 is at or below safety stock 5"
        assert alerts[1]["details"]["alert_id"] == "stock.low/TEA/2"


async def test_low_state_survives_a_restart(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, 5))) as s:
        await s.commit(pos("R1", ("TEA", "6")))
        assert len(s.alerts()) == 1
    async with store(tmp_path, config(("TEA", 10, 5))) as s:
        await s.commit(pos("R2", ("TEA", "1")))
        assert len(s.alerts()) == 1
        await s.commit(ret("R2", ("TEA", "5")))
    async with store(tmp_path, config(("TEA", 10, 5))) as s:
        assert s.stock()["TEA"] == (8.0, 5.0, 0)
        await s.commit(pos("R3", ("TEA", "4")))
        assert len(s.alerts()) == 2


async def test_alert_when_the_first_sale_finds_stock_already_low(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 1, 2))) as s:
        await s.commit(pos("R1", ("TEA", "0.5")))
        assert [(a["details"]["on_hand"], a["details"]["safety_stock"]) for a in s.alerts()] == [("0.5", "2")]


async def test_one_alert_per_sku_in_one_commit(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 3, 1), ("RICE", 3, 1), ("SOAP", 3, None))) as s:
        await s.commit(
            pos("R1", ("TEA", "1"), ("RICE", "2"), ("SOAP", "3")),
            pos("R2", ("TEA", "1"), ("RICE", "1")),
        )
        assert sorted(a["subject"] for a in s.alerts()) == ["RICE", "TEA"]


async def test_no_threshold_no_alert(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 1, None))) as s:
        await s.commit(pos("R1", ("TEA", "5")))
        assert s.alerts() == []
        assert s.stock()["TEA"] == (-4.0, None, 0)


async def test_threshold_zero_alerts_when_stock_runs_out(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 2, 0))) as s:
        await s.commit(pos("R1", ("TEA", "1")))
        assert s.alerts() == []
        await s.commit(pos("R2", ("TEA", "1")))
        assert [a["details"]["on_hand"] for a in s.alerts()] == ["0"]


# --- unknown SKUs ---------------------------------------------------------------------------------


async def test_unknown_sku_is_counted_and_tracked(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, None), default=0)) as s:
        await s.commit(pos("R1", ("NEW-1", "2"), ("TEA", "1")))
        assert s.unknown_sku_count() == 1
        assert s.stock()["NEW-1"] == (-2.0, None, 1)
        assert s.levels()[0]["safety_stock"] == "0"
        assert [a["subject"] for a in s.alerts()] == ["NEW-1"]
        await s.commit(pos("R2", ("NEW-1", "1")), ret("R3", ("NEW-2", "1")))
        assert s.unknown_sku_count() == 2
        assert s.stock()["NEW-1"][0] == -3.0
        assert s.stock()["NEW-2"] == (1.0, None, 0)
    async with store(tmp_path, config(("TEA", 10, None), default=0)) as s:
        await s.commit(pos("R4", ("NEW-2", "1")))
        assert s.unknown_sku_count() == 0
        assert s.stock()["NEW-2"][0] == 0.0


# --- decimal quantities ---------------------------------------------------------------------------


async def test_weighed_goods_in_decimal_kilograms(tmp_path: Path) -> None:
    async with store(tmp_path, config(("RICE-KG", 10, None))) as s:
        await s.commit(pos("R1", ("RICE-KG", "1.5")))
        assert s.levels()[-1]["on_hand"] == "8.5"
        await s.commit(ret("R1", ("RICE-KG", "0.25")))
        assert s.levels()[-1]["on_hand"] == "8.75"
        assert s.stock()["RICE-KG"][0] == 8.75


async def test_decimal_steps_add_up_exactly_across_restarts(tmp_path: Path) -> None:
    for i in range(3):
        async with store(tmp_path, config(("RICE-KG", 1, None))) as s:
            await s.commit(pos(f"R{i}", ("RICE-KG", "0.1")))
            await s.commit(pos(f"S{i}", ("RICE-KG", "0.2")))
    assert [lv["on_hand"] for lv in s.levels()] == ["0.9", "0.7", "0.6", "0.4", "0.3", "0.1"]
    assert [lv["delta"] for lv in s.levels()] == ["-0.1", "-0.2"] * 3


async def test_gram_steps_survive_restarts_exactly(tmp_path: Path) -> None:
    """The ledger reloads levels at 3 decimals; the decoder refuses finer quantities (test_decode)."""
    for i in range(3):
        async with store(tmp_path, config(("SPICE-KG", 1, None))) as s:
            await s.commit(pos(f"R{i}", ("SPICE-KG", "0.001")))
            await s.commit(ret(f"S{i}", ("SPICE-KG", "0.010")))
    assert [lv["on_hand"] for lv in s.levels()] == ["0.999", "1.009", "1.008", "1.018", "1.017", "1.027"]


# --- state after restarts and crashes -------------------------------------------------------------


async def test_ledger_after_restarts_equals_the_sum_of_committed_events(tmp_path: Path) -> None:
    initial = {"TEA": Decimal(50), "RICE": Decimal("20.5"), "SOAP": Decimal(7)}
    items = config(*((sku, float(v), 3.0) for sku, v in initial.items()))
    skus = sorted(initial)
    n = 0
    for _ in range(3):
        async with store(tmp_path, items) as s:
            for _ in range(4):
                batch = []
                for _ in range(7):
                    sku, qty = skus[n % 3], ("1", "0.5", "2.25", "0.125")[n % 4]
                    batch.append(ret(f"T{n}", (sku, qty)) if n % 5 == 4 else pos(f"T{n}", (sku, qty)))
                    n += 1
                batch.append(pos(f"T{n - 3}", (skus[0], "99")))
                await s.commit(*batch)
    moved = sums_of_events(s)
    expected = {sku: initial[sku] + moved.get(sku, Decimal(0)) for sku in skus}
    assert {sku: Decimal(repr(v[0])) for sku, v in s.stock().items()} == expected
    last_level = {lv["sku"]: Decimal(lv["on_hand"]) for lv in s.levels()}
    assert last_level == expected
    async with store(tmp_path, items) as s:
        await s.commit(pos("AFTER", ("TEA", "1"), ("RICE", "1"), ("SOAP", "1")))
        after = {lv["sku"]: Decimal(lv["on_hand"]) for lv in s.levels(after=n)}
    assert after == {sku: v - 1 for sku, v in expected.items()}


CHILD = r"""
import asyncio, sys
from pathlib import Path
import orjson
from drivers.mqtt.config import MqttDriverConfig, TopicRoute
from drivers.mqtt.decode import TopicRouter, decode_message
from gateway.kernel.clock import ClockState
from gateway.kernel.config import JournalConfig
from gateway.ledger.config import StockConfig, StockItem
from gateway.kernel.journal import Draft, Journal
from gateway.kernel.metrics import Metrics
from gateway.ledger.stock import StockLedger

ROUTER = TopicRouter(MqttDriverConfig(routes=[
    TopicRoute(pattern="store/pos/{device_id}/sale", kind="pos.sale"),
    TopicRoute(pattern="store/pos/{device_id}/return", kind="pos.return"),
], unknown_devices="accept"), frozenset())

def draft(n):
    kind = "return" if n % 4 == 3 else "sale"
    sku, qty = ("TEA", "RICE", "SOAP")[n % 3], ("1", "0.5", "2.25")[n % 3]
    lines = [{"sku": sku, "quantity": qty, "unit_price": 1}]
    body = {"receipt_no": f"R{n}", "register_id": "1", "currency": "HKD", "lines": lines,
            "totals": {"subtotal": 1, "total": 1}}
    d = decode_message(ROUTER, f"store/pos/pos1/{kind}", orjson.dumps(body))
    return Draft(d.kind, d.device_id, d.data_json, d.data, d.occurred_at, d.dedup_key, None, "store-mqtt")

async def main():
    metrics = Metrics()
    skus = ("TEA", "RICE", "SOAP")
    stock = StockConfig(items=[StockItem(sku=s, on_hand=1000, safety_stock=990) for s in skus])
    journal = Journal(Path(sys.argv[1]), "hk-0042", "gw-1", JournalConfig(commit_max_delay_ms=0), metrics,
                      [StockLedger(stock, metrics)], ClockState(override=True))
    await journal.open()
    writer = asyncio.create_task(journal.run())
    n = 0
    while True:
        for _ in range(25):
            journal.submit(draft(n))
            n += 1
        journal.submit(draft(n - 7))
        await journal.flush()
        print(journal.last_seq, flush=True)

asyncio.run(main())
"""


async def test_ledger_after_kill_9_equals_the_sum_of_committed_events(tmp_path: Path) -> None:
    """A real crash: a child process commits sales and returns until it is SIGKILLed mid-stream."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path / "journal.db"), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    try:
        async with asyncio.timeout(60):
            while True:
                line = await child.stdout.readline()
                assert line, "the child process ended early"
                if int(line) >= 600:
                    break
    finally:
        child.kill()
        await child.stdout.read()
        await child.wait()

    initial = Decimal(1000)
    async with store(tmp_path, config(*((s, 1000.0, 990.0) for s in ("TEA", "RICE", "SOAP")))) as s:
        seqs = [seq for (seq,) in s.rows("SELECT seq FROM events ORDER BY seq")]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) >= 600
        keys = [k for (k,) in s.rows("SELECT dedup_key FROM events WHERE dedup_key IS NOT NULL")]
        assert len(keys) == len(set(keys))
        moved = sums_of_events(s)
        expected = {sku: initial + moved[sku] for sku in ("TEA", "RICE", "SOAP")}
        assert {sku: Decimal(repr(v[0])) for sku, v in s.stock().items()} == expected
        last_level = {lv["sku"]: Decimal(lv["on_hand"]) for lv in s.levels()}
        assert last_level == expected
        last = seqs[-1]
        await s.commit(pos("AFTER", ("TEA", "1"), ("RICE", "1"), ("SOAP", "1")))
        after = {lv["sku"]: Decimal(lv["on_hand"]) for lv in s.levels(after=last)}
        assert after == {sku: v - 1 for sku, v in expected.items()}


# --- HQ adjustments and rules (downlink commands; the full path: tests/cloud_bridge/test_downlink.py) --


def adjusted(request_id: str, sku: str, *, delta: str | None = None, count: str | None = None) -> Draft:
    """A ``stock.adjusted`` draft as it may come back from disk: JSON only, no parsed model."""
    data = {"sku": sku, "delta": delta, "set": count, "reason": "correction", "request_id": request_id}
    return Draft("stock.adjusted", None, orjson.dumps(data), dedup_key=f"cmd:{request_id}")


async def test_adjustments_move_stock_in_seq_order_once_per_request(tmp_path: Path) -> None:
    async with store(tmp_path, config(("TEA", 10, 4))) as s:
        await s.commit(pos("R1", ("TEA", "1")), adjusted("a-1", "TEA", delta="5"), pos("R2", ("TEA", "2")))
        assert s.stock()["TEA"] == (12.0, 4.0, 0)
        await s.commit(adjusted("a-1", "TEA", delta="5"))  # a replay: the journal drops it by its dedup key
        await s.commit(adjusted("a-2", "TEA", count="3.5"), adjusted("a-3", "NEW", delta="2"))
        assert s.stock() == {"TEA": (3.5, 4.0, 1), "NEW": (2.0, None, 0)}
        assert [(lv["sku"], lv["on_hand"], lv["delta"]) for lv in s.levels()] == [
            ("TEA", "12", "2"),
            ("TEA", "3.5", "-8.5"),
            ("NEW", "2", "2"),
        ]
        assert [a["subject"] for a in s.alerts()] == ["TEA"]
        assert s.unknown_sku_count() == 0  # new goods arriving are no surprise


async def test_a_journal_from_before_hq_rules_keeps_its_thresholds(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "journal.db", isolation_level=None)) as conn:
        conn.execute(
            "CREATE TABLE stock(sku TEXT PRIMARY KEY, on_hand REAL NOT NULL, safety_stock REAL, "
            "updated_seq INTEGER, low INTEGER NOT NULL DEFAULT 0)"
        )
        conn.executemany("INSERT INTO stock VALUES (?,?,?,?,?)", [("TEA", 7, 5, 3, 0), ("OLD", 1, 0.5, 2, 0)])
    async with store(tmp_path, config(("TEA", 10, 4))) as s:
        assert s.stock() == {"TEA": (7.0, 4.0, 0), "OLD": (1.0, 0.5, 0)}
        assert s.rows("SELECT sku, base_safety_stock FROM stock ORDER BY sku") == [("OLD", 0.5), ("TEA", 4.0)]
