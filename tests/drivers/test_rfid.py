"""InventoryTracker: windows, appeared/departed, RSSI and antenna, bounded memory, SGTIN decoding."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.rfid import InventoryTracker, merge_inventories
from gateway.kernel.events import RfidInventory

SGTIN = "3074257BF7194E4000001A85"  # GS1 TDS worked example: GTIN 80614141123458, serial 6789
OTHER = "E20000172211012518905B7A"


def test_one_inventory_per_window_with_counts_rssi_and_gtin() -> None:
    tracker = InventoryTracker(window_s=5, depart_after_s=20)
    assert not tracker.due(0.0)
    for n in range(100):
        tracker.read(SGTIN.lower(), -60.0 + (n % 7), n % 4, 0.01 * n)
        tracker.read(OTHER, None, None, 0.01 * n)
    assert not tracker.due(4.9)
    assert tracker.due(5.0)
    inventory = tracker.close_window(5.0)
    assert inventory is not None
    RfidInventory.model_validate(inventory.model_dump())
    assert inventory.reads == 200
    by_epc = {t.epc: t for t in inventory.tags}
    assert by_epc[SGTIN].reads == 100
    assert by_epc[SGTIN].rssi_max == -54.0
    assert by_epc[SGTIN].antenna == 6 % 4
    assert by_epc[SGTIN].gtin == "80614141123458"
    assert by_epc[SGTIN].serial == "6789"
    assert by_epc[OTHER].gtin is None
    assert by_epc[OTHER].rssi_max is None
    assert sorted(inventory.appeared) == sorted([SGTIN, OTHER])


def test_appeared_once_departed_after_the_departure_time() -> None:
    tracker = InventoryTracker(window_s=5, depart_after_s=12)
    tracker.read(SGTIN, None, None, 0)
    first = tracker.close_window(5)
    assert first is not None
    assert first.appeared == [SGTIN]
    tracker.read(SGTIN, None, None, 6)
    second = tracker.close_window(10)
    assert second is not None
    assert second.appeared == []
    assert tracker.close_window(15) is None  # not read, not yet gone
    third = tracker.close_window(25)
    assert third is not None
    assert third.departed == [SGTIN]
    assert third.tags == []
    assert tracker.close_window(30) is None
    tracker.read(SGTIN, None, None, 31)
    back = tracker.close_window(35)
    assert back is not None
    assert back.appeared == [SGTIN]


def test_held_departures_are_not_lost_only_postponed() -> None:
    tracker = InventoryTracker(window_s=5, depart_after_s=10)
    tracker.read(SGTIN, None, None, 0)
    assert tracker.close_window(5) is not None
    assert tracker.close_window(60, departures=False) is None  # the reader was silent: nothing departs
    assert tracker.present == 1
    gone = tracker.close_window(65)
    assert gone is not None
    assert gone.departed == [SGTIN]


def test_memory_is_bounded_and_truncation_counted() -> None:
    tracker = InventoryTracker(window_s=1, depart_after_s=10, max_tags=10)
    for n in range(50):
        tracker.read(f"{n:024X}", None, None, 0.1)
    tracker.read("XYZ", None, None, 0.1)
    inventory = tracker.close_window(1)
    assert inventory is not None
    assert len(inventory.tags) == 10
    assert inventory.truncated == 40
    assert inventory.reads == 50
    assert tracker.invalid == 1
    assert tracker.present == 10


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text("0123456789abcdefXYZ", max_size=30),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.one_of(st.none(), st.integers(-5, 300)),
        ),
        max_size=200,
    )
)
def test_any_reads_give_valid_inventories(reads: list[tuple[str, float | None, int | None]]) -> None:
    tracker = InventoryTracker(window_s=1, depart_after_s=2, max_tags=20)
    now = 0.0
    for epc, rssi, antenna in reads:
        now += 0.05
        tracker.read(epc, rssi, antenna, now)
        if tracker.due(now):
            inventory = tracker.close_window(now)
            if inventory is not None:
                RfidInventory.model_validate(inventory.model_dump())


def test_merged_windows_keep_changes_and_cancel_round_trips() -> None:
    tracker = InventoryTracker(window_s=5, depart_after_s=8)
    tracker.read(SGTIN, -70.0, 1, 0)
    tracker.read(OTHER, None, None, 0)
    first = tracker.close_window(5)
    tracker.read(SGTIN, -50.0, 2, 6)
    second = tracker.close_window(10)  # OTHER departs
    tracker.read(OTHER, None, None, 11)
    third = tracker.close_window(15)  # OTHER is back
    assert first is not None
    assert second is not None
    assert third is not None
    merged = merge_inventories(first, second)
    assert merged.appeared == sorted([SGTIN, OTHER])
    assert merged.departed == []  # OTHER appeared and departed within the merged span: nobody was told
    assert merged.reads == 3
    assert merged.window_s == 10
    by_epc = {t.epc: t for t in merged.tags}
    assert (by_epc[SGTIN].reads, by_epc[SGTIN].rssi_max, by_epc[SGTIN].antenna) == (2, -50.0, 2)
    later = merge_inventories(second, third)
    assert later.departed == []
    assert later.appeared == []
    RfidInventory.model_validate(later.model_dump())
