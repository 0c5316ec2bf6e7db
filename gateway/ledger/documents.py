"""Documents HQ sends down (roster, planogram, rules): their models, and storing them in the journal database.

A document is replaced whole by a downlink command (``roster.set``, ``planogram.set``, ``rules.set``) and kept in
the ``documents`` table of the journal, one row per name with a version that counts up from 1. Storing a
document and committing its ``document.updated`` event happen in one SQLite transaction (the journal's
``transact``), so the event and the stored document can never disagree.

The roster never holds biometric data: a roster carrying a face template, photo, fingerprint or similar field,
an encoded image or an embedding anywhere is refused as a whole, before anything is stored. The policy is
:mod:`gateway.kernel.biometrics`, the one the check-in kiosk's decoder uses.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import AwareDatetime, Field, ValidationError, model_validator

from gateway.kernel.biometrics import find_biometrics
from gateway.kernel.events import ShortText, Sku
from gateway.kernel.journal import Draft
from gateway.kernel.model import StrictModel

_LOGGER = logging.getLogger(__name__)

SCHEMA: Final = """CREATE TABLE IF NOT EXISTS documents(
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    request_id TEXT NOT NULL,
    updated_at TEXT NOT NULL
)"""
"""One statement, run with ``execute``: ``executescript`` would COMMIT the transaction it runs in."""

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


class Planogram(StrictModel):
    """``planogram.set`` args and the stored planogram."""

    shelves: list[Shelf] = Field(max_length=MAX_SHELVES)

    @model_validator(mode="after")
    def _unique_places(self) -> Planogram:
        _unique("(shelf_id, sku)", [f"{s.shelf_id}/{s.sku}" for s in self.shelves])
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


class RuleSet(StrictModel):
    """``rules.set`` args and the stored rules."""

    rules: list[StockLowRule] = Field(max_length=MAX_RULES)

    @model_validator(mode="after")
    def _unambiguous(self) -> RuleSet:
        _unique("rule id", [r.id for r in self.rules])
        _unique("stock.low rule per sku (null: the default)", [str(r.sku) for r in self.rules])
        return self

    @property
    def count(self) -> int:
        return len(self.rules)

    @property
    def default_threshold(self) -> float | None:
        """The ``stock.low`` threshold for SKUs without their own, if the rules set one."""
        return next((r.threshold for r in self.rules if r.sku is None), None)

    @property
    def sku_thresholds(self) -> dict[str, float]:
        return {r.sku: r.threshold for r in self.rules if r.sku is not None}


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


def create_table(conn: sqlite3.Connection) -> None:
    """Safe inside a transaction (DDL is transactional in SQLite)."""
    conn.execute(SCHEMA)


@dataclass(frozen=True, slots=True)
class Stored:
    """What a document command did: the version now in force, its entry count, and whether it was a replay."""

    version: int
    count: int
    duplicate: bool = False


def read_document(conn: sqlite3.Connection, name: DocumentName) -> tuple[int, bytes, str] | None:
    """(version, body JSON, request id) of the current document, or None if HQ never sent one."""
    row = conn.execute("SELECT version, body, request_id FROM documents WHERE name=?", (name,)).fetchone()
    return None if row is None else (int(row[0]), bytes(row[1]), str(row[2]))


def read_rules(conn: sqlite3.Connection) -> RuleSet | None:
    """The rules in force. A stored body that no longer validates is logged and ignored (config applies)."""
    found = read_document(conn, "rules")
    if found is None:
        return None
    try:
        return RuleSet.model_validate_json(found[1])
    except ValidationError as err:
        _LOGGER.error(
            "stored rules version %d are unreadable and ignored: %d error(s)", found[0], err.error_count()
        )
        return None


def store_work(
    name: DocumentName,
    document: Document,
    request_id: str,
    dedup_key: str,
    then: Callable[[sqlite3.Connection], None] | None = None,
) -> Callable[[sqlite3.Connection], tuple[Stored, list[Draft]]]:
    """Work for :meth:`gateway.kernel.journal.Journal.transact`: store ``document`` as the next version of ``name``, run
    ``then`` (in the same transaction), and return the ``document.updated`` draft that commits with it.

    A replay (an event with ``dedup_key`` is committed, or the current version came from this request) changes
    nothing and answers the current version as a duplicate."""
    body = document.model_dump_json().encode()

    def work(conn: sqlite3.Connection) -> tuple[Stored, list[Draft]]:
        create_table(conn)
        current = read_document(conn, name)
        # The journal's idempotency table remembers the key after TTL or the disk budget removed the event.
        replayed = conn.execute("SELECT 1 FROM idempotency WHERE key=?", (dedup_key,)).fetchone()
        if replayed is not None or (current is not None and current[2] == request_id):
            version = 0 if current is None else current[0]
            return Stored(version, _count(name, current), duplicate=True), []
        version = 1 if current is None else current[0] + 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        conn.execute(
            "INSERT OR REPLACE INTO documents(name, version, body, request_id, updated_at) VALUES (?,?,?,?,?)",
            (name, version, body, request_id, now),
        )
        if then is not None:
            then(conn)
        data = {"name": name, "version": version, "count": document.count, "request_id": request_id}
        draft = Draft("document.updated", None, orjson.dumps(data), dedup_key=dedup_key, driver="downlink")
        return Stored(version, document.count), [draft]

    return work


def _count(name: DocumentName, current: tuple[int, bytes, str] | None) -> int:
    if current is None:
        return 0
    try:
        return MODELS[name].model_validate_json(current[1]).count
    except ValidationError:
        return 0
