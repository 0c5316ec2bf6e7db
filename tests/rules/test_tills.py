"""``register_silent`` on a real SQLite file with the rules' clock moved by the test: only opening hours count,
a receipt clears, the gateway's own downtime and an unsynchronised clock never raise it."""

from __future__ import annotations

from typing import Any

from gateway.kernel.events import AlertRaised
from gateway.kernel.store_hours import WEEKDAYS, StoreHours
from tests.rules.conftest import Time
from tests.rules.test_cold_chain_and_stock import till

QUIET = {"id": "till-quiet", "type": "register_silent", "after_s": 1800}
NINE_TO_FIVE = StoreHours("UTC", {day: ["09:00-17:00"] for day in WEEKDAYS})
"""The test's clock starts on a Friday at 08:00 UTC."""


def test_a_till_quiet_for_long_enough_raises_once_and_its_next_receipt_clears(
    rig_at: Any, time: Time
) -> None:
    rig = rig_at([QUIET])  # no opening hours: always open
    till(rig, "pos.sale", "10")
    time.advance(1799)
    rig.tick()
    assert rig.alerts == []
    time.advance(1)
    rig.tick()
    rig.tick()
    [raised] = rig.alerts
    assert isinstance(raised, AlertRaised)
    assert (raised.subject, raised.details["alert_id"]) == ("pos-01", "till-quiet/pos-01/1")
    assert raised.details["last_seq"] == 1
    assert raised.details["due_at"] == "2027-01-15T08:30:00Z"
    till(rig, "pos.return", "10")
    assert rig.kinds() == [("raised", "pos-01"), ("cleared", "pos-01")]


def test_only_opening_hours_count(rig_at: Any, time: Time) -> None:
    rig = rig_at([QUIET])
    rig.engine.hours = NINE_TO_FIVE
    till(rig, "pos.sale", "10")  # 08:00, before opening
    time.advance(3600 + 29 * 60)  # 09:29: open for 29 minutes
    rig.tick()
    assert rig.alerts == []
    time.advance(60)  # 09:30
    rig.tick()
    [raised] = rig.alerts
    assert raised.details["due_at"] == "2027-01-15T09:30:00Z"
    till(rig, "pos.sale", "10", device="pos-02")  # another till: its own subject


def test_the_night_does_not_count(rig_at: Any, time: Time) -> None:
    rig = rig_at([QUIET])
    rig.engine.hours = NINE_TO_FIVE
    time.advance(8 * 3600 + 45 * 60)  # 16:45
    till(rig, "pos.sale", "10")
    for _ in range(16 * 2):  # through the night to 08:45 the next day, ticking every half hour
        time.advance(1800)
        rig.tick()
    time.advance(29 * 60)  # 09:14
    rig.tick()
    assert rig.alerts == []  # 15 minutes before closing, 14 after opening
    time.advance(60)
    rig.tick()
    [raised] = rig.alerts
    assert raised.details["due_at"] == "2027-01-16T09:15:00Z"


def test_the_gateways_downtime_is_not_the_tills_silence(rig_at: Any, time: Time) -> None:
    rig = rig_at([QUIET])
    till(rig, "pos.sale", "10")
    time.advance(1000)
    rig.tick()
    rig.conn.close()
    time.advance(600)  # the gateway was down (same boot)
    rig = rig_at([QUIET])
    rig.tick()
    time.advance(1799)
    rig.tick()
    assert rig.alerts == []
    time.advance(1)
    rig.tick()
    assert rig.kinds() == [("raised", "pos-01")]


def test_with_opening_hours_an_unsynchronised_clock_waits(rig_at: Any, time: Time) -> None:
    time.synced = False
    rig = rig_at([QUIET])
    rig.engine.hours = NINE_TO_FIVE
    time.advance(3600)  # 09:00 (as the test knows; the box does not)
    till(rig, "pos.sale", "10")
    time.advance(3600)
    rig.tick()
    rig.tick()
    assert rig.alerts == []
    time.synced = True
    time.advance(60)
    rig.tick()
    assert rig.kinds() == [("raised", "pos-01")]


def test_changed_opening_hours_are_counted_when_the_timer_fires(rig_at: Any, time: Time) -> None:
    rig = rig_at([QUIET])
    till(rig, "pos.sale", "10")  # 08:00, always open: due 08:30
    rig.engine.hours = NINE_TO_FIVE  # the store's hours were set since (a restart with the new config)
    time.advance(1800)
    rig.tick()
    assert rig.alerts == []  # 08:30: the store is not open yet
    time.advance(3600)  # 09:30
    rig.tick()
    assert rig.kinds() == [("raised", "pos-01")]
