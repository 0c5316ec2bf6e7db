"""The planogram as the RFID shelf rules read it: which reader watches which shelf, for which GTIN.

Built from HQ's ``planogram`` document (:class:`cloud_bridge.documents.Planogram`). Only shelf entries with a
``gtin`` are watched; a shelf's reader is its ``reader``, or the device whose id is the ``shelf_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_bridge.documents import Planogram


@dataclass(frozen=True, slots=True)
class Place:
    """One GTIN on one shelf, and the reader that watches it."""

    shelf_id: str
    sku: str
    gtin: str
    reader: str
    facings: int
    min_on_shelf: int

    @property
    def subject(self) -> str:
        return f"{self.shelf_id}/{self.gtin}"


class Layout:
    """The watched places of a planogram, indexed for the rules (an empty one without a planogram)."""

    def __init__(self, planogram: Planogram | None = None) -> None:
        self.places: dict[str, Place] = {}
        """By subject, ``<shelf_id>/<gtin>``."""
        self.by_reader: dict[str, list[Place]] = {}
        self.by_gtin: dict[str, list[Place]] = {}
        self.gtin_of_sku: dict[str, str] = {}
        self.partial: set[str] = set()
        """Readers that also watch shelf entries without a GTIN: their goods cannot be told from misplaced ones."""
        self._shelves: dict[str, set[str]] = {}
        for shelf in planogram.shelves if planogram is not None else ():
            reader = shelf.reader or shelf.shelf_id
            self._shelves.setdefault(reader, set()).add(shelf.shelf_id)
            if shelf.gtin is None:
                self.partial.add(reader)
                continue
            place = Place(shelf.shelf_id, shelf.sku, shelf.gtin, reader, shelf.facings, shelf.min_on_shelf)
            if place.subject in self.places:  # the same GTIN twice on a shelf (two SKUs): the first counts
                continue
            self.places[place.subject] = place
            self.by_reader.setdefault(reader, []).append(place)
            self.by_gtin.setdefault(place.gtin, []).append(place)
            self.gtin_of_sku.setdefault(shelf.sku, shelf.gtin)

    def area(self, reader: str) -> str:
        """What a reader watches, as alerts name it: its shelf, or the reader itself if it watches several."""
        shelves = self._shelves.get(reader, set())
        return next(iter(shelves)) if len(shelves) == 1 else reader

    def planned(self, reader: str) -> frozenset[str]:
        """The GTINs the planogram puts on the shelves this reader watches."""
        return frozenset(p.gtin for p in self.by_reader.get(reader, ()))


def gtin14(code: str | None) -> str | None:
    """A till's GTIN-8/12/13/14 as a GTIN-14 (zeros in front), as RFID tags carry it."""
    if code is None or not code.isdigit() or len(code) > 14:
        return None
    return code.rjust(14, "0")
