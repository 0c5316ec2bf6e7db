"""One fridge's HACCP temperature log for one store-local day, from the log's tables (:mod:`rules.haccp`), as
JSON or CSV: for ``GET /api/haccp`` and ``store-gateway haccp`` (docs/HACCP.md). It only reads."""

from __future__ import annotations

import csv
import io
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

from gateway.kernel.rule_config import RuleDefinition, TemperatureRule
from rules.haccp import HaccpConfig

NO_RULE: Final = "no temperature rule watches this device"
SEVERAL: Final = "several temperature rules watch this device: the lowest max_c is printed"
FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r", "\n")
"""A CSV cell starting with one of these, after any spaces, is a formula to a spreadsheet: text cells get a
leading quote."""
MIN_YEAR: Final = 1970
MAX_YEAR: Final = 2999
"""The days a log (or a daily report) may be asked for: years outside these are refused."""
MAX_EXCURSIONS: Final = 500
"""Excursions listed in one day's log (a ``truncated`` flag says when there were more)."""


def check_day(day: date) -> date:
    """``day`` if its year is within :data:`MIN_YEAR` to :data:`MAX_YEAR`; ValueError otherwise."""
    if not MIN_YEAR <= day.year <= MAX_YEAR:
        raise ValueError(f"{day.isoformat()} is out of range (years {MIN_YEAR} to {MAX_YEAR})")
    return day


def rules_in_force(
    configured: Sequence[RuleDefinition], from_hq: Sequence[RuleDefinition]
) -> list[RuleDefinition]:
    """The configured rules, joined by HQ's (which replace a configured rule with the same id), enabled ones only:
    as the rule engine takes them."""
    merged = {r.id: r for r in configured}
    merged.update((r.id, r) for r in from_hq)
    return [r for r in merged.values() if r.enabled]


def day_bounds(day: date, timezone: str) -> tuple[float, float]:
    """The Unix times a store-local day starts and ends (23, 24 or 25 hours apart); ValueError for a day
    :func:`check_day` refuses."""
    check_day(day)
    zone = ZoneInfo(timezone)
    start = datetime.combine(day, time(0), zone).timestamp()
    end = datetime.combine(day + timedelta(days=1), time(0), zone).timestamp()
    return start, end


def build_report(
    conn: sqlite3.Connection,
    device_id: str,
    day: date,
    *,
    store_id: str,
    store_name: str,
    timezone: str,
    config: HaccpConfig,
    rules: Sequence[RuleDefinition],
    now: float,
) -> dict[str, Any] | None:
    """The log of ``device_id`` on ``day`` (store-local), up to ``now``; None when the gateway knows no such
    fridge (it never logged a temperature of it, and no temperature rule names it)."""
    zone = ZoneInfo(timezone)
    start, end = day_bounds(day, timezone)
    size = config.interval_s
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    rows: list[tuple[Any, ...]] = []
    excursions: list[tuple[Any, ...]] = []
    source = None
    known = False
    if "haccp_interval" in tables:
        rows = conn.execute(
            "SELECT start, min_c, max_c, last_c, readings, defrost, faults, last_at, seconds, unsynced"
            " FROM haccp_interval"
            " WHERE device_id=? AND start>=? AND start<? ORDER BY start",
            (device_id, int(start), end),
        ).fetchall()
        latest = (
            conn.execute(
                "SELECT source FROM haccp_interval WHERE device_id=? AND start<? ORDER BY start DESC LIMIT 1",
                (device_id, end),
            ).fetchone()
            or conn.execute(
                "SELECT source FROM haccp_interval WHERE device_id=? ORDER BY start LIMIT 1", (device_id,)
            ).fetchone()
        )
        known = latest is not None
        source = latest[0] if latest is not None else None
    if "haccp_excursion" in tables:
        excursions = conn.execute(
            "SELECT alert_id, rule_id, limit_c, start, raised_at, cleared_at, max_c, reason, acks, clock_synced"
            " FROM haccp_excursion WHERE device_id=? AND start<? AND (cleared_at IS NULL OR cleared_at>=?)"
            " ORDER BY start, alert_id LIMIT ?",
            (device_id, end, start, MAX_EXCURSIONS + 1),
        ).fetchall()
        known = known or bool(
            conn.execute("SELECT 1 FROM haccp_excursion WHERE device_id=? LIMIT 1", (device_id,)).fetchone()
        )
    watching = [
        r
        for r in rules
        if isinstance(r, TemperatureRule) and r.enabled and r.select.matches(device_id, source)
    ]
    if not known and not any(isinstance(r, TemperatureRule) and device_id in r.select.devices for r in rules):
        return None
    limit = min((r.max_c for r in watching), default=None)

    def local(at: float) -> str | None:
        """A Unix time as store-local ISO 8601; None for one no date has (a damaged row)."""
        try:
            return datetime.fromtimestamp(at, zone).isoformat(timespec="seconds")
        except (OverflowError, ValueError, OSError, TypeError):
            return None

    # A day logged with a longer haccp.interval_s than today's keeps its intervals.
    size = max([size, *(int(row[8]) for row in rows)])
    buckets = _buckets(rows, start, size)
    intervals: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    at = start
    while at < end and at < now:
        found = buckets.get(int((at - start) // size))
        readings = found.readings if found is not None else 0
        peak = found.max_c if found is not None else None
        entry = {
            "start": local(at),
            "end": local(min(at + size, end)),
            "readings": readings,
            "min_c": found.min_c if found is not None else None,
            "max_c": peak,
            "last_c": found.last_c if found is not None else None,
            "defrost": found.defrost if found is not None else 0,
            "faults": found.faults if found is not None else 0,
            "clock_unsynced": found.unsynced if found is not None else 0,
            "above_limit": None if limit is None or peak is None else peak > limit,
            "gap": readings == 0,
        }
        intervals.append(entry)
        if readings == 0:
            if gaps and gaps[-1]["end"] == entry["start"]:
                gaps[-1]["end"] = entry["end"]
                gaps[-1]["minutes"] += (min(at + size, end) - at) / 60
            else:
                gaps.append(
                    {"start": entry["start"], "end": entry["end"], "minutes": (min(at + size, end) - at) / 60}
                )
        at += size
    return {
        "store_id": store_id,
        "store_name": store_name,
        "device_id": device_id,
        "date": day.isoformat(),
        "timezone": timezone,
        "day_start": local(start),
        "day_end": local(end),
        "hours": round((end - start) / 3600, 2),
        "interval_s": size,
        "limit_c": limit,
        "limit_rules": [{"rule_id": r.id, "max_c": r.max_c} for r in watching],
        "limit_note": NO_RULE if not watching else SEVERAL if len(watching) > 1 else None,
        "readings": sum(i["readings"] for i in intervals),
        "intervals": intervals,
        "gaps": gaps,
        "excursions": [_excursion(row, local, now) for row in excursions[:MAX_EXCURSIONS]],
        "excursions_truncated": len(excursions) > MAX_EXCURSIONS,
    }


@dataclass(slots=True)
class _Bucket:
    readings: int = 0
    min_c: float | None = None
    max_c: float | None = None
    last_c: float | None = None
    last_at: float = -math.inf
    defrost: int = 0
    faults: int = 0
    unsynced: int = 0


def _buckets(rows: Sequence[tuple[Any, ...]], start: float, size: int) -> dict[int, _Bucket]:
    """The day's rows gathered into the printed intervals (several rows to one when the interval was shorter)."""
    found: dict[int, _Bucket] = {}
    for row_start, min_c, max_c, last_c, readings, defrost, faults, last_at, _, unsynced in rows:
        bucket = found.setdefault(int((row_start - start) // size), _Bucket())
        bucket.readings += int(readings)
        bucket.defrost += int(defrost)
        bucket.faults += int(faults)
        bucket.unsynced += int(unsynced)
        if min_c is not None:
            bucket.min_c = min_c if bucket.min_c is None else min(bucket.min_c, min_c)
        if max_c is not None:
            bucket.max_c = max_c if bucket.max_c is None else max(bucket.max_c, max_c)
        if last_c is not None and last_at is not None and last_at >= bucket.last_at:
            bucket.last_c, bucket.last_at = last_c, last_at
    return found


def _excursion(row: tuple[Any, ...], local: Any, now: float) -> dict[str, Any]:
    alert_id, rule_id, limit_c, start, raised_at, cleared_at, max_c, reason, acks_text, synced = row
    try:
        acks = orjson.loads(acks_text)
    except orjson.JSONDecodeError:
        acks = []
    acks = [a for a in acks if isinstance(a, dict)] if isinstance(acks, list) else []
    until = cleared_at if cleared_at is not None else max(now, start)
    duration = (
        (until - start) / 60 if isinstance(until, int | float) and isinstance(start, int | float) else 0.0
    )
    return {
        "alert_id": alert_id,
        "rule_id": rule_id,
        "limit_c": limit_c,
        "start": local(start),
        "raised_at": local(raised_at),
        "end": local(cleared_at) if cleared_at is not None else None,
        "open": cleared_at is None,
        "duration_min": round(duration, 1) if math.isfinite(duration) else None,
        "max_c": max_c,
        "ended_by": reason,
        "corrective_action": "; ".join(str(a.get("note", "")) for a in acks if a.get("note")) or None,
        "acknowledged_by": ", ".join(dict.fromkeys(_who(a) for a in acks)) or None,
        "acknowledged_at": local(float(acks[0]["at"]))
        if acks and isinstance(acks[0].get("at"), int | float)
        else None,
        "acknowledgements": [
            {
                "at": local(float(a["at"])) if isinstance(a.get("at"), int | float) else None,
                "note": a.get("note"),
                "role": a.get("role"),
                "by": a.get("by"),
                "via": a.get("via"),
            }
            for a in acks
        ],
        "clock_synced": bool(synced),
    }


def _who(ack: dict[str, Any]) -> str:
    """Who acknowledged: the local page's user by name with their role, else the role."""
    role = str(ack.get("role", ""))
    return f"{ack['by']} ({role})" if ack.get("by") else role


def as_json(report: dict[str, Any]) -> bytes:
    return orjson.dumps(report)


def as_csv(report: dict[str, Any]) -> str:
    """The log as an inspector prints it: a header block, the intervals, then the excursions."""
    out = io.StringIO()
    write = csv.writer(out, lineterminator="\n").writerow
    limit = report["limit_c"]
    write(["HACCP temperature log"])
    write(["store", _cell(f"{report['store_name']} ({report['store_id']})")])
    write(["device", _cell(report["device_id"])])
    write(["date", report["date"], f"{report['day_start']} to {report['day_end']}", f"{report['hours']:g} h"])
    write(["timezone", report["timezone"]])
    write(["limit_c", "none" if limit is None else _num(limit), _cell(report["limit_note"] or "")])
    for rule in report["limit_rules"]:
        write(["rule", _cell(rule["rule_id"]), _num(rule["max_c"])])
    write(["interval_min", f"{report['interval_s'] / 60:g}"])
    write([])
    write(["interval_start", "interval_end", "readings", "min_c", "max_c", "last_c", "flags"])
    for i in report["intervals"]:
        flags = [
            name
            for name, on in (
                ("gap", i["gap"]),
                ("above_limit", i["above_limit"]),
                ("defrost", i["defrost"]),
                ("probe_fault", i["faults"]),
                ("clock_unsynced", i["clock_unsynced"]),
            )
            if on
        ]
        write(
            [
                i["start"],
                i["end"],
                i["readings"],
                _num(i["min_c"]),
                _num(i["max_c"]),
                _num(i["last_c"]),
                " ".join(flags),
            ]
        )
    write([])
    write(
        [
            "excursion_start",
            "excursion_end",
            "duration_min",
            "max_c",
            "limit_c",
            "alert_id",
            "corrective_action",
            "acknowledged_by",
            "acknowledged_at",
        ]
    )
    for e in report["excursions"]:
        write(
            [
                e["start"],
                e["end"] or "open",
                "" if e["duration_min"] is None else f"{e['duration_min']:.1f}",
                _num(e["max_c"]),
                _num(e["limit_c"]),
                _cell(e["alert_id"]),
                _cell(e["corrective_action"] or ""),
                _cell(e["acknowledged_by"] or ""),
                e["acknowledged_at"] or "",
            ]
        )
    if report.get("excursions_truncated"):
        write([f"more excursions than the {MAX_EXCURSIONS} listed"])
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _cell(text: str) -> str:
    return "'" + text if text.lstrip(" ").startswith(FORMULA_START) else text
