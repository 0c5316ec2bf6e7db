"""The stock ledger's config section: initial levels and safety-stock thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from gateway.kernel.model import StrictModel
from gateway.kernel.rule_config import StockLowAlerts


class StockItem(StrictModel):
    sku: Annotated[str, Field(min_length=1, max_length=64)] = Field(description="SKU as the tills send it.")
    on_hand: float = Field(
        description="Initial on-hand units, applied once when the ledger first sees the SKU."
    )
    safety_stock: float | None = Field(default=None, ge=0, description="At or below this, raise stock.low.")


class StockConfig(StrictModel):
    initial_csv: Path | None = Field(
        default=None, description="CSV with columns sku,on_hand[,safety_stock]; imported once per SKU."
    )
    items: list[StockItem] = Field(default_factory=list, description="Initial levels and thresholds inline.")
    default_safety_stock: float | None = Field(
        default=None, ge=0, description="Threshold for SKUs without one."
    )
    low_alert: StockLowAlerts = Field(
        default_factory=StockLowAlerts,
        description="The stock.low alerts: severity, notify, renotify_s, escalate, select.skus (docs/RULES.md).",
    )
