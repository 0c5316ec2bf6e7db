"""The uplink's resend queue takes only what it does not hold yet: HQ asking again for a range still on its way
queues nothing twice (``uncovered``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cloud_bridge.uplink import uncovered


def test_uncovered_cuts_what_is_queued() -> None:
    assert uncovered(1, 30, []) == [[1, 30]]
    assert uncovered(1, 30, [[1, 30]]) == []
    assert uncovered(1, 30, [[5, 9], [20, 40]]) == [[1, 4], [10, 19]]
    assert uncovered(10, 12, [[1, 9], [13, 20]]) == [[10, 12]]


spans = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 20)).map(lambda t: [t[0], t[0] + t[1]]))


@given(first=st.integers(1, 60), width=st.integers(0, 30), queued=spans)
def test_uncovered_is_exactly_the_seqs_no_span_holds(first: int, width: int, queued: list[list[int]]) -> None:
    last = first + width
    held = {seq for a, b in queued for seq in range(a, b + 1)}
    pieces = uncovered(first, last, queued)
    got = [seq for a, b in pieces for seq in range(a, b + 1)]
    assert got == [seq for seq in range(first, last + 1) if seq not in held]
    assert all(a <= b for a, b in pieces)
