"""The documents HQ sends down (roster, planogram, rules): their schema, part of the HQ command protocol.

A document is replaced whole by a downlink command (``roster.set``, ``planogram.set``, ``rules.set``); the
gateway stores it (:mod:`gateway.ledger.documents`). These models are what both sides validate against.

The roster never holds biometric data: a roster carrying a face template, photo, fingerprint or similar field,
an encoded image or an embedding anywhere is refused as a whole, before anything is stored. The policy is
:mod:`gateway.kernel.biometrics`, the one the check-in kiosk's decoder uses.
"""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from gateway.kernel.biometrics import find_biometrics
from gateway.kernel.events import ShortText, Sku
from gateway.kernel.model import Identifier, StrictModel
from gateway.kernel.rule_config import (
    STOCK_LOW_ID,
    EngineRule,
    RuleDefinition,
    check_one_attendance_rule,
)

DocumentName = Literal["roster", "planogram", "rules"]


MAX_STAFF: Final = 5_000


MAX_SHIFTS: Final = 200


MAX_SHELVES: Final = 50_000


MAX_RULES: Final = 10_000


MAX_THRESHOLD: Final = 10**6
"""Same bound as a stock quantity."""


MAX_SHIFT: Final = timedelta(hours=24)


MAX_SHOWN: Final = 6
"""Biometric findings named in a refused roster's error, at most."""


Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


def biometric_keys(value: object) -> list[str]:
    """Where, at any depth, the document holds biometric data (``staff[0].face_template``), by the policy of
    :mod:`gateway.kernel.biometrics` (the kiosk decoder's too): keys that name it, encoded images, embeddings."""
    return [(f.path or "(document)")[:100] for f in find_biometrics(value, MAX_SHOWN)]


class Shift(StrictModel):
    start: AwareDatetime = Field(description="Shift start, ISO 8601 with a UTC offset.")
    end: AwareDatetime = Field(description="Shift end; after start, at most 24 h later.")

    @model_validator(mode="after")
    def _ordered(self) -> Shift:
        if not self.start < self.end <= self.start + MAX_SHIFT:
            raise ValueError("a shift ends after it starts and lasts at most 24 h")
        return self


class StaffMember(StrictModel):
    staff_id: ShortText
    name: Name
    role: ShortText
    shifts: list[Shift] = Field(default_factory=list, max_length=MAX_SHIFTS)

    @model_validator(mode="after")
    def _apart(self) -> StaffMember:
        spans = sorted((s.start, s.end) for s in self.shifts)
        for (_, end), (start, _) in pairwise(spans):
            if start < end:
                raise ValueError(
                    f"{self.staff_id}: shifts overlap ({start.isoformat()}): merge them into one"
                )
        return self


class Roster(StrictModel):
    """``roster.set`` args and the stored roster."""

    staff: list[StaffMember] = Field(max_length=MAX_STAFF)

    @model_validator(mode="before")
    @classmethod
    def _no_biometrics(cls, data: Any) -> Any:
        refused = find_biometrics(data, MAX_SHOWN)
        if refused:
            shown = ", ".join(str(f)[:120] for f in refused[: MAX_SHOWN - 1])
            shown += " ..." if len(refused) >= MAX_SHOWN else ""
            raise ValueError(f"biometric data is never stored; refused field(s): {shown}")
        return data

    @model_validator(mode="after")
    def _unique_staff(self) -> Roster:
        _unique("staff_id", [s.staff_id for s in self.staff])
        return self

    @property
    def count(self) -> int:
        return len(self.staff)


class Shelf(StrictModel):
    shelf_id: ShortText
    sku: Sku
    facings: int = Field(ge=1, le=1000, description="Product faces visible at the front of the shelf.")
    min_on_shelf: int = Field(
        ge=0, le=MAX_THRESHOLD, description="Units below which the shelf needs filling."
    )
    gtin: Annotated[str, Field(pattern=r"^\d{14}$")] | None = Field(
        default=None,
        description="GTIN-14 of the SKU's tags: the RFID shelf rules watch the shelf for it (none: not watched).",
    )
    reader: Identifier | None = Field(
        default=None, description="Device id of the RFID reader that watches the shelf; default the shelf_id."
    )

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An entry without ``gtin`` or ``reader`` is stored (and sent) as it was before they existed."""
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (k in ("gtin", "reader") and v is None)}


class Planogram(StrictModel):
    """``planogram.set`` args and the stored planogram."""

    shelves: list[Shelf] = Field(max_length=MAX_SHELVES)

    @model_validator(mode="after")
    def _unique_places(self) -> Planogram:
        _unique("(shelf_id, sku)", [f"{s.shelf_id}/{s.sku}" for s in self.shelves])
        _unique("(shelf_id, gtin)", [f"{s.shelf_id}/{s.gtin}" for s in self.shelves if s.gtin is not None])
        # A reader counts tags, not shelves: two of its shelves with one GTIN could not be told apart.
        _unique(
            "(reader, gtin): one reader's shelves hold a GTIN once",
            [f"{s.reader or s.shelf_id}/{s.gtin}" for s in self.shelves if s.gtin is not None],
        )
        return self

    @property
    def count(self) -> int:
        return len(self.shelves)


class StockLowRule(StrictModel):
    """Raise ``stock.low`` at or below ``threshold``: for one SKU, or (sku null) for every SKU without its own."""

    id: ShortText
    type: Literal["stock.low"]
    sku: Sku | None = None
    threshold: float = Field(ge=0, le=MAX_THRESHOLD)


AnyRule = Annotated[StockLowRule | EngineRule, Field(discriminator="type")]
"""A rule of HQ's ``rules`` document: the stock ledger's ``stock.low`` thresholds, or a rule of the engine (the
same models as the store config's ``rules:``)."""


class RuleSet(StrictModel):
    """``rules.set`` args and the stored rules."""

    rules: list[AnyRule] = Field(max_length=MAX_RULES)

    @model_validator(mode="after")
    def _unambiguous(self) -> RuleSet:
        _unique("rule id", [r.id for r in self.rules])
        _unique("stock.low rule per sku (null: the default)", [str(r.sku) for r in self.stock_low])
        check_one_attendance_rule(list(self.engine_rules))
        if any(r.id == STOCK_LOW_ID for r in self.engine_rules):
            raise ValueError(
                f"rule id {STOCK_LOW_ID!r} is the stock.low alerts' own: give this rule another id"
            )
        return self

    @property
    def stock_low(self) -> list[StockLowRule]:
        return [r for r in self.rules if isinstance(r, StockLowRule)]

    @property
    def engine_rules(self) -> list[RuleDefinition]:
        """The rules the rule engine runs (everything but the stock ledger's thresholds)."""
        return [r for r in self.rules if not isinstance(r, StockLowRule)]

    @property
    def count(self) -> int:
        return len(self.rules)

    @property
    def default_threshold(self) -> float | None:
        """The ``stock.low`` threshold for SKUs without their own, if the rules set one."""
        return next((r.threshold for r in self.stock_low if r.sku is None), None)

    @property
    def sku_thresholds(self) -> dict[str, float]:
        return {r.sku: r.threshold for r in self.stock_low if r.sku is not None}


Document = Roster | Planogram | RuleSet


MODELS: Final[dict[DocumentName, type[Document]]] = {
    "roster": Roster,
    "planogram": Planogram,
    "rules": RuleSet,
}


def _unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what}: {value[:64]!r}")
        seen.add(value)
