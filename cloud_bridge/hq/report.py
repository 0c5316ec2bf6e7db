"""Text renderings of the HQ receiver's state: the live summary table (and its conflict alarms) and the
``--report`` classification and conflicts."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import TextIO

from cloud_bridge.hq.model import GatewaySummary, ReceiverBackend
from cloud_bridge.hq.ranges import Range

SUMMARY_COLUMNS = (
    "store",
    "gateway",
    "events",
    "max_seq",
    "through",
    "pending",
    "lost",
    "explained",
    "dups",
    "conflicts",
    "lag",
)


def format_lag(lag: timedelta | None) -> str:
    if lag is None:
        return "-"
    seconds = lag.total_seconds()
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    if seconds < 3600:
        return f"{sign}{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{sign}{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{sign}{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def format_summary(rows: Sequence[GatewaySummary]) -> str:
    """The per-gateway summary as a small text table (``through`` is the gateway's complete_through)."""
    table = [SUMMARY_COLUMNS] + [
        (
            r.store_id,
            r.gateway_id,
            str(r.events),
            str(r.max_seq),
            "-" if r.complete_through is None else str(r.complete_through),
            str(r.pending),
            str(r.lost),
            str(r.explained),
            str(r.duplicates),
            str(r.conflicts),
            format_lag(r.lag),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(SUMMARY_COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    if not rows:
        lines.append("(no events received yet)")
    return "\n".join(lines)


def print_summary(rows: Sequence[GatewaySummary], file: TextIO | None = None) -> None:
    """Print :func:`format_summary` (CLI helper)."""
    print(format_summary(rows), file=file or sys.stdout, flush=True)


def format_ranges(ranges: Sequence[Range], limit: int = 20) -> str:
    shown = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


def print_report(store: ReceiverBackend, out: TextIO) -> bool:
    """Summary plus each gateway's lost, pending and explained ranges and conflicts; returns whether anything
    is lost or conflicting (what ``--report`` exits 2 for)."""
    rows = store.summary()
    print_summary(rows, out)
    failed = False
    for row in rows:
        name = f"{row.store_id}/{row.gateway_id}"
        if row.conflicts:
            failed = True
            print(f"conflicts {name}: {row.conflicts} (same seq, different event id)", file=out)
        if not row.missing:
            continue
        classes = store.classes(row.gateway_id, row.store_id)
        failed = failed or bool(classes.lost)
        for label, ranges in (
            ("lost", classes.lost),
            ("pending", classes.pending),
            ("explained", classes.explained),
        ):
            if ranges:
                print(f"{label} {name}: {format_ranges(ranges)}", file=out)
    rejected = store.count_rejected()
    if rejected:
        newest = store.rejections(limit=1)[0]
        print(f"rejected messages: {rejected} (newest, on {newest.topic}: {newest.reason})", file=out)
    return failed


def conflict_alarms(rows: Sequence[GatewaySummary], seen: dict[tuple[str, str], int]) -> list[str]:
    """A CONFLICT line per gateway whose conflict count went up since the last summary (``seen`` is updated):
    a conflict means two different events under one seq, which a person must look at, so the live summary
    says it in words rather than only as a number in a column."""
    lines = []
    for row in rows:
        key = (row.store_id, row.gateway_id)
        if row.conflicts > seen.get(key, 0):
            lines.append(
                f"CONFLICT {row.store_id}/{row.gateway_id}: {row.conflicts} event(s) came under a seq another"
                " event id holds; both are kept (table conflicts): see --report"
            )
        seen[key] = row.conflicts
    return lines


def print_conflicts(store: ReceiverBackend, out: TextIO, limit: int = 20) -> bool:
    """The conflicting events kept, for ``--report``; returns whether there are any."""
    rows = store.conflicts(limit + 1)
    for c in rows[:limit]:
        held = (
            f"seq {c.seq} holds event {c.kept_id}" if c.kept_id else f"event {c.id} is stored at another seq"
        )
        print(
            f"conflict {c.store_id}/{c.gateway_id} seq {c.seq}: {held}; also kept {c.kind} event {c.id}"
            f" (received {c.received_at.astimezone(UTC).isoformat(timespec='seconds')})",
            file=out,
        )
    if len(rows) > limit:
        print(f"(more conflicting events in table conflicts than the {limit} shown)", file=out)
    return bool(rows)
