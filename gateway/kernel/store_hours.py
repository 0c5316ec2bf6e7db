"""The store's opening hours, in its own timezone: ``store.opening_hours`` in the config.

Each weekday lists its spans, ``"HH:MM-HH:MM"``; a span that ends at or before its start runs past midnight
(``"18:00-02:00"``), and ``24:00`` ends one at midnight. A day not listed, or listed with no span, is closed.
No ``opening_hours`` at all: the store counts as always open.

:class:`StoreHours` answers the two questions the rules ask, on wall-clock (Unix) times: how long the store was
open between two times, and when it will have been open for so long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Final, Literal
from zoneinfo import ZoneInfo

from pydantic import BeforeValidator, Field

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: Final[tuple[Weekday, ...]] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN: Final = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
LOOK_AHEAD_DAYS: Final = 15
"""How far :meth:`StoreHours.reach` looks for enough open time (the rules ask for at most a day's worth)."""


def _span(value: str) -> str:
    match = _SPAN.match(value)
    if match is None or (match[3] == "24" and match[4] != "00"):
        raise ValueError(f"{value!r} is not a span like '09:00-21:30' (or '22:00-02:00' past midnight)")
    if match.group(1, 2) == match.group(3, 4):
        raise ValueError(f"{value!r} opens and closes at the same minute")
    return value


def _spans(value: object) -> object:
    return [value] if isinstance(value, str) else value  # "mon: 09:00-21:00" as well as a list


Span = Annotated[str, BeforeValidator(_span)]
DaySpans = Annotated[list[Span], BeforeValidator(_spans), Field(max_length=8)]
OpeningHours = dict[Weekday, DaySpans]
"""``{mon: ["09:00-21:00"], sat: "10:00-22:00", sun: []}``: the config's shape."""


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True, slots=True)
class StoreHours:
    """The store's opening hours in its timezone; ``hours`` None: always open."""

    timezone: str = "UTC"
    hours: OpeningHours | None = None
    _spans: dict[int, list[tuple[int, int]]] = field(init=False, repr=False, compare=False)
    """Weekday number (Monday 0) -> (open, close) minutes after that day's midnight; close may pass 1440."""

    def __post_init__(self) -> None:
        spans: dict[int, list[tuple[int, int]]] = {}
        for day, texts in (self.hours or {}).items():
            for text in texts:
                start, end = (_minutes(part) for part in text.split("-"))
                spans.setdefault(WEEKDAYS.index(day), []).append((start, end if end > start else end + 1440))
        object.__setattr__(self, "_spans", spans)

    @property
    def always_open(self) -> bool:
        return self.hours is None

    def _open_intervals(self, first: date, last: date) -> list[tuple[float, float]]:
        """The open intervals (Unix times) of spans that start on ``first``..``last`` (local dates)."""
        zone = ZoneInfo(self.timezone)
        out = []
        day = first
        while day <= last:
            midnight = datetime(day.year, day.month, day.day, tzinfo=zone)
            for start, end in self._spans.get(day.weekday(), ()):
                # Local wall times: a span across a DST change is as long as the clocks on the wall say.
                opens = (midnight + timedelta(minutes=start)).timestamp()
                closes = (midnight + timedelta(minutes=end)).timestamp()
                if closes > opens:
                    out.append((opens, closes))
            day += timedelta(days=1)
        merged: list[tuple[float, float]] = []
        for opens, closes in sorted(out):  # spans that overlap (yesterday's late one, today's) count once
            if merged and opens <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], closes))
            else:
                merged.append((opens, closes))
        return merged

    def _local_date(self, at: float) -> date:
        return datetime.fromtimestamp(at, UTC).astimezone(ZoneInfo(self.timezone)).date()

    def open_between(self, start: float, end: float) -> float:
        """Seconds the store was open between two Unix times."""
        if end <= start:
            return 0.0
        if self.hours is None:
            return end - start
        first = self._local_date(start) - timedelta(days=1)  # yesterday's span may run past midnight
        total = 0.0
        for opens, closes in self._open_intervals(first, self._local_date(end)):
            total += max(0.0, min(closes, end) - max(opens, start))
        return total

    def is_open(self, at: float) -> bool:
        if self.hours is None:
            return True
        first = self._local_date(at) - timedelta(days=1)
        return any(
            opens <= at < closes for opens, closes in self._open_intervals(first, first + timedelta(2))
        )

    def reach(self, start: float, seconds: float) -> float | None:
        """The Unix time by which the store will have been open ``seconds`` since ``start``; None when it will
        not be within :data:`LOOK_AHEAD_DAYS` (no opening hours at all, say)."""
        if self.hours is None:
            return start + seconds
        first = self._local_date(start) - timedelta(days=1)
        left = seconds
        for opens, closes in self._open_intervals(first, first + timedelta(days=LOOK_AHEAD_DAYS)):
            begin = max(opens, start)
            if closes <= begin:
                continue
            if closes - begin >= left:
                return begin + left
            left -= closes - begin
        return None
