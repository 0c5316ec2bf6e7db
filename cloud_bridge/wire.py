"""The batch format on the wire to HQ (documented in docs/OUTBOX.md, "Batches on the wire").

One MQTT message carries a batch: events of ONE outbox class, ascending ``seq`` (not necessarily consecutive:
other classes interleave). The message is a one-line JSON header, a newline, then the body::

    {"format":"store-gateway.batch","schema":2,"encoding":"zstd","class":"transaction",
     "store_id":"hk-001","gateway_id":"gw-1","count":3,"first_seq":41,"last_seq":45,
     "ranges":[[41,42],[45,45]],"complete_through":40,"resend":false,"raw_bytes":1234}
    <body>

The body is a JSON array of envelopes, exactly as committed (docs/EVENTS.md), compressed as ``encoding`` says:
``json`` (none), ``gzip`` (RFC 1952) or ``zstd`` (RFC 8878). ``ranges`` lists every seq in the batch as
inclusive runs. ``complete_through`` is the gateway's promise at send time: every event with a seq at or below
it was acknowledged by HQ's broker before, or is in an ``outbox.evicted`` report; HQ can call a missing seq at
or below it lost, and one above it not yet delivered. ``resend`` batches answer a ``resend`` command and carry
``"class": null``. Schema 1 batches (one JSON object, consecutive seqs) are still accepted by the decoder.

Encoding never re-serialises events: the stored envelope bytes are joined as they are.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
import zstandard

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.outbox import CLASSES, seq_ranges

BATCH_FORMAT: Final = "store-gateway.batch"
BATCH_SCHEMA: Final = 2
ENCODINGS: Final = ("json", "gzip", "zstd")

MAX_SEQ: Final = 2**63 - 1
"""Seqs and watermarks are signed 64-bit integers in every database HQ might use."""
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_DECODED_BYTES: Final = 16 * 1024 * 1024
"""A batch that inflates beyond this is refused (a decompression bomb, or not ours). Gateways send at most
8 MiB (``hq.batch_max_bytes``); parsed JSON takes up to ~25 times its size in memory, so this bounds what one
message can make the receiver hold."""
MAX_BATCH_EVENTS: Final = 10_000
"""Events per batch (the gateway's ``hq.batch_max_events`` allows no more); checked before inflating."""
MAX_ZSTD_WINDOW: Final = 8 * 1024 * 1024
"""zstd level 19 on an 8 MiB body needs this window; a frame asking for more is refused, not allocated."""

Encoding = Literal["json", "gzip", "zstd"]


class BatchError(StoreGatewayError, ValueError):
    """A batch that does not follow the format; the reason says what is wrong."""


@dataclass(frozen=True, slots=True)
class Batch:
    store_id: str
    gateway_id: str
    first_seq: int
    last_seq: int
    events: list[dict[str, Any]]
    cls: str | None = None
    """Outbox class name; None for resend batches and schema 1."""
    complete_through: int | None = None
    resend: bool = False
    encoding: str = "json"
    raw_bytes: int = 0
    """Size of the uncompressed body."""
    bodies: list[bytes] | None = None
    """Each event's envelope bytes exactly as received, when the body is written as gateways write it
    (:func:`split_events`); None otherwise."""


class Compressor:
    """Reusable compressor for one encoding (a zstd context is worth keeping)."""

    def __init__(self, encoding: Encoding = "zstd", level: int | None = None) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}")
        self.encoding: Encoding = encoding
        self._level = level
        self._zstd = zstandard.ZstdCompressor(level=level if level is not None else 3)

    def compress(self, body: bytes) -> bytes:
        if self.encoding == "zstd":
            return self._zstd.compress(body)
        if self.encoding == "gzip":
            return gzip.compress(body, compresslevel=self._level if self._level is not None else 6, mtime=0)
        return body


def encode_batch(
    store_id: str,
    gateway_id: str,
    seqs: Sequence[int],
    bodies: Sequence[bytes],
    *,
    cls: str | None,
    complete_through: int,
    compressor: Compressor | None = None,
    resend: bool = False,
) -> bytes:
    """Join committed envelope bytes into one batch message."""
    if not bodies or len(seqs) != len(bodies):
        raise ValueError("a batch needs one seq per event body, and at least one event")
    raw = b"".join((b"[", b",".join(bodies), b"]"))
    encoding: Encoding = "json" if compressor is None else compressor.encoding
    body = raw if compressor is None else compressor.compress(raw)
    header = orjson.dumps(
        {
            "format": BATCH_FORMAT,
            "schema": BATCH_SCHEMA,
            "encoding": encoding,
            "class": cls,
            "store_id": store_id,
            "gateway_id": gateway_id,
            "count": len(bodies),
            "first_seq": seqs[0],
            "last_seq": seqs[-1],
            "ranges": seq_ranges(seqs),
            "complete_through": complete_through,
            "resend": resend,
            "raw_bytes": len(raw),
        }
    )
    return b"".join((header, b"\n", body))


_DECOMPRESSORS = threading.local()
"""One zstd decompression context per thread, reused for every message: building one costs more than
inflating a small live batch. A context is not safe to share between threads."""


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_DECOMPRESSORS, "zstd", None)
    if decompressor is None:
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        _DECOMPRESSORS.zstd = decompressor
    return decompressor


def _inflate(encoding: str, body: bytes, limit: int) -> bytes:
    """The body as JSON bytes; never more than ``limit + 1`` bytes are produced, whatever the body says."""
    if encoding == "json":
        return body
    if encoding == "zstd":
        try:
            # Across frames: a streaming compressor may emit several; anything after them is an error. A
            # truncated frame ends the output early without an error: the caller's raw_bytes check sees it.
            reader = _zstd_decompressor().stream_reader(body, read_across_frames=True)
            with reader:
                return reader.read(limit + 1)
        except zstandard.ZstdError as err:
            raise BatchError(f"zstd body does not decompress: {err}") from err
    if encoding == "gzip":
        return _gunzip(body, limit)
    raise BatchError(f"unsupported encoding {encoding!r} (expected one of {', '.join(ENCODINGS)})")


def _gunzip(body: bytes, limit: int) -> bytes:
    """RFC 1952, one or more members, bounded; a truncated member is an error, not a shorter body."""
    parts: list[bytes] = []
    size, rest = 0, body
    try:
        while rest and size <= limit:
            inflater = zlib.decompressobj(wbits=31)
            part = inflater.decompress(rest, limit + 1 - size)
            parts.append(part)
            size += len(part)
            if size > limit:
                break
            if not inflater.eof:
                raise BatchError("gzip body is truncated")
            rest = inflater.unused_data
    except zlib.error as err:
        raise BatchError(f"gzip body does not decompress: {err}") from err
    return b"".join(parts)


def _body(head: dict[str, Any], body: bytes) -> bytes:
    """The inflated body, its size checked against the header before and after inflating.

    ``raw_bytes`` is checked first (and ``count`` by the caller), so a small message cannot make us inflate,
    and then parse, more than its header admits; the inflated size must then be exactly ``raw_bytes`` when
    the header gives it (it always does from our gateways)."""
    encoding = head.get("encoding")
    if not isinstance(encoding, str):
        raise BatchError("batch header needs an 'encoding'")
    raw_bytes = head.get("raw_bytes")
    if raw_bytes is not None and (type(raw_bytes) is not int or not 0 <= raw_bytes <= MAX_DECODED_BYTES):
        raise BatchError(f"'raw_bytes' must be an integer in 0..{MAX_DECODED_BYTES} (the body limit)")
    raw = _inflate(encoding, body, MAX_DECODED_BYTES if raw_bytes is None else raw_bytes)
    if len(raw) > MAX_DECODED_BYTES:
        raise BatchError(f"body inflates beyond {MAX_DECODED_BYTES} bytes")
    if raw_bytes is not None and len(raw) > raw_bytes:
        raise BatchError(f"body inflates beyond the {raw_bytes} bytes of its 'raw_bytes'")
    if raw_bytes is not None and len(raw) < raw_bytes:
        raise BatchError(f"{encoding} body is truncated: {len(raw)} bytes where 'raw_bytes' says {raw_bytes}")
    return raw


def _check_events(events: object, count: object, allowed: set[int] | None, first: int, last: int) -> None:
    if not isinstance(events, list) or not events:
        raise BatchError("batch needs a non-empty 'events' list")
    if len(events) > MAX_BATCH_EVENTS:
        raise BatchError(f"more than {MAX_BATCH_EVENTS} events in a batch")
    if count != len(events):
        raise BatchError("'count' does not match the number of events")
    for event in events:
        if (
            not isinstance(event, dict)
            or type(event.get("seq")) is not int  # not bool
            or not isinstance(event.get("id"), str)
        ):
            raise BatchError("every event needs an integer 'seq' and a string 'id'")
        seq = event["seq"]
        if allowed is not None and seq not in allowed:
            raise BatchError(f"event seq {seq} not in the batch's ranges")
        if not first <= seq <= last:
            raise BatchError(f"event seq {seq} outside the batch range {first}..{last}")


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if type(value) is not int:
        raise BatchError(f"batch header needs an integer {key!r}")
    return value


_BOUNDARY: Final = b'},{"'


def split_events(raw: bytes, count: int) -> tuple[list[Any], list[bytes]] | None:
    """The events of a JSON array of ``count`` objects and each one's bytes as received, when it is written as
    gateways write it (envelopes joined by commas, no whitespace between them); None otherwise (then parse the
    whole array).

    The array is cut at every ``},{"``. A cut inside an event (after a nested object, or within a string)
    would leave the piece before it unfinished, and an unfinished piece is not JSON: so when every piece
    parses, every cut was between two events, and each piece is one event's bytes."""
    if raw[:2] != b"[{" or raw[-2:] != b"}]" or raw.count(_BOUNDARY) != count - 1:
        return None
    parts = raw[1:-1].split(_BOUNDARY)
    last = len(parts) - 1
    if last:
        parts = [b"".join((b'{"' if i else b"", p, b"}" if i < last else b"")) for i, p in enumerate(parts)]
    try:
        return [orjson.loads(p) for p in parts], parts
    except orjson.JSONDecodeError:
        return None


def declared_size(payload: bytes) -> int:
    """How many bytes decoding this message may inflate to, read from its header line alone (no inflating):
    its ``raw_bytes`` when valid, else the body limit for a compressed body without one; a message without a
    readable header is its own length (schema 1, or refused by :func:`decode_batch`)."""
    newline = payload.find(b"\n", 0, MAX_HEADER_BYTES)
    if newline < 0:
        return len(payload)
    try:
        head = orjson.loads(payload[:newline])
    except orjson.JSONDecodeError:
        return len(payload)
    if not isinstance(head, dict):
        return len(payload)
    raw_bytes = head.get("raw_bytes")
    if type(raw_bytes) is int and 0 <= raw_bytes <= MAX_DECODED_BYTES:
        return max(raw_bytes, len(payload))
    return len(payload) if head.get("encoding") == "json" else MAX_DECODED_BYTES


def decode_batch(payload: bytes) -> Batch:
    """Parse and check a batch (schema 2, or schema 1); raises :class:`BatchError` with a reason."""
    newline = payload.find(b"\n", 0, MAX_HEADER_BYTES)
    if newline < 0:
        return _decode_v1(payload)
    try:
        head = orjson.loads(payload[:newline])
    except orjson.JSONDecodeError as err:
        return _decode_v1(payload) if payload[:1] == b"{" else _raise(f"header is not JSON: {err}")
    if not isinstance(head, dict) or head.get("format") != BATCH_FORMAT:
        raise BatchError("not a store-gateway batch (missing or wrong 'format')")
    if head.get("schema") != BATCH_SCHEMA:
        raise BatchError(f"unsupported batch schema {head.get('schema')!r}")
    first, last, count = _int(head, "first_seq"), _int(head, "last_seq"), _int(head, "count")
    if not 1 <= count <= MAX_BATCH_EVENTS:
        raise BatchError(f"'count' must be in 1..{MAX_BATCH_EVENTS}, not {count}")
    allowed = _allowed_seqs(head.get("ranges"), first, last, count)
    raw = _body(head, payload[newline + 1 :])
    split = split_events(raw, count)
    bodies: list[bytes] | None = None
    if split is not None:
        events, bodies = split
    else:
        try:
            events = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise BatchError(f"body is not JSON: {err}") from err
    if not isinstance(events, list) or not events:
        raise BatchError("body must be a non-empty JSON array of events")
    if count != len(events):
        raise BatchError("'count' does not match the number of events")
    _check_events(events, count, allowed, first, last)
    if len({e["seq"] for e in events}) != count:
        raise BatchError("a seq appears twice in the batch")
    cls = head.get("class")
    if cls is not None and cls not in CLASSES:
        raise BatchError(f"unknown class {cls!r}")
    through = head.get("complete_through")
    if through is not None and (type(through) is not int or not 0 <= through <= MAX_SEQ):
        raise BatchError(f"'complete_through' must be an integer in 0..{MAX_SEQ}")
    return Batch(
        str(head.get("store_id")),
        str(head.get("gateway_id")),
        first,
        last,
        events,
        cls,
        through,
        head.get("resend") is True,
        str(head["encoding"]),
        len(raw),
        bodies,
    )


def _allowed_seqs(ranges: object, first: int, last: int, count: int) -> set[int]:
    """The seqs ``ranges`` lists, checked to be exactly ``count`` seqs within first..last.

    Lengths are added up before any set is built, so a header cannot make us enumerate more than ``count``
    seqs (a forged range of a billion seqs is refused, not expanded)."""
    if not isinstance(ranges, list) or not ranges:
        raise BatchError("batch header needs 'ranges'")
    total = 0
    for pair in ranges:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or type(pair[0]) is not int
            or type(pair[1]) is not int
            or not first <= pair[0] <= pair[1] <= last
        ):
            raise BatchError(f"bad seq range {pair!r}")
        total += pair[1] - pair[0] + 1
        if total > count:
            raise BatchError("'ranges' list more seqs than 'count'")
    allowed: set[int] = set()
    for a, b in ranges:
        allowed.update(range(a, b + 1))
    if len(allowed) != count:
        raise BatchError("'ranges' do not cover exactly 'count' seqs")
    return allowed


def _raise(reason: str) -> Batch:
    raise BatchError(reason)


def _decode_v1(payload: bytes) -> Batch:
    """Schema 1: one JSON object with consecutive seqs (gateways before the outbox)."""
    if len(payload) > MAX_DECODED_BYTES:
        raise BatchError(f"schema 1 batch larger than {MAX_DECODED_BYTES} bytes")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        raise BatchError(f"not JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != BATCH_FORMAT:
        raise BatchError("not a store-gateway batch (missing or wrong 'format')")
    if doc.get("schema") != 1 or doc.get("encoding") != "json":
        raise BatchError(f"unsupported batch schema/encoding: {doc.get('schema')!r}/{doc.get('encoding')!r}")
    first, last = _int(doc, "first_seq"), _int(doc, "last_seq")
    events = doc.get("events")
    _check_events(events, doc.get("count"), None, first, last)
    assert isinstance(events, list)
    return Batch(
        str(doc.get("store_id")), str(doc.get("gateway_id")), first, last, events, raw_bytes=len(payload)
    )
