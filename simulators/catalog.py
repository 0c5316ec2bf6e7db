"""A small catalog for a Hong Kong convenience store with a pharmacy counter, used by the simulators.

SKUs ``SKU-0001`` to ``SKU-0020`` are fixed: the demo configuration refers to them. The GTIN-13s carry the
GS1 Hong Kong prefix 489 with an invented company number, so they look real and never clash with a real
product; their check digits are computed, not typed. Prices are in HKD with tax included (Hong Kong has
no sales tax), held in integer cents so the simulator's hot path never touches ``Decimal``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

CURRENCY: Final = "HKD"


def gtin_check_digit(body: str) -> int:
    """The GS1 mod-10 check digit for a GTIN without its last digit (any GTIN length).

    Weights alternate 3, 1, 3... starting from the rightmost digit of the body.
    """
    if not body.isascii() or not body.isdigit():
        raise ValueError(f"a GTIN body is digits only, got {body!r}")
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return (10 - total % 10) % 10


def is_valid_gtin(gtin: str) -> bool:
    """True for a GTIN-8/12/13/14 whose last digit is the right check digit."""
    if len(gtin) not in (8, 12, 13, 14) or not gtin.isascii() or not gtin.isdigit():
        return False
    return gtin_check_digit(gtin[:-1]) == int(gtin[-1])


def format_cents(cents: int) -> str:
    """Money as the wire carries it: a JSON string with two decimals ("12.50", "-3.05")."""
    if cents < 0:
        return "-" + format_cents(-cents)
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass(frozen=True, slots=True)
class CatalogItem:
    sku: str
    name: str
    gtin: str
    unit_price_cents: int
    unit_price: str = field(init=False)
    """The price as the wire carries it ("11.50"), formatted once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_price", format_cents(self.unit_price_cents))


_COMPANY_PREFIX: Final = "4899999"
"""GS1 Hong Kong prefix 489 plus an invented company number; item references follow."""

_ITEMS: Final[tuple[tuple[str, int], ...]] = (
    ("Distilled water 1.5L", 1150),
    ("Lemon tea 250ml pack", 650),
    ("Soy milk 250ml pack", 700),
    ("Fresh milk 946ml", 2890),
    ("Cup noodles seafood", 1090),
    ("Fishball curry skewer", 1500),
    ("Pineapple bun", 900),
    ("Potato chips 55g", 1290),
    ("Chocolate wafer 4-finger", 950),
    ("Probiotic drink 5x100ml", 1690),
    ("Paracetamol 500mg 20 tablets", 4290),
    ("Throat lozenges 16s", 3250),
    ("Surgical masks 50s", 4900),
    ("Hand sanitiser 75% 100ml", 2890),
    ("Medicated oil 10ml", 3800),
    ("Adhesive bandages 20s", 2490),
    ("Toothpaste 160g", 3190),
    ("Pocket tissues 18 packs", 2590),
    ("AA batteries 4-pack", 4590),
    ("Umbrella compact", 8900),
)


def _build_catalog() -> tuple[CatalogItem, ...]:
    items = []
    for n, (name, cents) in enumerate(_ITEMS, start=1):
        body = f"{_COMPANY_PREFIX}{n:05d}"
        items.append(CatalogItem(f"SKU-{n:04d}", name, body + str(gtin_check_digit(body)), cents))
    return tuple(items)


CATALOG: Final[tuple[CatalogItem, ...]] = _build_catalog()
"""The 20 items, in SKU order."""

CATALOG_BY_SKU: Final[dict[str, CatalogItem]] = {item.sku: item for item in CATALOG}
