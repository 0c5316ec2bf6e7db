"""Pure RFID inventory aggregation: hundreds of raw tag reads per second in, one ``rfid.inventory`` per window out.

Used by the serial RFID reader driver and by RFID shelves over MQTT. One tracker per reader (or shelf):
``read`` for every raw read, ``due`` to ask whether the window is over, ``close_window`` to get the window's
:class:`gateway.kernel.events.RfidInventory` (tags with read counts, strongest RSSI and its antenna, GTIN and serial
for SGTINs) and what changed: ``appeared`` (not present before this window) and ``departed`` (not read for
``depart_after_s``). Memory is bounded by ``max_tags`` (tags beyond it are counted in ``truncated``).
"""

from __future__ import annotations

import math
from typing import Final

from drivers.epc import EpcInfo, decode_epc
from gateway.kernel.events import RfidInventory, RfidTag

MAX_TAGS_LIMIT: Final = 5000
"""RfidInventory carries at most this many tags (and appeared/departed ids)."""
_HEX: Final = frozenset("0123456789ABCDEF")


class _TagReads:
    __slots__ = ("antenna", "reads", "rssi")

    def __init__(self, rssi: float | None, antenna: int | None) -> None:
        self.reads = 1
        self.rssi = rssi
        self.antenna = antenna


class InventoryTracker:
    """Aggregates one reader's raw reads into windows. Not thread-safe; ``now`` is a monotonic time in seconds."""

    def __init__(self, window_s: float, depart_after_s: float, max_tags: int = MAX_TAGS_LIMIT) -> None:
        if not 0 < window_s <= 3600:
            raise ValueError("window_s must be in (0, 3600]")
        if depart_after_s <= 0:
            raise ValueError("depart_after_s must be > 0")
        if not 1 <= max_tags <= MAX_TAGS_LIMIT:
            raise ValueError(f"max_tags must be in [1, {MAX_TAGS_LIMIT}]")
        self.window_s = window_s
        self.depart_after_s = depart_after_s
        self.max_tags = max_tags
        self._window: dict[str, _TagReads] = {}
        self._reads = 0
        self._left_out: set[str] = set()
        self._left_out_more = 0
        self._present: dict[str, float] = {}
        """Tags present (read within depart_after_s): EPC -> last read time."""
        self._decoded: dict[str, EpcInfo | None] = {}
        self._started: float | None = None
        self.invalid = 0
        """Reads ignored because the EPC was not 2..62 bytes of hex."""

    def read(self, epc_hex: str, rssi: float | None, antenna: int | None, now: float) -> None:
        if self._started is None:
            self._started = now
        tag = self._window.get(epc_hex)
        if tag is None:
            epc = epc_hex.upper()
            if not 4 <= len(epc) <= 124 or len(epc) % 2 or not _HEX.issuperset(epc):
                self.invalid += 1
                return
            tag = self._window.get(epc)
            if tag is None:
                self._new_tag(epc, _rssi(rssi), _antenna(antenna))
                return
            epc_hex = epc
        self._reads += 1
        tag.reads += 1
        if rssi is not None and (tag.rssi is None or rssi > tag.rssi):
            checked = _rssi(rssi)
            if checked is not None:
                tag.rssi = checked
                tag.antenna = _antenna(antenna)

    def _new_tag(self, epc: str, rssi: float | None, antenna: int | None) -> None:
        self._reads += 1
        if len(self._window) >= self.max_tags:
            if len(self._left_out) < self.max_tags:
                self._left_out.add(epc)
            else:
                self._left_out_more += 1
            return
        self._window[epc] = _TagReads(rssi, antenna)

    def due(self, now: float) -> bool:
        """Whether the window is over (the first call or read starts it)."""
        if self._started is None:
            self._started = now
            return False
        return now - self._started >= self.window_s

    def close_window(self, now: float, *, departures: bool = True) -> RfidInventory | None:
        """The window's inventory, and start the next one; None when nothing was read and nothing departed.
        ``departures=False`` holds departures (the reader was not answering, or has not answered for a whole
        ``depart_after_s`` yet): a tag not read while nobody could read it has not left."""
        started = now if self._started is None else self._started
        self._started = now
        present = self._present
        appeared = [epc for epc in self._window if epc not in present]
        for epc in self._window:
            if epc in present or len(present) < self.max_tags:
                present[epc] = now
        cutoff = now - self.depart_after_s
        departed = [epc for epc, seen in present.items() if seen <= cutoff] if departures else []
        for epc in departed:
            del present[epc]
            self._decoded.pop(epc, None)
        truncated = len(self._left_out) + self._left_out_more
        if not self._window and not departed and not truncated:
            self._reads = 0
            return None
        tags = [self._tag(epc, reads) for epc, reads in sorted(self._window.items())]
        inventory = RfidInventory(
            window_s=min(3600.0, max(now - started, 0.001)),
            reads=self._reads,
            tags=tags,
            appeared=sorted(appeared)[: self.max_tags],
            departed=sorted(departed)[: self.max_tags],
            truncated=truncated,
        )
        self._window = {}
        self._reads = 0
        self._left_out = set()
        self._left_out_more = 0
        return inventory

    def _tag(self, epc: str, reads: _TagReads) -> RfidTag:
        if epc in self._decoded:
            info = self._decoded[epc]
        else:
            decoded = decode_epc(epc)
            info = decoded if isinstance(decoded, EpcInfo) and decoded.gtin is not None else None
            if epc in self._present:
                self._decoded[epc] = info
        return RfidTag(
            epc=epc,
            gtin=info.gtin if info else None,
            serial=info.serial if info else None,
            reads=reads.reads,
            rssi_max=reads.rssi,
            antenna=reads.antenna,
        )

    @property
    def present(self) -> int:
        """Tags currently considered present (read within ``depart_after_s``)."""
        return len(self._present)


def _rssi(value: float | None) -> float | None:
    if value is None or math.isnan(value) or not -128 <= value <= 128:
        return None
    return float(value)


def _antenna(value: int | None) -> int | None:
    return value if value is not None and 0 <= value <= 255 else None


def merge_inventories(
    earlier: RfidInventory, later: RfidInventory, max_tags: int = MAX_TAGS_LIMIT
) -> RfidInventory:
    """One inventory for two consecutive windows, as if they had been one: for a window that could not be
    sent (journal full, rate-limited, reader silent) so that its appeared/departed are not lost. A tag that
    departed and came back (or appeared and left) across the two cancels out: nobody was told the first half."""
    tags: dict[str, RfidTag] = {t.epc: t for t in earlier.tags}
    for tag in later.tags:
        old = tags.get(tag.epc)
        if old is None:
            tags[tag.epc] = tag
            continue
        stronger = (
            old
            if tag.rssi_max is None or (old.rssi_max is not None and old.rssi_max >= tag.rssi_max)
            else tag
        )
        tags[tag.epc] = tag.model_copy(
            update={
                "reads": old.reads + tag.reads,
                "rssi_max": stronger.rssi_max,
                "antenna": stronger.antenna,
            }
        )
    came_back = set(earlier.departed) & set(later.appeared)
    left_again = set(earlier.appeared) & set(later.departed)
    appeared = (set(earlier.appeared) | set(later.appeared)) - came_back - left_again
    departed = (set(earlier.departed) | set(later.departed)) - came_back - left_again
    kept = sorted(tags)[:max_tags]
    return RfidInventory(
        window_s=min(3600.0, earlier.window_s + later.window_s),
        reads=earlier.reads + later.reads,
        tags=[tags[epc] for epc in kept],
        appeared=sorted(appeared)[:max_tags],
        departed=sorted(departed)[:max_tags],
        truncated=earlier.truncated + later.truncated + len(tags) - len(kept),
    )
