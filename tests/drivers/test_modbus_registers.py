"""Pure Modbus register code: read planning, decoding (types, byte and word orders, scale, bit fields,
sentinels), write encoding, the profile model, the shipped profiles and the driver config.

Vectors: IEEE 754-2008 binary32 encodings (1.0 = 0x3F800000, -2.5 = 0xC0200000, 123.456 = 0x42F6E979),
cross-checked against pymodbus's own ``convert_from_registers``/``convert_to_registers`` (the reference
implementation the driver talks through); two's complement int16/int32; the request limits of the Modbus
Application Protocol v1.1b (125 registers, 2000 bits); the RTU frame gap of Modbus over Serial Line v1.02.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DecodeError
from drivers.modbus.config import ModbusDriverConfig
from drivers.modbus.profile import ModbusProfile, Point
from drivers.modbus.registers import (
    MAX_BITS,
    MAX_REGISTERS,
    Decoded,
    ReadBlock,
    WriteRefusedError,
    decode_block,
    decode_point,
    encode_value,
    encode_write,
    plan_reads,
)
from drivers.profiles import available, get_profile
from simulators.fridge import registers_for

MODBUS_PROFILES = ("dixell-xr", "carel-ir33", "danfoss-ekc-202d", "eliwell-idplus-9xx")


def point(**fields: Any) -> Point:
    base: dict[str, Any] = {"name": "value", "address": 0, "group": "g"}
    return Point.model_validate(base | fields)


def decode(p: Point, words: list[int]) -> Decoded:
    out = Decoded()
    decode_point(p, words, out)
    return out


# --- decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "byte_order", "word_order"),
    [
        ([0x3F80, 0x0000], "big", "big"),  # ABCD: IEEE 754 binary32 1.0 = 0x3F800000
        ([0x0000, 0x3F80], "big", "little"),  # CDAB (word swap)
        ([0x803F, 0x0000], "little", "big"),  # BADC (byte swap)
        ([0x0000, 0x803F], "little", "little"),  # DCBA
    ],
)
def test_float32_in_every_byte_and_word_order(words: list[int], byte_order: str, word_order: str) -> None:
    p = point(type="float32", byte_order=byte_order, word_order=word_order)
    assert decode(p, words).values == {"value": 1.0}


@pytest.mark.parametrize(
    ("raw", "value"),
    [(0x3F800000, 1.0), (0xC0200000, -2.5), (0x42F6E979, 123.456)],  # IEEE 754 binary32 encodings
)
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_float32_matches_pymodbus_reference(
    raw: int, value: float, word_order: Literal["big", "little"]
) -> None:
    words = [raw >> 16, raw & 0xFFFF] if word_order == "big" else [raw & 0xFFFF, raw >> 16]
    reference = AsyncModbusTcpClient.convert_from_registers(
        words, AsyncModbusTcpClient.DATATYPE.FLOAT32, word_order=word_order
    )
    got = decode(point(type="float32", word_order=word_order), words).values["value"]
    assert got == reference
    assert math.isclose(got, value, rel_tol=1e-6)
    encoded = AsyncModbusTcpClient.convert_to_registers(
        value, AsyncModbusTcpClient.DATATYPE.FLOAT32, word_order=word_order
    )
    assert list(encode_value(point(type="float32", word_order=word_order), value)) == encoded


@pytest.mark.parametrize(
    ("kind", "words", "scale", "expected"),
    [
        ("int16", [0xFF38], 0.1, -20.0),  # two's complement -200
        ("int16", [0xFFCE], 0.1, -5.0),
        ("int16", [0x7FFF], 0.1, 3276.7),
        ("uint16", [0xFFFF], 1.0, 65535.0),
        ("int32", [0xFFFF, 0xFFFE], 1.0, -2.0),
        ("uint32", [0x0001, 0x0000], 1.0, 65536.0),
        ("int16", [0x0025], 0.1, 3.7),
    ],
)
def test_integers_and_scale(kind: str, words: list[int], scale: float, expected: float) -> None:
    assert decode(point(type=kind, scale=scale), words).values["value"] == expected


def test_offset_and_unit() -> None:
    p = point(type="uint16", scale=0.5, offset=-40, unit="°C")
    out = decode(p, [100])
    assert out.values == {"value": 10.0}
    assert out.units == {"value": "°C"}


def test_int32_word_order_matches_pymodbus() -> None:
    words = [0x0002, 0xFFFF]  # -65534 with the low word first
    reference = AsyncModbusTcpClient.convert_from_registers(
        words, AsyncModbusTcpClient.DATATYPE.INT32, word_order="little"
    )
    assert decode(point(type="int32", word_order="little"), words).values["value"] == reference


def test_a_sentinel_is_a_fault_not_a_value() -> None:
    p = point(type="int16", scale=0.1, sentinels={0x8000: "probe fault"})
    out = decode(p, [0x8000])
    assert out.values == {}
    assert out.faults == {"value": "probe fault (raw 0x8000)"}
    assert decode(p, [0x7FFF]).values == {"value": 3276.7}


def test_float_nan_is_a_fault() -> None:
    out = decode(point(type="float32"), [0x7FC0, 0x0000])  # IEEE 754 quiet NaN
    assert out.faults["value"].startswith("not a number")


def test_bit_fields_with_invert() -> None:
    p = point(
        name="status",
        type="uint16",
        bits=[
            {"name": "compressor_on", "bit": 0},
            {"name": "door_open", "bit": 3},
            {"name": "ok", "bit": 15, "invert": True},
        ],
    )
    assert decode(p, [0b1001]).values == {"compressor_on": 1.0, "door_open": 1.0, "ok": 1.0}
    assert decode(p, [0x8000]).values == {"compressor_on": 0.0, "door_open": 0.0, "ok": 0.0}


def test_a_sentinel_on_a_bit_field_faults_every_bit() -> None:
    p = point(
        name="status",
        type="uint16",
        bits=[{"name": "a", "bit": 0}, {"name": "b", "bit": 1}],
        sentinels={0xFFFF: "not fitted"},
    )
    assert set(decode(p, [0xFFFF]).faults) == {"a", "b"}


def test_decode_block_maps_addresses_and_coils() -> None:
    a = point(name="a", address=10, scale=0.1)
    b = point(name="b", address=12, type="int32")
    block = ReadBlock(3, 10, 4, (a, b))
    out = Decoded()
    decode_block(block, [0xFFF6, 0xDEAD, 0x0000, 0x0007], out)
    assert out.values == {"a": -1.0, "b": 7.0}
    coil = point(name="c", address=3, function=1, type="bool")
    out = Decoded()
    decode_block(ReadBlock(1, 0, 4, (coil,)), [False, False, False, True, False, False, False, False], out)
    assert out.values == {"c": 1.0}


def test_short_response_and_bad_registers_are_decode_errors() -> None:
    block = ReadBlock(3, 0, 2, (point(name="a"), point(name="b", address=1)))
    with pytest.raises(DecodeError) as short:
        decode_block(block, [1], Decoded())
    assert short.value.reason == "short_response"
    with pytest.raises(DecodeError) as bad:
        decode_block(block, [1, 70000], Decoded())
    assert bad.value.reason == "bad_register"


points_strategy = st.builds(
    lambda kind, bo, wo, scale, sentinel: point(
        type=kind,
        byte_order=bo,
        word_order=wo,
        scale=scale,
        sentinels={sentinel: "fault"} if sentinel is not None else {},
    ),
    st.sampled_from(["int16", "uint16", "int32", "uint32", "float32", "bool"]),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
    st.sampled_from([1.0, 0.1, 0.01, -1.0, 1e30]),
    st.one_of(st.none(), st.integers(0, 0xFFFF)),
)


@settings(max_examples=300)
@given(points_strategy, st.lists(st.integers(-(2**17), 2**17), max_size=4))
def test_random_registers_never_raise_anything_but_decode_error(p: Point, words: list[int]) -> None:
    block = ReadBlock(p.function, p.address, p.width, (p,))
    with contextlib.suppress(DecodeError):
        decode_block(block, words, Decoded())


@settings(max_examples=200)
@given(st.lists(st.booleans(), max_size=20), st.integers(0, 15))
def test_random_bits_never_raise_anything_but_decode_error(bits: list[bool], address: int) -> None:
    coil = point(function=2, type="bool", address=address)
    with contextlib.suppress(DecodeError):
        decode_block(ReadBlock(2, 0, address + 1, (coil,)), bits, Decoded())


# --- read planning -----------------------------------------------------------------------------------


def test_plan_joins_neighbours_and_splits_at_gaps_and_functions() -> None:
    points = [
        point(name="a", address=0x100),
        point(name="b", address=0x101),
        point(name="c", address=0x104, type="int32"),
        point(name="d", address=0x200),
        point(name="e", address=0x100, function=4),
        point(name="f", address=5, function=1, type="bool"),
    ]
    blocks = plan_reads(points, max_gap=8)
    assert [(b.function, b.start, b.count) for b in blocks] == [
        (1, 5, 1),
        (3, 0x100, 6),
        (3, 0x200, 1),
        (4, 0x100, 1),
    ]
    assert [p.name for p in blocks[1].points] == ["a", "b", "c"]
    tight = plan_reads(points[:3], max_gap=0)
    assert [(b.start, b.count) for b in tight] == [(0x100, 2), (0x104, 2)]


def test_plan_respects_the_request_limits() -> None:
    registers = [point(name=f"r{i}", address=i) for i in range(300)]
    blocks = plan_reads(registers)
    assert [b.count for b in blocks] == [MAX_REGISTERS, MAX_REGISTERS, 50]
    coils = [point(name=f"c{i}", address=i, function=1, type="bool") for i in range(4500)]
    assert [b.count for b in plan_reads(coils)] == [MAX_BITS, MAX_BITS, 500]
    small = plan_reads(registers[:10], max_registers=4)
    assert [b.count for b in small] == [4, 4, 2]


def test_a_32_bit_value_is_never_split_across_blocks() -> None:
    points = [point(name=f"v{i}", address=2 * i, type="float32") for i in range(70)]
    for block in plan_reads(points):
        assert block.count % 2 == 0
        assert block.count <= MAX_REGISTERS


@given(st.sets(st.integers(0, 3000), min_size=1, max_size=200), st.integers(0, 20), st.integers(2, 125))
def test_plans_cover_every_point_within_the_limit(addresses: set[int], gap: int, limit: int) -> None:
    points = [point(name=f"p{a}", address=a) for a in sorted(addresses)]
    blocks = plan_reads(points, max_gap=gap, max_registers=limit)
    covered = [p.name for b in blocks for p in b.points]
    assert sorted(covered) == sorted(p.name for p in points)
    for block in blocks:
        assert block.count <= limit
        for p in block.points:
            assert block.start <= p.address < block.start + block.count


# --- writes ------------------------------------------------------------------------------------------


def test_writes_encode_to_the_right_function() -> None:
    setpoint = point(name="setpoint", type="int16", scale=0.1, write={"min": -30, "max": 15}, address=0x300)
    request = encode_write(setpoint, -5.0)
    assert (request.function, request.address, request.values) == (6, 0x300, (0xFFCE,))
    coil = point(name="defrost_start", function=1, type="bool", write={"min": 0, "max": 1})
    assert encode_write(coil, True).function == 5
    wide = point(name="limit", type="float32", write={"min": -100, "max": 100})
    assert encode_write(wide, 1.0).values == (0x3F80, 0x0000)
    assert encode_write(wide, 1.0).function == 16


@pytest.mark.parametrize(
    ("value", "reason"),
    [(16, "out_of_range"), (-30.1, "out_of_range"), (4.55, "invalid_value"), (math.nan, "invalid_value")],
)
def test_invalid_writes_are_refused(value: float, reason: str) -> None:
    setpoint = point(name="setpoint", type="int16", scale=0.1, write={"min": -30, "max": 15})
    with pytest.raises(WriteRefusedError) as refused:
        encode_write(setpoint, value)
    assert refused.value.reason == reason


def test_read_only_and_unrepresentable_writes_are_refused() -> None:
    with pytest.raises(WriteRefusedError, match="not writable"):
        encode_write(point(), 1)
    narrow = point(type="uint16", write={"min": -10, "max": 10})
    with pytest.raises(WriteRefusedError, match="does not fit"):
        encode_write(narrow, -1)
    coil = point(function=1, type="bool", write={"min": 0, "max": 1})
    with pytest.raises(WriteRefusedError):
        encode_write(coil, 0.5)


@given(st.integers(-32768, 32767))
def test_int16_round_trip(raw: int) -> None:
    p = point(type="int16", scale=0.1, write={"min": -4000, "max": 4000})
    value = round(raw * 0.1, 1)
    assert decode(p, list(encode_value(p, value))).values["value"] == value


# --- profiles and config -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODBUS_PROFILES)
def test_shipped_profiles_validate(name: str) -> None:
    profile = get_profile(name, ModbusProfile)
    assert profile.family == "modbus"
    assert profile.confidence != "verified on hardware"  # nothing here was checked on a controller
    assert profile.source
    assert plan_reads(profile.points, max_registers=profile.max_registers_per_read)


def test_every_modbus_profile_is_covered() -> None:
    assert set(available("modbus")) == set(MODBUS_PROFILES)


def test_dixell_probes_are_at_0x0100_int16_tenths() -> None:
    # store-gateway issue #4: a generic Dixell XR has its probes at 0x0100, int16 x 0.1.
    air = get_profile("dixell-xr", ModbusProfile).point("air_temperature")
    assert air is not None
    assert (air.address, air.function, air.type, air.scale) == (0x0100, 3, "int16", 0.1)
    assert 0x8000 in air.sentinels


def profile_doc(points: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "profile": "t",
        "family": "modbus",
        "vendor": "v",
        "model": "m",
        "source": "s",
        "confidence": "third-party map: verify",
        "groups": {"g": {"interval_s": 1}},
        "points": points,
        **extra,
    }


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([{"name": "a", "address": 0, "group": "x"}], "unknown group"),
        ([{"name": "a", "address": 0, "group": "g"}, {"name": "a", "address": 1, "group": "g"}], "twice"),
        (
            [
                {"name": "a", "address": 0, "type": "int32", "group": "g"},
                {"name": "b", "address": 1, "group": "g"},
            ],
            "overlap",
        ),
        (
            [{"name": "a", "address": 0, "function": 4, "group": "g", "write": {"min": 0, "max": 1}}],
            "read-only",
        ),
        ([{"name": "a", "address": 0, "function": 1, "type": "int16", "group": "g"}], "type 'bool'"),
        (
            [{"name": "a", "address": 0, "type": "int16", "group": "g", "bits": [{"name": "b", "bit": 0}]}],
            "uint16",
        ),
        ([{"name": "a", "address": 0, "group": "g", "sentinels": {70000: "x"}}], "does not fit"),
        ([{"name": f"m{i}", "address": i, "group": "g"} for i in range(65)], "at most 64"),
    ],
)
def test_bad_profiles_are_refused(points: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusProfile.model_validate(profile_doc(points))


def driver_doc(**extra: Any) -> dict[str, Any]:
    return {
        "type": "modbus",
        "transport": "rtu",
        "serial_port": "/dev/serial/by-id/usb-test",
        "devices": [{"id": "fridge-1", "unit": 1, "profile": "dixell-xr"}],
        **extra,
    }


def test_rtu_frame_gap_is_three_and_a_half_characters() -> None:
    # Modbus over Serial Line v1.02, 2.5.1.1: 3.5 characters (11 bits each with parity or 2 stop bits,
    # 10 bits for 8N1); a fixed 1.75 ms above 19200 baud.
    assert math.isclose(
        ModbusDriverConfig.model_validate(driver_doc(baudrate=9600)).frame_gap_s, 3.5 * 10 / 9600
    )
    even = ModbusDriverConfig.model_validate(driver_doc(baudrate=9600, parity="E"))
    assert math.isclose(even.frame_gap_s, 3.5 * 11 / 9600)
    assert ModbusDriverConfig.model_validate(driver_doc(baudrate=115200)).frame_gap_s == 0.00175
    assert ModbusDriverConfig.model_validate(driver_doc(inter_frame_gap_s=0.01)).frame_gap_s == 0.01


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"serial_port": None}, "needs 'serial_port'"),
        ({"devices": [{"id": "f", "unit": 0, "profile": "dixell-xr"}]}, "1-247"),
        ({"devices": [{"id": "f", "unit": 1, "profile": "dixel-xr"}]}, "did you mean 'dixell-xr'"),
        (
            {"devices": [{"id": "f", "unit": 1, "profile": "dixell-xr", "poll_intervals": {"nope": 1}}]},
            "no group nope",
        ),
        (
            {
                "devices": [
                    {"id": "f", "unit": 1, "profile": "dixell-xr"},
                    {"id": "g", "unit": 1, "profile": "dixell-xr"},
                ]
            },
            "duplicate units",
        ),
        ({"transport": "tcp"}, "needs 'host'"),
        ({"speed": 1}, "Extra inputs"),
    ],
)
def test_bad_driver_configs_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusDriverConfig.model_validate(driver_doc(**extra))


def test_the_gateway_config_takes_a_modbus_driver() -> None:
    from gateway.config import GatewayConfig

    config = GatewayConfig.model_validate(
        {
            "gateway_id": "gw-1",
            "store": {"id": "hk-0042", "name": "t", "timezone": "Asia/Hong_Kong"},
            "store_broker": {"host": "127.0.0.1", "port": 1883},
            "hq": {"host": "127.0.0.1", "port": 1883},
            "api": {"enabled": False},
            "drivers": [driver_doc(name="cold-room-bus")],
        }
    )
    (driver,) = config.drivers
    assert isinstance(driver, ModbusDriverConfig)
    assert driver.devices[0].profile == "dixell-xr"


def test_a_sentinel_reason_fits_the_sample_fault_limit() -> None:
    """SensorSample.faults holds 200 characters: a reason is at most 180, with " (raw 0x...)" it fits."""
    base = {"name": "t", "address": 0, "type": "uint32", "group": "g"}
    with pytest.raises(ValidationError):
        Point.model_validate(base | {"sentinels": {0x80000000: "x" * 181}})
    point = Point.model_validate(base | {"sentinels": {0x80000000: "x" * 180}})
    into = Decoded()
    decode_point(point, [0x8000, 0x0000], into)
    assert 0 < len(into.faults["t"]) <= 200


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
def test_the_simulator_serves_32_bit_raw_registers_in_the_point_order(
    word_order: str, byte_order: str
) -> None:
    """A 32-bit bit field and sentinel decode back to what the simulator meant, whatever the orders."""
    orders = {"word_order": word_order, "byte_order": byte_order}
    bits = [{"name": "low", "bit": 0}, {"name": "high", "bit": 31}]
    field_point = Point.model_validate(
        {"name": "f", "address": 0, "type": "uint32", "group": "g", "bits": bits} | orders
    )
    words = registers_for(field_point, {"low": 1.0, "high": 1.0})
    assert words is not None
    into = Decoded()
    decode_point(field_point, words, into)
    assert into.values == {"low": 1.0, "high": 1.0}
    sentinel = {0x80000001: "probe fault"}
    probe = Point.model_validate(
        {"name": "t", "address": 0, "type": "int32", "group": "g", "sentinels": sentinel} | orders
    )
    words = registers_for(probe, {"t": None})
    assert words is not None
    into = Decoded()
    decode_point(probe, words, into)
    assert into.faults["t"].startswith("probe fault")
