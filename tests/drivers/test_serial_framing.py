"""Serial framers, CRCs and the Chafon codec: vectors from the specs and reference code, and hypothesis
properties (random bytes never raise; frames embedded in garbage and split anywhere are found)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DecodeError
from drivers.profiles import get_profile
from drivers.serial import chafon
from drivers.serial.config import SerialProfile
from drivers.serial.crc import crc16_mcrf4xx, crc16_modbus
from drivers.serial.framing import (
    ETX,
    STX,
    FixedFramer,
    Frame,
    FrameError,
    LengthCrcFramer,
    LineFramer,
    Output,
    StxEtxFramer,
)
from drivers.serial.lines import ScaleFormat, ScaleReading, parse_barcode, parse_scale

CHECK = b"123456789"


def test_crc_check_values_from_the_reveng_catalogue() -> None:
    # reveng CRC catalogue (reveng.sourceforge.io/crc-catalogue/16.htm): CRC-16/MODBUS check=0x4b37,
    # CRC-16/MCRF4XX check=0x6f91.
    assert crc16_modbus(CHECK) == 0x4B37
    assert crc16_mcrf4xx(CHECK) == 0x6F91


def test_crc_vectors_from_reference_code() -> None:
    # github.com/miek/ru5102 src/lib.rs test_crc: MCRF4XX("abcdef") == 64265.
    assert crc16_mcrf4xx(b"abcdef") == 64265
    # shared/vectors/README.md (Modbus spec): read 1 holding register at 0 of unit 1 = 01 03 00 00 00 01 84 0A.
    assert crc16_modbus(bytes.fromhex("010300000001")).to_bytes(2, "little") == bytes.fromhex("840A")


def _slow_mcrf4xx(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


@given(st.binary(max_size=300))
def test_fast_mcrf4xx_equals_the_bitwise_definition(data: bytes) -> None:
    assert crc16_mcrf4xx(data) == _slow_mcrf4xx(data)


def test_chafon_command_and_response_vectors() -> None:
    # github.com/miek/ru5102 src/lib.rs test_command: inventory to address 10 = [4, 10, 0x01, 171, 182].
    assert chafon.encode_command(10, chafon.CMD_INVENTORY) == bytes([4, 10, 0x01, 171, 182])
    # Same file, test_response: [5, 0, 1, 251, 242, 61] is a "no tags" (0xFB) answer to inventory.
    frames = chafon.framer().feed(bytes([5, 0, 1, 251, 242, 61]))
    assert len(frames) == 1
    frame = frames[0]
    assert isinstance(frame, Frame)
    response = chafon.decode_response(frame.payload)
    assert response == chafon.Response(0, 1, 0xFB, b"")
    inventory = chafon.decode_inventory(response)
    assert inventory == chafon.Inventory(0xFB, [])


def test_chafon_inventory_in_several_frames_round_trips() -> None:
    epcs = [bytes([n]) * 12 for n in range(1, 41)]
    wire = chafon.encode_inventory_responses(0, epcs)
    assert len(wire) > 1
    framer = chafon.framer()
    got: list[bytes] = []
    statuses = []
    for item in framer.feed(b"".join(wire)):
        assert isinstance(item, Frame)
        response = chafon.decode_response(item.payload)
        assert isinstance(response, chafon.Response)
        inventory = chafon.decode_inventory(response)
        assert isinstance(inventory, chafon.Inventory)
        got += inventory.epcs
        statuses.append(inventory.status)
    assert got == epcs
    assert statuses[:-1] == [chafon.STATUS_MORE] * (len(wire) - 1)
    assert statuses[-1] == chafon.STATUS_DONE


def test_chafon_bad_status_and_truncated_inventory_are_decode_errors() -> None:
    # Status 0xFE "illegal command" (UHFReader18 SDK / miek/ru5102 ResponseStatus).
    error = chafon.decode_inventory(chafon.Response(0, 1, 0xFE, b""))
    assert isinstance(error, DecodeError)
    assert error.reason == "reader_status"
    truncated = chafon.decode_inventory(chafon.Response(0, 1, 0x01, bytes([2, 12]) + b"\x30" * 12))
    assert isinstance(truncated, DecodeError)
    assert truncated.reason == "truncated"


def test_bad_crc_is_reported_and_the_next_frame_still_found() -> None:
    good = chafon.encode_response(0, 1, 0xFB)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    out = chafon.framer().feed(bytes(bad) + good)
    frames = [i for i in out if isinstance(i, Frame)]
    errors = [i for i in out if isinstance(i, FrameError)]
    assert [f.raw for f in frames] == [good]
    assert sum(e.size for e in errors) == len(bad)


def test_line_framer_cr_lf_crlf_and_overlong() -> None:
    framer = LineFramer(max_line=8)
    out = framer.feed(b"one\rtwo\nthree\r\nfour")
    assert [i.payload for i in out if isinstance(i, Frame)] == [b"one", b"two", b"three"]
    out = framer.feed(b"\r" + b"x" * 20 + b"\nok\n")
    assert [i.payload for i in out if isinstance(i, Frame)] == [b"four", b"ok"]
    assert [i.reason for i in out if isinstance(i, FrameError)] == ["line_too_long"]


def test_stx_etx_with_bcc() -> None:
    payload = b"ST,+1.000kg"
    bcc = 0
    for byte in payload + bytes([ETX]):
        bcc ^= byte
    frame = bytes([STX]) + payload + bytes([ETX, bcc])
    out = StxEtxFramer(bcc=True).feed(b"junk" + frame + bytes([STX]) + b"x" + bytes([ETX, 0x00]) + frame)
    assert [i.payload for i in out if isinstance(i, Frame)] == [payload, payload]
    assert any(isinstance(i, FrameError) and i.reason == "bad_bcc" for i in out)


def test_fixed_framer_resyncs_on_its_header() -> None:
    out = FixedFramer(4, b"\xaa").feed(b"\x01\x02\xaa\x01\x02\x03\xaa\x04\x05\x06")
    assert [i.payload for i in out if isinstance(i, Frame)] == [b"\x01\x02\x03", b"\x04\x05\x06"]


def test_length_crc_with_header_and_modbus_crc() -> None:
    body = b"\x55\xaa\x05\x00hello"
    framer = LengthCrcFramer(
        "modbus", header=b"\x55\xaa", len_offset=2, len_width=2, len_order="little", len_adjust=6
    )
    frame = body + crc16_modbus(body).to_bytes(2, "little")
    out = framer.feed(b"\x00\x55" + frame)
    assert [i.payload for i in out if isinstance(i, Frame)] == [body]


def _framers() -> list[tuple[str, object]]:
    return [
        ("line", LineFramer(64)),
        ("stx", StxEtxFramer(64, bcc=True)),
        ("chafon", chafon.framer()),
        ("modbus", LengthCrcFramer("modbus", len_adjust=3, max_frame=64)),
        ("fixed", FixedFramer(8, b"\x7e")),
        ("fixed-nohdr", FixedFramer(5)),
    ]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes_split_anywhere_never_raise(data: bytes, cuts: list[int]) -> None:
    for _, framer in _framers():
        points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
        out: Output = []
        for a, b in itertools.pairwise(points):
            out += framer.feed(data[a:b])  # type: ignore[attr-defined]
        out += framer.flush()  # type: ignore[attr-defined]
        assert all(isinstance(i, Frame | FrameError) for i in out)
        # Nothing is lost or invented: every byte is in a frame or counted as garbage (line terminators
        # between lines belong to no frame).
        size = sum(len(i.raw) if isinstance(i, Frame) else i.size for i in out)
        if isinstance(framer, LineFramer):
            assert len(data) - data.count(b"\r") - data.count(b"\n") <= size <= len(data)
        else:
            assert size == len(data)


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=30),
    st.integers(1, 64),
)
def test_chafon_frames_in_garbage_are_found(
    before: bytes, after: bytes, epcs: list[bytes], chunk: int
) -> None:
    wire = chafon.encode_inventory_responses(0, epcs)
    stream = before + b"".join(wire) + after + b"".join(wire)
    framer = chafon.framer()
    frames: list[bytes] = []
    for start in range(0, len(stream), chunk):
        frames += [i.raw for i in framer.feed(stream[start : start + chunk]) if isinstance(i, Frame)]
    # Garbage may by chance contain a valid frame or swallow a prefix; the last copy is always found whole.
    text = b"".join(frames)
    assert b"".join(wire) in text


def _length_crc_framers() -> list[LengthCrcFramer]:
    return [
        chafon.framer(),
        LengthCrcFramer("modbus", header=b"\xaa\x55", len_offset=2, len_adjust=5, max_frame=64),
    ]


def _modbus_with_header(body: bytes) -> bytes:
    frame = b"\xaa\x55" + bytes([len(body)]) + body
    return frame + crc16_modbus(frame).to_bytes(2, "little")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(max_size=120), st.lists(st.binary(min_size=1, max_size=40), max_size=3)),
        min_size=1,
        max_size=6,
    )
)
def test_bytes_one_at_a_time_give_the_same_frames_as_one_bulk_feed(
    parts: list[tuple[bytes, list[bytes]]],
) -> None:
    # Garbage and frames interleaved; the look-ahead keeps its progress between feeds, so chunking changes
    # when a frame is found, never which.
    for n, make in enumerate(_length_crc_framers()):
        stream = b"".join(
            garbage
            + b"".join(
                chafon.encode_response(0, chafon.CMD_INVENTORY, 0x01, b) if n == 0 else _modbus_with_header(b)
                for b in bodies
            )
            for garbage, bodies in parts
        )
        bulk = [i.raw for i in make.feed(stream) + make.flush() if isinstance(i, Frame)]
        single = _length_crc_framers()[n]
        trickled: list[bytes] = []
        for byte in stream:
            trickled += [i.raw for i in single.feed(bytes([byte])) if isinstance(i, Frame)]
        trickled += [i.raw for i in single.flush() if isinstance(i, Frame)]
        assert trickled == bulk


def test_a_long_false_length_fed_one_byte_at_a_time_does_not_hide_the_frames_after_it() -> None:
    # 0xFF claims a 256-byte frame; the real answers behind it are found as they complete, not after 256 bytes.
    wire = chafon.encode_inventory_responses(0, [bytes(range(12))])[0]
    framer = chafon.framer()
    got: list[bytes] = []
    for byte in b"\xff" + wire:
        got += [i.raw for i in framer.feed(bytes([byte])) if isinstance(i, Frame)]
    assert got == [wire]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.lists(st.text("0123456789ABCDEF", min_size=1, max_size=20), max_size=5))
def test_lines_in_garbage_are_found(garbage: bytes, lines: list[str]) -> None:
    framer = LineFramer(64)
    stream = garbage + b"\n" + b"".join(line.encode() + b"\r\n" for line in lines)
    got = [i.payload for i in framer.feed(stream) if isinstance(i, Frame)]
    assert got[len(got) - len(lines) :] == [line.encode() for line in lines]


def test_barcode_parsing() -> None:
    # GTIN-13 4899999000018 is from the simulated catalogue (valid GS1 check digit).
    scan = parse_barcode(b"]E04899999000018")
    assert not isinstance(scan, DecodeError)
    assert scan.symbology == "]E0"
    assert scan.gtin == "04899999000018"
    assert not isinstance(code128 := parse_barcode(b"ABC-123"), DecodeError)
    assert code128.gtin is None
    assert isinstance(parse_barcode(b"\x00\x01"), DecodeError)


def test_scale_parsing_a_and_d_format() -> None:
    # A&D standard format (A&D instruction manuals): header ST/US/OL, GS/NT, signed value, unit.
    fmt = ScaleFormat(
        re.compile(r"(?P<status>ST|US|OL),(?:GS|NT|TR),(?P<weight>[+-]?[0-9. ]+)\s*(?P<unit>kg|g|lb|oz)?"),
        "kg",
        frozenset({"ST"}),
        frozenset({"OL"}),
    )
    reading = parse_scale(b"ST,GS,+0001.234 kg", fmt)
    assert not isinstance(reading, DecodeError)
    assert reading.weight_kg == 1.234
    assert reading.stable
    grams = parse_scale(b"US,NT,-00012.5  g", fmt)
    assert not isinstance(grams, DecodeError)
    assert grams.weight_kg == -0.0125
    assert not grams.stable
    overload = parse_scale(b"OL,GS,+9999999 kg", fmt)
    assert isinstance(overload, DecodeError)
    assert overload.reason == "overload"


@given(st.binary(max_size=300))
def test_line_parsers_never_raise(data: bytes) -> None:
    fmt = ScaleFormat(re.compile(r"(?P<status>ST|US),GS,(?P<weight>[+-]?[0-9. e]+)(?P<unit>kg|g|xx)?"), "kg")
    assert parse_barcode(data) is not None
    assert parse_scale(data, fmt) is not None


@given(st.binary(max_size=300))
def test_chafon_decoders_never_raise(data: bytes) -> None:
    response = chafon.decode_response(data)
    if isinstance(response, chafon.Response):
        chafon.decode_inventory(response)
    chafon.decode_command(data)
    chafon.decode_inventory(chafon.Response(0, 1, data[0] if data else 1, data[1:]))


def test_scale_line_profile_reads_the_a_and_d_manual_examples() -> None:
    profile = get_profile("scale-line", SerialProfile)
    assert profile.scale is not None
    fmt = ScaleFormat(
        re.compile(profile.scale.pattern),
        profile.scale.default_unit,
        frozenset(profile.scale.stable),
        frozenset(profile.scale.overload),
    )
    # A&D GH-252 instruction manual, 10.6 "Data Format Examples" (A&D standard format: no GS/NT field).
    assert parse_scale(b"ST,+00081.72  g", fmt) == ScaleReading(0.08172, True)
    assert parse_scale(b"US,-00183.96  g", fmt) == ScaleReading(-0.18396, False)
    for overload in (b"OL,+9999999E+19", b"OL,-9999999E+19"):
        error = parse_scale(overload, fmt)
        assert isinstance(error, DecodeError)
        assert error.reason == "overload"
    # Indicators (AD-4329A manual 11.1.1) add header 2: GS gross, NT net, TR tare, PT preset tare.
    assert parse_scale(b"ST,NT,+0001.234 kg", fmt) == ScaleReading(1.234, True)


@pytest.mark.xfail(
    strict=True,
    reason="known: a garbage byte whose claimed frame spans real frames and happens to end in a matching CRC is"
    " taken as a frame when it arrives whole, while fed one byte at a time the real frames inside it win",
)
def test_a_garbage_length_whose_crc_collides_is_read_the_same_however_it_arrives() -> None:
    """Found by the property test above: b'6' (a length of 54) before zero-bodied Chafon frames."""
    bodies = [b"\x00" * 28, b"\x00" * 10, b"\x00" * 4]
    stream = b"6" + b"".join(chafon.encode_response(0, chafon.CMD_INVENTORY, 0x01, b) for b in bodies)
    bulk_framer, single = chafon.framer(), chafon.framer()
    bulk = [i.raw for i in bulk_framer.feed(stream) + bulk_framer.flush() if isinstance(i, Frame)]
    trickled: list[bytes] = []
    for byte in stream:
        trickled += [i.raw for i in single.feed(bytes([byte])) if isinstance(i, Frame)]
    trickled += [i.raw for i in single.flush() if isinstance(i, Frame)]
    assert trickled == bulk
