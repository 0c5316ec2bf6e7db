"""The store's opening hours: spans past midnight, overlaps counted once, daylight-saving days, closed days,
and the config's errors with their lines."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from gateway.config_loader import check_config
from gateway.kernel.store_hours import WEEKDAYS, StoreHours
from tests.gateway.test_config import MINIMAL


def at(text: str, zone: str = "Asia/Hong_Kong") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_a_span_past_midnight_and_a_closed_day() -> None:
    hours = StoreHours("Asia/Hong_Kong", {"fri": ["18:00-02:00"], "sat": []})  # 2027-01-15 is a Friday
    assert hours.open_between(at("2027-01-15T17:00"), at("2027-01-16T03:00")) == 8 * 3600
    assert hours.is_open(at("2027-01-16T01:30"))
    assert not hours.is_open(at("2027-01-16T02:00"))
    assert not hours.is_open(at("2027-01-16T20:00"))  # Saturday: closed
    assert hours.reach(at("2027-01-15T23:00"), 3 * 3600) == at("2027-01-16T02:00")
    # after Friday night, the next opening is the next Friday's
    assert hours.reach(at("2027-01-16T02:00"), 60) == at("2027-01-22T18:01")


def test_overlapping_spans_count_once() -> None:
    hours = StoreHours("UTC", {"mon": ["09:00-12:00", "11:00-13:00"], "sun": ["20:00-10:00"]})
    monday = at("2027-01-18T00:00", "UTC")
    assert hours.open_between(monday, monday + 86400) == 13 * 3600  # 00:00-13:00 (Sunday's span runs in)


def test_a_daylight_saving_day_is_as_long_as_the_clocks_say() -> None:
    hours = StoreHours("Europe/Paris", {day: ["00:00-24:00"] for day in WEEKDAYS})
    day = at("2027-03-28T00:00", "Europe/Paris")  # the clocks go forward at 02:00
    assert hours.open_between(day, day + 86400) == 23 * 3600 + 3600  # into Monday's first hour
    assert hours.open_between(day, at("2027-03-29T00:00", "Europe/Paris")) == 23 * 3600


def test_no_hours_is_always_open_and_no_opening_is_never_reached() -> None:
    assert StoreHours().reach(100.0, 50.0) == 150.0
    assert StoreHours().open_between(100.0, 150.0) == 50.0
    assert StoreHours("UTC", {}).reach(100.0, 50.0) is None  # opening_hours given, every day closed


def test_config_errors_come_all_at_once_with_their_lines(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        MINIMAL.replace(
            "  name: Test Store\n",
            "  name: Test Store\n  opening_hours:\n    mon: '09:00-21:00'\n    fri: '25:00-02:00'\n"
            "    someday: '09:00-10:00'\n    wed: ['09:00-09:00']\n",
        )
    )
    code, text = check_config(config, no_secrets=True)
    assert code == 1
    lines = text.splitlines()
    assert any(ln.startswith(f"{config}:7:") and "fri" in ln and "is not a span like" in ln for ln in lines)
    assert any(ln.startswith(f"{config}:8:") and "Input should be 'mon', 'tue'" in ln for ln in lines)
    assert any(
        "store.opening_hours.wed[0]" in ln and "opens and closes at the same minute" in ln for ln in lines
    )
