"""Pure parts of the receiver: the batch decoder's defences, seq range arithmetic, report parsing, anchors."""

from __future__ import annotations

import gzip
import itertools
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_bridge.hq.model import (
    Anchor,
    EventRow,
    Explanation,
    LostWatermark,
    ReportError,
    corrected_ns,
    event_rows,
    nearest_anchor,
    parse_report,
    resend_command,
    resend_ranges_command,
    utc_ns,
)
from cloud_bridge.hq.ranges import GapClasses, chunk, classify, complement, merge, size
from cloud_bridge.wire import (
    MAX_BATCH_EVENTS,
    MAX_DECODED_BYTES,
    BatchError,
    Compressor,
    Encoding,
    decode_batch,
    encode_batch,
)
from tests.cloud_bridge.hq.test_receiver import batch_bytes, batch_of, envelope, schema1_bytes

S, G = "hk-001", "gw-a"
Mutation = Callable[[bytes, bytes], tuple[bytes, bytes]]


def _split(payload: bytes) -> tuple[bytes, bytes]:
    head, _, body = payload.partition(b"\n")
    return head, body


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "json"])
def test_every_encoding_round_trips(encoding: Encoding) -> None:
    payload = batch_bytes(S, G, [3, 4, 9], complete_through=2, encoding=encoding)
    decoded = decode_batch(payload)
    assert [e["seq"] for e in decoded.events] == [3, 4, 9]
    assert (decoded.encoding, decoded.cls, decoded.complete_through, decoded.resend) == (
        encoding,
        "state",
        2,
        False,
    )
    assert decoded.raw_bytes == len(b"[" + b",".join(orjson.dumps(e) for e in decoded.events) + b"]")


def test_schema_1_still_decodes() -> None:
    decoded = decode_batch(schema1_bytes(S, G, [1, 2]))
    assert (decoded.first_seq, decoded.last_seq, decoded.complete_through, decoded.cls) == (1, 2, None, None)


def test_several_zstd_frames_and_gzip_members_are_one_body() -> None:
    head, body = _split(batch_bytes(S, G, [1, 2], encoding="json"))
    cut = len(body) // 2
    zstd_head = head.replace(b'"encoding":"json"', b'"encoding":"zstd"')
    zctx = zstandard.ZstdCompressor()
    assert (
        len(decode_batch(zstd_head + b"\n" + zctx.compress(body[:cut]) + zctx.compress(body[cut:])).events)
        == 2
    )
    gzip_head = head.replace(b'"encoding":"json"', b'"encoding":"gzip"')
    assert (
        len(decode_batch(gzip_head + b"\n" + gzip.compress(body[:cut]) + gzip.compress(body[cut:])).events)
        == 2
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda h, b: (h, Compressor("zstd").compress(b" " * (MAX_DECODED_BYTES + 1))),
            "body inflates beyond",
        ),
        (lambda h, b: (h, zstandard.ZstdCompressor().compress(b) + b"tail"), "zstd body does not decompress"),
        (lambda h, b: (h.replace(b'"zstd"', b'"gzip"'), gzip.compress(b)[:-4]), "gzip body is truncated"),
        (
            lambda h, b: (h.replace(b'"zstd"', b'"gzip"'), b"\x1f\x8b garbage"),
            "gzip body does not decompress",
        ),
        (lambda h, b: (h.replace(b'"zstd"', b'"brotli"'), b), "unsupported encoding"),
        (
            lambda h, b: (
                h.replace(b'"count":2', b'"count":3')
                .replace(b'"last_seq":2', b'"last_seq":3')
                .replace(b'"ranges":[[1,2]]', b'"ranges":[[1,3]]'),
                b,
            ),
            "'count' does not match",
        ),
        (lambda h, b: (h, zstandard.ZstdCompressor().compress(b)[:-3]), "zstd body is truncated"),
        (lambda h, b: (h.replace(b'"zstd"', b'"json"'), b[:-1]), "json body is truncated"),
        (lambda h, b: (re.sub(rb'"raw_bytes":\d+', b'"raw_bytes":10', h), b), "beyond the 10 bytes of its"),
        (
            lambda h, b: (h.replace(b'"zstd"', b'"gzip"'), gzip.compress(b + b" ")),
            "beyond the .* 'raw_bytes'",
        ),
        (lambda h, b: (h, _zstd_window(24, b)), "Frame requires too much memory"),
        (lambda h, b: (h.replace(b'"ranges":[[1,2]]', b'"ranges":[[1,1],[1,2]]'), b), "list more seqs"),
        (lambda h, b: (h.replace(b'"ranges":[[1,2]]', b'"ranges":[[1,1],[1,1]]'), b), "do not cover exactly"),
        (lambda h, b: (h.replace(b'"ranges":[[1,2]]', b'"ranges":[[0,1]]'), b), "bad seq range"),
        (lambda h, b: (h.replace(b'"complete_through":0', b'"complete_through":-1'), b), "complete_through"),
        (
            lambda h, b: (h.replace(b'"complete_through":0', b'"complete_through":true'), b),
            "complete_through",
        ),
        (lambda h, b: (h.replace(b'"class":"state"', b'"class":"gold"'), b), "unknown class"),
        (lambda h, b: (h.replace(b'"schema":2', b'"schema":3'), b), "unsupported batch schema"),
        (
            lambda h, b: (
                re.sub(rb'"raw_bytes":\d+', b'"raw_bytes":2', h),
                zstandard.ZstdCompressor().compress(b"{}"),
            ),
            "non-empty JSON array",
        ),
    ],
)
def test_bad_batches_are_refused_with_a_reason(mutate: Mutation, reason: str) -> None:
    head, body = _split(batch_bytes(S, G, [1, 2], encoding="json"))
    head = head.replace(b'"encoding":"json"', b'"encoding":"zstd"')
    new_head, new_body = mutate(head, body)
    if new_body is body:
        new_body = zstandard.ZstdCompressor().compress(body)
    with pytest.raises(BatchError, match=reason):
        decode_batch(new_head + b"\n" + new_body)


def _zstd_window(window_log: int, body: bytes) -> bytes:
    """A streamed zstd frame (no content size, so the window is not shrunk to fit) with this window."""
    params = zstandard.ZstdCompressionParameters(window_log=window_log)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return stream.compress(body) + stream.flush()


def _bomb_head(**fields: object) -> bytes:
    head = orjson.loads(_split(batch_bytes(S, G, [1, 2]))[0])
    head.update(fields)
    return orjson.dumps({k: v for k, v in head.items() if v is not None})


BOMB_RAW = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def zstd_bomb() -> bytes:
    """~6 KB of zstd that inflates to 64 MiB of ``{},`` (orjson would build ~2 GB of dicts from it)."""
    raw = b"[" + b"{}," * (BOMB_RAW // 3 - 1) + b"{}]"
    return zstandard.ZstdCompressor(level=19).compress(raw)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"raw_bytes": BOMB_RAW}, f"'raw_bytes' must be an integer in 0..{MAX_DECODED_BYTES}"),
        ({"raw_bytes": 20}, "body inflates beyond the 20 bytes of its 'raw_bytes'"),
        ({"raw_bytes": None}, f"body inflates beyond {MAX_DECODED_BYTES} bytes"),
        ({"raw_bytes": "big"}, "'raw_bytes' must be an integer"),
        ({"count": 22_369_621}, f"'count' must be in 1..{MAX_BATCH_EVENTS}"),
        ({"count": 0}, f"'count' must be in 1..{MAX_BATCH_EVENTS}"),
    ],
)
def test_a_zstd_bomb_is_refused_before_it_is_parsed(
    zstd_bomb: bytes, fields: dict[str, object], reason: str
) -> None:
    assert len(zstd_bomb) < 10_000
    with pytest.raises(BatchError, match=re.escape(reason)):
        decode_batch(_bomb_head(**fields) + b"\n" + zstd_bomb)


def test_a_large_schema_1_batch_is_refused_unparsed() -> None:
    events = b"[" + b"{}," * (MAX_DECODED_BYTES // 3) + b"{}]"
    payload = b'{"format":"store-gateway.batch","schema":1,"encoding":"json","events":' + events + b"}"
    with pytest.raises(BatchError, match="schema 1 batch larger than"):
        decode_batch(payload)


def test_a_forged_billion_seq_range_is_refused_without_expanding_it() -> None:
    head, body = _split(batch_bytes(S, G, [1, 2]))
    forged = head.replace(b'"ranges":[[1,2]]', b'"ranges":[[1,1000000000]]').replace(
        b'"last_seq":2', b'"last_seq":1000000000'
    )
    with pytest.raises(BatchError, match="list more seqs than 'count'"):
        decode_batch(forged + b"\n" + body)


# --- ranges -------------------------------------------------------------------------------------------------


def test_range_arithmetic() -> None:
    assert merge([(5, 6), (1, 3), (4, 4), (9, 9)]) == [(1, 6), (9, 9)]
    assert complement([(2, 3), (6, 6)], 1, 8) == [(1, 1), (4, 5), (7, 8)]
    assert classify([(1, 3), (10, 11)], [(4, 5)], 11, 7) == GapClasses(
        explained=[(4, 5)], lost=[(6, 7)], pending=[(8, 9)]
    )
    assert chunk([(1, 250_000), (300_000, 300_000)], 100_000, 3) == [
        (1, 100_000),
        (100_001, 200_000),
        (200_001, 250_000),
    ]


small_ranges = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5)).map(lambda t: (t[0], t[0] + t[1])))


@settings(deadline=None)
@given(stored=st.sets(st.integers(1, 60)), explained=small_ranges, through=st.integers(0, 70))
def test_classify_partitions_the_missing_seqs(
    stored: set[int], explained: list[tuple[int, int]], through: int
) -> None:
    upper = max([*stored, through, 0])
    runs = merge((s, s) for s in stored)
    classes = classify(runs, explained, upper, through)
    missing = set(range(1, upper + 1)) - stored
    covered = {s for a, b in explained for s in range(a, b + 1)}

    def seqs(ranges: list[tuple[int, int]]) -> set[int]:
        return {s for a, b in ranges for s in range(a, b + 1)}

    assert seqs(classes.explained) == missing & covered
    assert seqs(classes.lost) == {s for s in missing - covered if s <= through}
    assert seqs(classes.pending) == {s for s in missing - covered if s > through}
    assert size(classes.gaps) == len(missing)


T0 = datetime(2030, 1, 1, tzinfo=UTC)
GRACE = timedelta(seconds=60)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_lost_watermark_waits_a_grace_period() -> None:
    mark = LostWatermark().after_batch(7, _at(0), GRACE)
    assert [mark.at(_at(t), GRACE) for t in (0, 59, 60)] == [0, 0, 7]
    # Batches every 10 s, complete_through rising with each: the mark taken at 0 s ages at 60 s, the one
    # taken at 60 s (value 13) at 120 s, while the latest value always looks new.
    for t in range(10, 130, 10):
        mark = mark.after_batch(7 + t // 10, _at(t), GRACE)
    assert (mark.complete_through, mark.mark_through, mark.mark_at) == (19, 19, _at(120))
    assert [mark.at(_at(t), GRACE) for t in (120, 179, 180)] == [13, 13, 19]
    assert mark.at(_at(0), timedelta(0)) == 19  # no grace: complete_through itself


@settings(deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 150), st.integers(0, 5)), min_size=1, max_size=40),
    after=st.integers(0, 200),
)
def test_lost_watermark_is_never_early_never_goes_back_and_catches_up(
    steps: list[tuple[int, int]], after: int
) -> None:
    """Batches at growing times (gaps up to 2.5 grace periods), complete_through growing. At any later time:
    never a value HQ has known for less than the grace period; never lower than before; and every value known
    for two grace periods plus the largest gap between batches."""
    mark, t, through = LostWatermark(), 0, 0
    known: list[tuple[int, int]] = []  # (time, complete_through)
    previous = 0
    for gap, rise in steps:
        t, through = t + gap, through + rise
        mark = mark.after_batch(through, _at(t), GRACE)
        known.append((t, through))
        assert mark.lost_through >= previous
        previous = mark.lost_through
    largest_gap = max([0] + [b[0] - a[0] for a, b in itertools.pairwise(known)])
    for now in (t, t + after):
        lost = mark.at(_at(now), GRACE)
        assert lost >= mark.lost_through
        assert lost <= max([0] + [v for at, v in known if at <= now - 60])
        assert lost >= max([0] + [v for at, v in known if at <= now - 120 - largest_gap])


# --- reports and the clock ----------------------------------------------------------------------------------


def _row(body: bytes) -> EventRow:
    return event_rows(S, G, batch_of(S, G, [body]))[0]


def test_parse_reports() -> None:
    evicted = {"class": "telemetry", "reason": "ttl", "count": 3, "bytes": 9, "ranges": [[7, 8], [2, 2]]}
    assert parse_report(_row(envelope(S, G, 9, kind="outbox.evicted", data=evicted))) == Explanation(
        "outbox.evicted:ttl", [(2, 2), (7, 8)]
    )
    alert = {"rule": "journal.corrupt", "details": {"possibly_lost": [5, 1_000_004]}}
    assert parse_report(_row(envelope(S, G, 9, kind="alert.raised", data=alert))) == Explanation(
        "journal.corrupt", [(5, 1_000_004)]
    )
    low = {"rule": "stock.low", "details": {"possibly_lost": [1, 2]}}
    assert parse_report(_row(envelope(S, G, 9, kind="alert.raised", data=low))) is None
    sync = {"boot_id": "b", "mono_ns": 5, "utc": "2030-01-01T08:00:00+08:00", "step_s": None}
    assert parse_report(_row(envelope(S, G, 9, kind="clock.synced", data=sync))) == Anchor(
        "b", 5, utc_ns(datetime(2030, 1, 1, tzinfo=UTC))
    )
    bad: list[tuple[str, dict[str, Any]]] = [
        ("outbox.evicted", {"ranges": [[3, 2]]}),
        ("outbox.evicted", {"ranges": "1-5"}),
        ("alert.raised", {"rule": "journal.corrupt", "details": {"possibly_lost": [0, 2**63]}}),
        ("clock.synced", {"boot_id": "b", "mono_ns": 10**19, "utc": "2030-01-01T00:00:00Z"}),
        ("clock.synced", {"boot_id": "b", "mono_ns": 1, "utc": "2030-01-01T00:00:00"}),
        ("clock.synced", {"boot_id": "", "mono_ns": 1, "utc": "2030-01-01T00:00:00Z"}),
    ]
    for kind, data in bad:
        with pytest.raises(ReportError):
            parse_report(_row(envelope(S, G, 9, kind=kind, data=data)))


def test_nearest_anchor_and_correction() -> None:
    anchors = [(100, 1_000), (200, 5_000)]
    assert nearest_anchor(anchors, 0) == (100, 1_000)
    assert nearest_anchor(anchors, 150) == (100, 1_000)  # a tie goes to the earlier anchor
    assert nearest_anchor(anchors, 151) == (200, 5_000)
    assert nearest_anchor(anchors, 10**6) == (200, 5_000)
    assert corrected_ns((100, 1_000), 40) == 940
    assert utc_ns(datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC)) == 1_000_005_000


def test_resend_command_format() -> None:
    assert orjson.loads(resend_command("r-1", 6, 7)) == {
        "request_id": "r-1",
        "command": "resend",
        "args": {"from_seq": 6, "to_seq": 7},
    }


def test_resend_ranges_command_format() -> None:
    """Several ranges go in ``args.ranges``; one range in the original form, which every gateway takes."""
    assert orjson.loads(resend_ranges_command("r-2", [(2, 2), (4, 9)])) == {
        "request_id": "r-2",
        "command": "resend",
        "args": {"ranges": [[2, 2], [4, 9]]},
    }
    assert orjson.loads(resend_ranges_command("r-3", [(6, 7)]))["args"] == {"from_seq": 6, "to_seq": 7}


def test_encode_batch_output_is_what_the_receiver_reads() -> None:
    """encode_batch's format is the gateway's: ranges list exactly the seqs, one class per batch."""
    payload = encode_batch(
        S, G, [3, 5, 6], [envelope(S, G, s) for s in (3, 5, 6)], cls="telemetry", complete_through=2
    )
    head = orjson.loads(_split(payload)[0])
    assert head["ranges"] == [[3, 3], [5, 6]]
    assert (head["count"], head["first_seq"], head["last_seq"], head["encoding"]) == (3, 3, 6, "json")
