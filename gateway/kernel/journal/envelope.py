"""Envelopes: the bytes of a committed event, built once at commit around the draft's payload bytes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from gateway.kernel.clock import BOOT_ID
from gateway.kernel.events import SCHEMA_VERSION, uuid7
from gateway.kernel.journal.items import Draft, Row


def envelopes(
    drafts: list[Draft],
    seq: int,
    now: float,
    rows: list[Row],
    *,
    ids_json: bytes,
    synced: bool,
    kind_class: Callable[[str], int],
) -> int:
    """Give each draft the next seq and build its envelope bytes (the data bytes are spliced in as they are)."""
    recorded_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    common = b'"recorded_at":"%s","boot_id":"%s","clock_synced":%s,"schema":%d,' % (
        recorded_at.encode(),
        BOOT_ID.encode(),
        b"true" if synced else b"false",
        SCHEMA_VERSION,
    )
    mono = time.monotonic_ns()
    entropy = os.urandom(8 * len(drafts))
    for n, draft in enumerate(drafts):
        seq += 1
        event_id = uuid7(int.from_bytes(entropy[8 * n : 8 * n + 8]))
        head = orjson.dumps(
            {
                "id": event_id,
                "seq": seq,
                "kind": draft.kind,
                "device_id": draft.device_id,
                "occurred_at": draft.occurred_at,
                "mono_ns": mono,
            }
        )
        body = b"".join((head[:-1], b",", ids_json, b",", common, b'"data":', draft.data_json, b"}"))
        rows.append(
            (
                seq,
                event_id,
                draft.kind,
                draft.device_id,
                recorded_at,
                draft.dedup_key,
                body,
                kind_class(draft.kind),
            )
        )
    return seq
