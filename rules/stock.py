"""The stock ledger: on-hand per SKU, moved by sales and returns inside the journal's commit transaction.

Because the ledger is updated in the same SQLite transaction that stores the sale, a sale moves stock exactly
once: a crash before COMMIT undoes both, a redelivered sale after COMMIT is dropped by the journal's dedup.

After each group commit the ledger emits one ``stock.level`` per SKU it moved, and an ``alert.raised``
(rule ``stock.low``) when a SKU falls to or below its safety stock. The alert fires once per crossing; the SKU
re-arms when stock rises above the threshold again.
"""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Final

import orjson

from gateway.config import StockConfig
from gateway.events import PosReturn, PosSale
from gateway.journal import Draft
from gateway.metrics import Metrics

_LOGGER = logging.getLogger(__name__)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS stock(
    sku TEXT PRIMARY KEY,
    on_hand REAL NOT NULL,
    safety_stock REAL,
    updated_seq INTEGER,
    low INTEGER NOT NULL DEFAULT 0
);
"""


class StockConfigError(ValueError):
    """The initial stock CSV cannot be read; the message names the file and row."""


@dataclass(slots=True)
class _Level:
    on_hand: Decimal
    safety_stock: Decimal | None
    low: bool
    reported: Decimal
    default_threshold: bool = True
    """The threshold is the configured default (stored as NULL), not the SKU's own."""


def read_initial_csv(path: Path) -> list[tuple[str, float, float | None]]:
    """Rows of ``sku,on_hand[,safety_stock]`` (a header row is allowed)."""
    rows: list[tuple[str, float, float | None]] = []
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or row[0].strip().lower() in ("", "sku") or row[0].startswith("#"):
                    continue
                try:
                    rows.append(_parse_row(row))
                except (IndexError, ValueError) as err:
                    raise StockConfigError(
                        f"{path}:{lineno}: expected sku,on_hand[,safety_stock]: {err}"
                    ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise StockConfigError(f"cannot read {path}: {err}") from err
    return rows


def _parse_row(row: list[str]) -> tuple[str, float, float | None]:
    safety = float(row[2]) if len(row) > 2 and row[2].strip() else None
    on_hand = float(row[1])
    if not math.isfinite(on_hand) or (safety is not None and not (math.isfinite(safety) and safety >= 0)):
        raise ValueError("on_hand must be a finite number, safety_stock a finite number >= 0")
    return row[0].strip(), on_hand, safety


class StockLedger:
    """A journal processor (see :class:`gateway.journal.Processor`)."""

    def __init__(self, config: StockConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._levels: dict[str, _Level] = {}
        self._moved: dict[str, int] = {}
        self._first_cause: dict[str, int] = {}

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        initial: list[tuple[str, float, float | None]] = []
        if self._config.initial_csv is not None:
            initial += read_initial_csv(self._config.initial_csv)
        initial += [(i.sku, i.on_hand, i.safety_stock) for i in self._config.items]
        # Initial levels apply once per SKU: a restart must not reset stock that sales have moved since.
        # safety_stock NULL means "the configured default", resolved at load, so changing the default works.
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR IGNORE INTO stock(sku, on_hand, safety_stock, low) VALUES (?,?,?,0)",
            [(sku, on_hand, safety) for sku, on_hand, safety in initial],
        )
        # Thresholds from config always win: HQ changes them by changing config.
        conn.executemany(
            "UPDATE stock SET safety_stock=? WHERE sku=?", [(safety, sku) for sku, _, safety in initial]
        )
        conn.execute("COMMIT")
        self._load(conn)

    def _load(self, conn: sqlite3.Connection) -> None:
        default = self._config.default_safety_stock
        self._levels = {}
        for sku, on_hand, safety, low in conn.execute("SELECT sku, on_hand, safety_stock, low FROM stock"):
            threshold = safety if safety is not None else default
            level = _dec(on_hand)
            self._levels[sku] = _Level(
                level, None if threshold is None else _dec(threshold), bool(low), level, safety is None
            )
        self._moved.clear()
        self._first_cause.clear()

    def apply(self, seq: int, draft: Draft) -> None:
        model = draft.model
        if isinstance(model, PosReturn):
            sign = 1
        elif isinstance(model, PosSale):
            sign = -1
        else:
            return
        for line in model.lines:
            level = self._levels.get(line.sku)
            if level is None:
                self._metrics.stock_unknown_sku.inc()
                default = self._config.default_safety_stock
                level = _Level(
                    Decimal(0), None if default is None else _dec(default), False, Decimal(0), True
                )
                self._levels[line.sku] = level
            level.on_hand += sign * line.quantity
            self._moved[line.sku] = seq
            self._first_cause.setdefault(line.sku, seq)

    def flush(self, conn: sqlite3.Connection, first_seq: int, last_seq: int) -> list[Draft]:
        if not self._moved:
            return []
        derived: list[Draft] = []
        alerts: list[Draft] = []
        rows = []
        for sku, seq in self._moved.items():
            level = self._levels[sku]
            was_low = level.low
            level.low = level.safety_stock is not None and level.on_hand <= level.safety_stock
            own_threshold = None if level.default_threshold else _float(level.safety_stock)
            rows.append((sku, float(level.on_hand), own_threshold, seq, int(level.low)))
            data = {
                "sku": sku,
                "on_hand": _text(level.on_hand),
                "delta": _text(level.on_hand - level.reported),
                "safety_stock": None if level.safety_stock is None else _text(level.safety_stock),
                "cause_seqs": [self._first_cause[sku], seq],
            }
            level.reported = level.on_hand
            derived.append(Draft("stock.level", None, orjson.dumps(data)))
            if level.low and not was_low:
                alerts.append(self._low_stock_alert(sku, level))
        conn.executemany(
            "INSERT INTO stock(sku, on_hand, safety_stock, updated_seq, low) VALUES (?,?,?,?,?) "
            "ON CONFLICT(sku) DO UPDATE SET on_hand=excluded.on_hand, updated_seq=excluded.updated_seq, "
            "low=excluded.low",
            rows,
        )
        self._moved.clear()
        self._first_cause.clear()
        return derived + alerts

    def rollback(self, conn: sqlite3.Connection) -> None:
        self._load(conn)

    @staticmethod
    def _low_stock_alert(sku: str, level: _Level) -> Draft:
        safety = _text(level.safety_stock) if level.safety_stock is not None else None
        data = {
            "rule": "stock.low",
            "severity": "warning",
            "subject": sku,
            "message": f"{sku}: on hand {_text(level.on_hand)} is at or below safety stock {safety}",
            "details": {"on_hand": _text(level.on_hand), "safety_stock": safety},
        }
        return Draft("alert.raised", None, orjson.dumps(data))


def _dec(value: float) -> Decimal:
    """SQLite REAL back to a Decimal without binary noise (quantities have at most 3 decimals)."""
    return Decimal(repr(value)).quantize(Decimal("0.001")).normalize() if value % 1 else Decimal(int(value))


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _text(value: Decimal) -> str:
    """Decimal as plain text without exponent or trailing zeros: Decimal('199.000') -> '199'."""
    return format(value.normalize(), "f") if value else "0"
