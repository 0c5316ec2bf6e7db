"""The batch format on the wire to HQ: one MQTT message carries a run of events with consecutive seqs.

A batch is a JSON object, self-describing::

    {"format": "store-gateway.batch", "schema": 1, "encoding": "json",
     "store_id": "...", "gateway_id": "...", "first_seq": 41, "last_seq": 45, "count": 5,
     "events": [<envelope>, ...]}

Events are the envelopes exactly as committed (see docs/EVENTS.md). ``first_seq``..``last_seq`` covers every
event in the batch; a batch never skips a seq inside its range. Encoding the batch does not re-serialise
events: the stored envelope bytes are joined as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

BATCH_FORMAT: Final = "store-gateway.batch"
BATCH_SCHEMA: Final = 1


class BatchError(ValueError):
    """A batch that does not follow the format; the reason says what is wrong."""


@dataclass(frozen=True, slots=True)
class Batch:
    store_id: str
    gateway_id: str
    first_seq: int
    last_seq: int
    events: list[dict[str, Any]]


def encode_batch(store_id: str, gateway_id: str, seqs: Sequence[int], bodies: Sequence[bytes]) -> bytes:
    """Join committed envelope bytes into one batch message."""
    if not bodies or len(seqs) != len(bodies):
        raise ValueError("a batch needs one seq per event body, and at least one event")
    header = orjson.dumps(
        {
            "format": BATCH_FORMAT,
            "schema": BATCH_SCHEMA,
            "encoding": "json",
            "store_id": store_id,
            "gateway_id": gateway_id,
            "first_seq": seqs[0],
            "last_seq": seqs[-1],
            "count": len(bodies),
        }
    )
    return b"".join((header[:-1], b',"events":[', b",".join(bodies), b"]}"))


def decode_batch(payload: bytes) -> Batch:
    """Parse and check a batch; raises :class:`BatchError` with a reason."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        raise BatchError(f"not JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != BATCH_FORMAT:
        raise BatchError("not a store-gateway batch (missing or wrong 'format')")
    if doc.get("schema") != BATCH_SCHEMA or doc.get("encoding") != "json":
        raise BatchError(f"unsupported batch schema/encoding: {doc.get('schema')!r}/{doc.get('encoding')!r}")
    events = doc.get("events")
    first, last = doc.get("first_seq"), doc.get("last_seq")
    if not isinstance(events, list) or not isinstance(first, int) or not isinstance(last, int):
        raise BatchError("batch needs 'events' (list), 'first_seq' and 'last_seq' (integers)")
    if doc.get("count") != len(events) or not events:
        raise BatchError("'count' does not match the number of events")
    for event in events:
        if (
            not isinstance(event, dict)
            or type(event.get("seq")) is not int  # not bool
            or not isinstance(event.get("id"), str)
        ):
            raise BatchError("every event needs an integer 'seq' and a string 'id'")
        if not first <= event["seq"] <= last:
            raise BatchError(f"event seq {event['seq']} outside the batch range {first}..{last}")
    return Batch(str(doc.get("store_id")), str(doc.get("gateway_id")), first, last, events)
