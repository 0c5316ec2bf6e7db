"""Seq range arithmetic for the HQ receiver: which seqs a gateway is missing, and why (docs/OUTBOX.md).

Everything here works on sorted lists of inclusive ``(first, last)`` ranges, so its cost follows the number of
gaps and runs, never the number of events: a gateway with ten million events and one gap is two ranges.
Pure functions, no I/O; both database backends use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Range = tuple[int, int]
"""Inclusive (first, last) seq range."""


def merge(ranges: Iterable[Sequence[int]]) -> list[Range]:
    """Sorted union of ranges, joining overlapping and adjacent ones: [(5,6), (1,3), (4,4)] -> [(1,6)]."""
    out: list[Range] = []
    for a, b in sorted((int(r[0]), int(r[1])) for r in ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def complement(runs: Sequence[Range], first: int, last: int) -> list[Range]:
    """The parts of first..last that sorted, disjoint ``runs`` do not cover."""
    out: list[Range] = []
    cursor = first
    for a, b in runs:
        if b < cursor:
            continue
        if a > last:
            break
        if a > cursor:
            out.append((cursor, a - 1))
        cursor = b + 1
    if cursor <= last:
        out.append((cursor, last))
    return out


def intersect(left: Sequence[Range], right: Sequence[Range]) -> list[Range]:
    """Intersection of two sorted, disjoint range lists (a linear merge)."""
    out: list[Range] = []
    i = j = 0
    while i < len(left) and j < len(right):
        a = max(left[i][0], right[j][0])
        b = min(left[i][1], right[j][1])
        if a <= b:
            out.append((a, b))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(left: Sequence[Range], right: Sequence[Range]) -> list[Range]:
    """``left`` without ``right`` (both sorted and disjoint)."""
    if not left:
        return []
    return intersect(left, complement(right, left[0][0], left[-1][1]))


def clip(ranges: Sequence[Range], first: int, last: int) -> list[Range]:
    """The parts of ``ranges`` inside first..last."""
    return intersect(ranges, [(first, last)]) if first <= last else []


def size(ranges: Iterable[Range]) -> int:
    """How many seqs the ranges hold."""
    return sum(b - a + 1 for a, b in ranges)


@dataclass(frozen=True, slots=True)
class GapClasses:
    """A gateway's missing seqs in 1..max(max_seq, complete_through), by class (docs/OUTBOX.md)."""

    explained: list[Range] = field(default_factory=list)
    """Covered by an ``outbox.evicted`` range or a ``journal.corrupt``/``journal.missing`` alert's ``possibly_lost``."""
    lost: list[Range] = field(default_factory=list)
    """At or below the gateway's ``complete_through`` (known for a grace period) and not explained."""
    pending: list[Range] = field(default_factory=list)
    """Above it: still on the way."""

    @property
    def gaps(self) -> list[Range]:
        """Every missing range, whatever its class."""
        return merge([*self.explained, *self.lost, *self.pending])


def split_gaps(
    runs: Sequence[Range], explained: Iterable[Range], upper: int
) -> tuple[list[Range], list[Range]]:
    """The seqs in 1..upper that ``runs`` (the stored seqs) miss, as (explained, unexplained) ranges.

    Explained wins: a gateway that reported an eviction will never send those seqs."""
    gaps = complement(runs, 1, upper)
    if not gaps:
        return [], []
    covered = intersect(gaps, merge(explained))
    return covered, subtract(gaps, covered)


def classify_split(covered: list[Range], rest: Sequence[Range], upper: int, lost_through: int) -> GapClasses:
    """Classes from :func:`split_gaps`: unexplained seqs up to ``lost_through`` are lost, the others pending."""
    return GapClasses(
        explained=list(covered),  # a copy: the receiver keeps these lists
        lost=clip(rest, 1, lost_through),
        pending=clip(rest, lost_through + 1, upper),
    )


def classify(runs: Sequence[Range], explained: Iterable[Range], upper: int, lost_through: int) -> GapClasses:
    """Class of every seq in 1..upper that ``runs`` (the stored seqs) miss; ``lost_through`` is the gateway's
    ``complete_through`` (or, with several receivers, the one HQ has known for a grace period)."""
    covered, rest = split_gaps(runs, explained, upper)
    return classify_split(covered, rest, upper, lost_through)


def chunk(ranges: Sequence[Range], max_seqs: int, max_chunks: int) -> list[Range]:
    """Ranges cut into pieces of at most ``max_seqs`` seqs, the lowest first, at most ``max_chunks`` pieces."""
    out: list[Range] = []
    for a, b in ranges:
        while a <= b and len(out) < max_chunks:
            end = min(b, a + max_seqs - 1)
            out.append((a, end))
            a = end + 1
        if len(out) >= max_chunks:
            break
    return out
