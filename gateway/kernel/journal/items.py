"""What the journal takes and gives: :class:`Draft` events and :class:`Rejected` messages in, :class:`Committed`
summaries out (to listeners, after COMMIT)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.kernel.outbox import ClassState

QUARANTINE_KEEP_BYTES: Final = 4096
"""How much of a rejected payload is kept for debugging."""
QUARANTINE_TOPIC_CHARS: Final = 256
"""How much of a rejected message's topic is kept (MQTT allows 64 KiB)."""

Row = tuple[int, str, str, str | None, str, str | None, bytes, int]
Extra = Callable[[sqlite3.Connection, dict[int, ClassState], dict[int, int]], list["Draft"]]
"""Work run inside a commit transaction: may change the class counters (second argument, in place) and record
delivered watermarks that moved past evicted events (third argument); returns drafts to commit with it."""


@dataclass(slots=True)
class Draft:
    """An event ready to commit; ``data_json`` is the validated payload, serialised once."""

    kind: str
    device_id: str | None
    data_json: bytes
    model: Any = None
    occurred_at: str | None = None
    dedup_key: str | None = None
    ack: Callable[[], None] | None = None
    driver: str = "gateway"
    origin: object = None
    """The connection it came in on; its items are dropped if that connection dies before they commit."""
    done: Callable[[int | None], None] | None = None
    """Called after COMMIT, on the journal's writer thread, with the event's seq, or None when it was a redelivery
    (dedup key seen before). Keep it tiny; ``ack`` runs on the event loop afterwards."""


@dataclass(slots=True)
class Rejected:
    """A message that could not become an event: quarantined with its reason, then acknowledged."""

    driver: str
    reason: str
    detail: str
    size: int
    payload: bytes
    topic: str | None = None
    device_id: str | None = None
    ack: Callable[[], None] | None = None
    origin: object = None


@dataclass(slots=True)
class Committed:
    """What one group commit wrote; listeners (uplink, live display) get it after COMMIT."""

    first_seq: int
    last_seq: int
    kinds: dict[str, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    duplicates_by_driver: dict[str, int] = field(default_factory=dict)
    classes: set[int] = field(default_factory=set)
    """Outbox classes that got new events."""
    evicted_through: dict[int, int] = field(default_factory=dict)
    """Per class: undelivered events up to this seq were evicted (the delivered watermark moves past them)."""
    devices: dict[tuple[str, str], int] = field(default_factory=dict)
    """(device id, kind) -> events committed (events with a device)."""

    @property
    def duplicates(self) -> int:
        """Redeliveries dropped by this commit."""
        return sum(self.duplicates_by_driver.values())


def as_rejected(draft: Draft | Rejected, error: Exception, reason: str = "processing_error") -> Rejected:
    """An item that cannot be committed as an event, kept in quarantine with the error."""
    if isinstance(draft, Rejected):
        return Rejected(
            draft.driver,
            reason,
            f"{draft.reason}: {error!r}"[:1000],
            draft.size,
            draft.payload,
            draft.topic,
            draft.device_id,
            draft.ack,
            draft.origin,
        )
    return Rejected(
        draft.driver,
        reason,
        f"{draft.kind}: {error!r}"[:1000],
        len(draft.data_json),
        draft.data_json[:QUARANTINE_KEEP_BYTES],
        None,
        draft.device_id,
        draft.ack,
        draft.origin,
    )


def merge(total: Committed | None, part: Committed | None) -> Committed | None:
    if total is None or part is None:
        return part or total
    for kind, count in part.kinds.items():
        total.kinds[kind] = total.kinds.get(kind, 0) + count
    for driver, count in part.duplicates_by_driver.items():
        total.duplicates_by_driver[driver] = total.duplicates_by_driver.get(driver, 0) + count
    for key, count in part.devices.items():
        total.devices[key] = total.devices.get(key, 0) + count
    total.first_seq = min(total.first_seq, part.first_seq) if total.bodies else part.first_seq
    total.last_seq = max(total.last_seq, part.last_seq)
    total.bodies += part.bodies
    total.rejected += part.rejected
    total.classes |= part.classes
    return total
