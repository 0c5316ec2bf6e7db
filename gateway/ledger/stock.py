"""The stock ledger: on-hand per SKU, moved by sales and returns inside the journal's commit transaction.

Because the ledger is updated in the same SQLite transaction that stores the sale, a sale moves stock exactly
once: a crash before COMMIT undoes both, a redelivered sale after COMMIT is dropped by the journal's dedup.

HQ's ``stock.adjust`` commands arrive as ``stock.adjusted`` events and move stock the same way, in seq order
with the sales around them: ``delta`` adds (or removes) units, ``set`` is a stock-take count that replaces the
on-hand. They apply once per request id, by the journal's dedup key.

After each group commit the ledger emits one ``stock.level`` per SKU it moved, carrying the SKU's safety stock;
the rule engine after it raises ``stock.low`` when a SKU is at or below it, and clears it when it is above it
again (:mod:`rules.stock`). The ``low`` column says which SKUs are low, for the local API.

A SKU's threshold is, first found: its HQ rule (the ``rules`` document, see :mod:`gateway.ledger.documents`), its
configured ``safety_stock`` (config items or CSV), the rules' default, the config's ``default_safety_stock``.
The ``stock`` table keeps the SKU's own threshold in ``safety_stock`` (NULL: the default applies) and the
configured one in ``base_safety_stock``, so a rule that HQ removes gives the configured threshold back.
"""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Final

from cloud_bridge.documents import RuleSet
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.events import PosReturn, PosSale, StockAdjusted, StockLevel
from gateway.kernel.metrics import Metrics
from gateway.kernel.pipeline import Emit, Event, Processor
from gateway.ledger.config import StockConfig
from gateway.ledger.documents import create_table, read_rules

_LOGGER = logging.getLogger(__name__)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS stock(
    sku TEXT PRIMARY KEY,
    on_hand REAL NOT NULL,
    safety_stock REAL,
    updated_seq INTEGER,
    low INTEGER NOT NULL DEFAULT 0,
    base_safety_stock REAL
);
CREATE TABLE IF NOT EXISTS stock_sold_daily(
    sku TEXT NOT NULL,
    day INTEGER NOT NULL,
    sold REAL NOT NULL,
    PRIMARY KEY (sku, day)
);
"""
SOLD_KEEP_DAYS: Final = 100
"""Units sold per SKU per day (UTC) are kept this long, for the replenishment rules' sales velocity."""


def utc_day() -> int | None:
    """Today (UTC days since 1970); the runtime gives None while the clock is not synchronised."""
    return int(time.time() // 86_400)


class StockConfigError(StoreGatewayError, ValueError):
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


class StockLedger(Processor):
    """The first processor of the pipeline (:mod:`gateway.kernel.pipeline`): sales, returns and HQ adjustments
    move stock; it emits ``stock.level`` for the processors after it."""

    name = "stock"

    def __init__(
        self, config: StockConfig, metrics: Metrics, today: Callable[[], int | None] = utc_day
    ) -> None:
        self._config = config
        self._today = today
        self._sold: dict[str, dict[int, Decimal]] = {}
        """SKU -> UTC day -> units sold that day (returns take off), the last SOLD_KEEP_DAYS days."""
        self._sold_moved: set[tuple[str, int]] = set()
        self._pruned: int | None = None
        self._metrics = metrics
        self._levels: dict[str, _Level] = {}
        self._sku_rules: dict[str, Decimal] = {}
        """HQ's per-SKU thresholds, for SKUs the ledger has not seen yet."""
        self._default: Decimal | None = None
        self._moved: dict[str, int] = {}
        self._first_cause: dict[str, int] = {}

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(stock)")}
        initial: list[tuple[str, float, float | None]] = []
        if self._config.initial_csv is not None:
            initial += read_initial_csv(self._config.initial_csv)
        initial += [(i.sku, i.on_hand, i.safety_stock) for i in self._config.items]
        # Initial levels apply once per SKU: a restart must not reset stock that sales have moved since.
        # safety_stock NULL means "the configured default", resolved at load, so changing the default works.
        conn.execute("BEGIN")
        if "base_safety_stock" not in columns:
            # A journal from before HQ rules: every threshold it holds was configured.
            conn.execute("ALTER TABLE stock ADD COLUMN base_safety_stock REAL")
            conn.execute("UPDATE stock SET base_safety_stock=safety_stock")
        create_table(conn)
        conn.executemany(
            "INSERT OR IGNORE INTO stock(sku, on_hand, low) VALUES (?,?,0)",
            [(sku, on_hand) for sku, on_hand, _ in initial],
        )
        # Configured thresholds are read again at every start; HQ's rules (kept in the journal) override them.
        conn.executemany(
            "UPDATE stock SET base_safety_stock=? WHERE sku=?", [(safety, sku) for sku, _, safety in initial]
        )
        apply_rule_thresholds(conn, read_rules(conn))
        conn.execute("COMMIT")
        self._load(conn)

    def _load(self, conn: sqlite3.Connection) -> None:
        rules = read_rules(conn)
        default = self._config.default_safety_stock
        self._sku_rules = {}
        if rules is not None:
            self._sku_rules = {sku: _dec(threshold) for sku, threshold in rules.sku_thresholds.items()}
            if rules.default_threshold is not None:
                default = rules.default_threshold
        self._default = None if default is None else _dec(default)
        self._levels = {}
        for sku, on_hand, safety, low in conn.execute("SELECT sku, on_hand, safety_stock, low FROM stock"):
            threshold = safety if safety is not None else default
            level = _dec(on_hand)
            self._levels[sku] = _Level(
                level, None if threshold is None else _dec(threshold), bool(low), level, safety is None
            )
        self._moved.clear()
        self._first_cause.clear()
        self._sold = {}
        for sku, day, sold in conn.execute("SELECT sku, day, sold FROM stock_sold_daily"):
            self._sold.setdefault(sku, {})[int(day)] = _dec(sold)
        self._sold_moved.clear()

    def velocity(self, sku: str, days: int) -> Decimal | None:
        """Units of ``sku`` sold per day over the last ``days`` days, today included (returns take off); None
        while the clock is not synchronised (which days are the last ones is not known)."""
        today = self._today()
        if today is None:
            return None
        sold = sum(
            (n for day, n in self._sold.get(sku, {}).items() if today - days < day <= today), Decimal(0)
        )
        return max(Decimal(0), sold) / days

    def apply(self, event: Event) -> None:
        kind = event.kind
        if kind == "stock.adjusted":
            adjustment = event.model
            assert isinstance(adjustment, StockAdjusted)
            self._adjust(event.seq, adjustment)
            return
        if kind not in ("pos.sale", "pos.return"):
            return
        model = event.model
        if isinstance(model, PosReturn):
            sign = 1
        elif isinstance(model, PosSale):
            sign = -1
        else:
            return
        seq = event.seq
        today = self._today()  # None: the clock is not set, the day is not known: not counted for velocity
        for line in model.lines:
            if today is not None:
                days = self._sold.setdefault(line.sku, {})
                days[today] = days.get(today, Decimal(0)) - sign * line.quantity
                self._sold_moved.add((line.sku, today))
            level = self._levels.get(line.sku)
            if level is None:
                self._metrics.stock_unknown_sku.inc()
                level = self._new_level(line.sku)
            level.on_hand += sign * line.quantity
            self._moved[line.sku] = seq
            self._first_cause.setdefault(line.sku, seq)

    def _adjust(self, seq: int, adjustment: StockAdjusted) -> None:
        """HQ receiving, transfers and stock-takes. A SKU new to the ledger is expected here (new goods)."""
        level = self._levels.get(adjustment.sku)
        if level is None:
            level = self._new_level(adjustment.sku)
        if adjustment.set is not None:
            level.on_hand = adjustment.set
        elif adjustment.delta is not None:
            level.on_hand += adjustment.delta
        else:
            return
        self._moved[adjustment.sku] = seq
        self._first_cause.setdefault(adjustment.sku, seq)

    def _new_level(self, sku: str) -> _Level:
        own = self._sku_rules.get(sku)
        threshold = own if own is not None else self._default
        level = _Level(Decimal(0), threshold, False, Decimal(0), own is None)
        self._levels[sku] = level
        return level

    def flush(self, conn: sqlite3.Connection) -> list[Emit]:
        if not self._moved:
            return []
        derived: list[Emit] = []
        rows = []
        for sku, seq in self._moved.items():
            level = self._levels[sku]
            level.low = level.safety_stock is not None and level.on_hand <= level.safety_stock
            own_threshold = None if level.default_threshold else _float(level.safety_stock)
            rows.append((sku, float(level.on_hand), own_threshold, seq, int(level.low)))
            report = StockLevel(
                sku=sku,
                on_hand=_plain(level.on_hand),
                delta=_plain(level.on_hand - level.reported),
                safety_stock=None if level.safety_stock is None else _plain(level.safety_stock),
                cause_seqs=(self._first_cause[sku], seq),
            )
            level.reported = level.on_hand
            derived.append(Emit(report))
        conn.executemany(
            "INSERT OR REPLACE INTO stock_sold_daily(sku, day, sold) VALUES (?,?,?)",
            [(sku, day, float(self._sold[sku][day])) for sku, day in self._sold_moved],
        )
        today = self._today()
        if self._sold_moved and today is not None and self._pruned != today:  # once a day
            self._pruned = today
            # Days out of the window, and days "ahead" that a clock set wrong once recorded
            conn.execute(
                "DELETE FROM stock_sold_daily WHERE day <= ? OR day > ?", (today - SOLD_KEEP_DAYS, today)
            )
            for days in self._sold.values():
                for day in [d for d in days if d <= today - SOLD_KEEP_DAYS or d > today]:
                    del days[day]
            self._sold = {sku: days for sku, days in self._sold.items() if days}
        self._sold_moved.clear()
        conn.executemany(
            "INSERT INTO stock(sku, on_hand, safety_stock, updated_seq, low) VALUES (?,?,?,?,?) "
            "ON CONFLICT(sku) DO UPDATE SET on_hand=excluded.on_hand, updated_seq=excluded.updated_seq, "
            "low=excluded.low",
            rows,
        )
        self._moved.clear()
        self._first_cause.clear()
        return derived

    def rollback(self, conn: sqlite3.Connection) -> None:
        """The commit failed: back to the levels on disk."""
        self._load(conn)

    def reload(self, conn: sqlite3.Connection) -> None:
        """Thresholds or levels changed in the tables (HQ's rules, a stock-take): read them again."""
        self._load(conn)


def apply_rule_thresholds(conn: sqlite3.Connection, rules: RuleSet | None) -> None:
    """Make the ``stock`` table's thresholds those of ``rules`` (configured ones where no rule names the SKU).

    Runs inside the caller's transaction: at start-up, and in ``rules.set`` together with storing the rules, so
    both commit or neither does. The ledger reloads afterwards (the journal's ``transact`` does that)."""
    conn.execute(
        "UPDATE stock SET safety_stock=base_safety_stock WHERE safety_stock IS NOT base_safety_stock"
    )
    if rules is not None:
        conn.executemany(
            "UPDATE stock SET safety_stock=? WHERE sku=?",
            [(threshold, sku) for sku, threshold in rules.sku_thresholds.items()],
        )


def quantity_text(value: float) -> str:
    """A stock quantity read from the ``stock`` table, as events carry it: 12.5 -> '12.5', 3.0 -> '3'."""
    return _text(_dec(value))


def _dec(value: float) -> Decimal:
    """SQLite REAL back to a Decimal without binary noise (quantities have at most 3 decimals)."""
    return Decimal(repr(value)).quantize(Decimal("0.001")).normalize() if value % 1 else Decimal(int(value))


def _plain(value: Decimal) -> Decimal:
    """The same quantity written as :func:`_text` writes it (no exponent, no trailing zeros): how it serialises."""
    return Decimal(_text(value))


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _text(value: Decimal) -> str:
    """Decimal as plain text without exponent or trailing zeros: Decimal('199.000') -> '199'."""
    return format(value.normalize(), "f") if value else "0"
