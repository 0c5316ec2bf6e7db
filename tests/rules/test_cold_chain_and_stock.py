"""The cold chain's simple rules (door_open, battery_low, controller_alarm) and negative_stock, each through the
engine on a real SQLite file."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.kernel.events import AlertCleared, AlertRaised, StockLevel
from gateway.kernel.pipeline import Event
from tests.rules.conftest import Rig, Time


def level(rig: Rig, sku: str, on_hand: str) -> None:
    rig.seq += 1
    model = StockLevel(sku=sku, on_hand=Decimal(on_hand), delta=Decimal(-1), cause_seqs=(rig.seq, rig.seq))
    event = Event(rig.seq, "stock.level", None, model.model_dump_json().encode(), model)
    rig._commit(lambda w: rig.pipeline.run(rig.conn, [event], w.append))


def test_a_door_open_too_long_raises_and_closing_it_clears(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "door", "type": "door_open", "open_s": 180}])
    rig.sample(door_open=1)
    time.advance(120)
    rig.sample(door_open=0)  # closed in time
    rig.sample(door_open=1)
    time.advance(180)
    rig.tick()
    rig.sample(door_open=1)
    rig.sample(door_open=0)
    assert rig.kinds() == [("raised", "fridge-1"), ("cleared", "fridge-1")]
    assert rig.alerts[0].details["opened"] == {"seq": 3}


def test_a_low_battery_raises_once_and_clears_only_well_above(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "battery", "type": "battery_low", "min_pct": 15, "clear_above_pct": 25}])
    rig.sample(battery_pct=40)
    rig.sample(battery_pct=14)
    rig.sample(battery_pct=13)
    rig.sample(battery_pct=20)  # wobbles up: still low
    rig.sample(battery_pct=90)  # a new battery
    rig.sample(battery_low=1)  # the device's own flag
    assert rig.kinds() == [("raised", "fridge-1"), ("cleared", "fridge-1"), ("raised", "fridge-1")]


def test_a_controller_alarm_bit_raises_and_all_bits_off_clears(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "alarms", "type": "controller_alarm"}])
    rig.sample(temperature=4.0, high_temp_alarm=0, low_temp_alarm=0, high_temp_alarm_threshold=8.0)
    rig.sample(high_temp_alarm=1, low_temp_alarm=0)
    rig.sample(high_temp_alarm=1, low_temp_alarm=1)
    rig.sample(high_temp_alarm=0, low_temp_alarm=0)
    assert rig.kinds() == [("raised", "fridge-1"), ("cleared", "fridge-1")]
    raised = rig.alerts[0]
    assert isinstance(raised, AlertRaised)
    assert raised.details["bits"] == ["high_temp_alarm"]


def test_negative_stock_is_raised_per_sku_without_a_device(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "neg", "type": "negative_stock", "select": {"skus": ["TEA", "MILK"]}}])
    level(rig, "TEA", "2")
    level(rig, "TEA", "-1")
    level(rig, "TEA", "-3")
    level(rig, "COFFEE", "-5")  # not selected
    level(rig, "TEA", "0")
    assert rig.kinds() == [("raised", "TEA"), ("cleared", "TEA")]
    assert rig.alerts[0].details["alert_id"] == "neg/TEA/1"
    cleared = rig.alerts[1]
    assert isinstance(cleared, AlertCleared)
    assert cleared.alert_id == "neg/TEA/1"


def till(rig: Rig, kind: str, total: str, device: str = "pos-01") -> None:
    from gateway.kernel.events import PosReturn, PosSale

    rig.seq += 1
    body: dict[str, Any] = {
        "receipt_no": f"R{rig.seq}",
        "register_id": "REG1",
        "currency": "HKD",
        "lines": [{"sku": "TEA", "quantity": "1", "unit_price": total}],
        "totals": {"subtotal": total, "total": total},
    }
    model: PosSale
    if kind == "pos.return":
        model = PosReturn.model_validate({**body, "original_receipt_no": "R1"})
    else:
        model = PosSale.model_validate(body)
    event = Event(rig.seq, kind, device, model.model_dump_json().encode(), model)
    rig._commit(lambda w: rig.pipeline.run(rig.conn, [event], w.append))


def test_a_returns_spike_raises_on_the_ratio_and_clears_as_the_window_slides(rig_at: Any, time: Time) -> None:
    rig = rig_at(
        [{"id": "returns", "type": "returns_spike", "window_s": 1800, "max_ratio": 0.15, "min_sales": 10}]
    )
    for _ in range(9):
        till(rig, "pos.sale", "10")
    till(rig, "pos.return", "10")
    till(rig, "pos.return", "10")
    assert rig.alerts == []  # 9 sales: below min_sales
    till(rig, "pos.sale", "10")  # 10 sales, 2 returns: 20 %
    [raised] = rig.alerts
    assert isinstance(raised, AlertRaised)
    assert (raised.subject, raised.details["sales"], raised.details["returns"]) == ("store", 10, 2)
    assert raised.details["ratio_by_count"] == 0.2
    rig.conn.close()
    rig = rig_at(
        [{"id": "returns", "type": "returns_spike", "window_s": 1800, "max_ratio": 0.15, "min_sales": 10}]
    )
    time.advance(1900)  # the window slid past them, with no receipt: the state was kept, and the timer clears
    rig.tick()
    [cleared] = rig.alerts
    assert isinstance(cleared, AlertCleared)
    assert cleared.alert_id == "returns/store/1"


def test_a_returns_spike_clears_below_its_clear_ratio_only(rig_at: Any, time: Time) -> None:
    """Hysteresis: a ratio hovering at the limit does not raise and clear over and over."""
    rig = rig_at([{"id": "returns", "type": "returns_spike", "max_ratio": 0.15, "min_sales": 10}])
    for _ in range(10):
        till(rig, "pos.sale", "10")
    till(rig, "pos.return", "10")
    till(rig, "pos.return", "10")  # 20 %: raised
    assert rig.kinds() == [("raised", "store")]
    for _ in range(3):
        till(rig, "pos.sale", "10")  # 2 / 13 = 15.4 %, then 14.3 %, 13.3 %: under the limit, above 12 %
    assert rig.kinds() == [("raised", "store")]
    for _ in range(4):
        till(rig, "pos.sale", "10")  # 2 / 17 = 11.8 %: at or below 0.8 times 15 %
    assert rig.kinds() == [("raised", "store"), ("cleared", "store")]
