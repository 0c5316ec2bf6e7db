"""Pure MQTT payload decoding: JSON/CSV/raw mapping to sensor.sample, kiosk check-ins, RFID shelf tag reads,
route and device config, and properties (random input raises nothing but DecodeError).

Vectors are hand-written from the contracts: the mapping models (drivers/mqtt/profile.py), StaffCheckin and
SensorSample (gateway/kernel/events.py); struct layouts are checked against Python's own ``struct`` packing (IEEE
754 binary32 for float32). The SGTIN-96 EPC is the GS1 EPC Tag Data Standard's worked example.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from drivers.base import DecodeError
from drivers.mqtt.checkin import MAX_CHECKIN_BYTES, decode_checkin
from drivers.mqtt.config import MqttDriverConfig, TopicRoute
from drivers.mqtt.decode import Decoded, Rejection, TopicRouter, decode_routed, decode_tag_reads
from drivers.mqtt.devices import DeviceConfig
from drivers.mqtt.mapping import Mapped, compile_mapping
from drivers.mqtt.profile import MqttProfile, PayloadMapping, parse_path, profile_limits
from drivers.mqtt.rfid_reads import TagRead, decode_reads
from drivers.profiles import available, get_profile
from gateway.kernel.events import SensorSample, StaffCheckin

MAPPING: TypeAdapter[Any] = TypeAdapter(PayloadMapping)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MQTT_PROFILES = (
    "pos-terminal",
    "checkin-kiosk",
    "rfid-shelf-mqtt",
    "generic-json-sensor",
    "generic-csv-sensor",
)


def mapper(spec: dict[str, Any]) -> Any:
    return compile_mapping(MAPPING.validate_python(spec), "test")


def one(result: list[Mapped]) -> SensorSample:
    assert len(result) == 1
    return result[0].sample


def reason(run: Any, payload: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        run(payload)
    assert info.value.detail.isprintable()
    return info.value.reason


# --- field paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("temp", ("temp",)),
        ("data.temp", ("data", "temp")),
        ("readings[0].value", ("readings", 0, "value")),
        ("a[2][1]", ("a", 2, 1)),
        ("[0].v", (0, "v")),
        ("sensor-1.t_c", ("sensor-1", "t_c")),
    ],
)
def test_paths(path: str, steps: tuple[Any, ...]) -> None:
    assert parse_path(path) == steps


@pytest.mark.parametrize("path", ["", ".a", "a.", "a..b", "a[x]", "a[0]b", "a[", "a]", "a[-1]"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(ValueError, match="not a field path"):
        parse_path(path)


# --- JSON ----------------------------------------------------------------------------------------------------

JSON_SPEC: dict[str, Any] = {
    "format": "json",
    "time_path": "ts",
    "fields": [
        {"metric": "temperature", "path": "data.temp", "unit": "°C", "scale": 0.1},
        {"metric": "humidity", "path": "readings[1].value", "unit": "%", "optional": True},
        {"metric": "door_open", "path": "door"},
        {"metric": "power", "path": "p", "scale": 1000, "offset": -5, "optional": True},
    ],
}


def test_json_paths_scaling_booleans_and_time() -> None:
    body = {
        "data": {"temp": -182},
        "readings": [{"value": 1}, {"value": "55.5"}],
        "door": True,
        "p": 0.25,
        "ts": "2024-05-01T10:15:30.25+08:00",
    }
    [mapped] = mapper(JSON_SPEC).map(orjson.dumps(body))
    assert mapped.sample.values == {
        "temperature": pytest.approx(-18.2),
        "humidity": 55.5,
        "door_open": 1,
        "power": 245,
    }
    assert mapped.sample.units == {"temperature": "°C", "humidity": "%"}
    assert mapped.sample.source == "test"
    assert mapped.occurred_at == "2024-05-01T10:15:30.250+08:00"


def test_json_booleans_are_not_scaled() -> None:
    spec = {"format": "json", "fields": [{"metric": "alarm", "path": "a", "scale": 10, "offset": 3}]}
    assert one(mapper(spec).map(b'{"a": false}')).values == {"alarm": 0}
    assert one(mapper(spec).map(b'{"a": 2}')).values == {"alarm": 23}


def test_json_optional_fields_may_be_missing_or_null() -> None:
    sample = one(mapper(JSON_SPEC).map(b'{"data": {"temp": 40}, "door": false, "p": null}'))
    assert sample.values == {"temperature": 4.0, "door_open": 0}
    assert sample.units == {"temperature": "°C"}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json", "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "missing_field"),
        (b'{"door": true}', "missing_field"),
        (b'{"data": {"temp": "hot"}, "door": true}', "not_a_number"),
        (b'{"data": {"temp": [1]}, "door": true}', "not_a_number"),
        (b'{"data": {"temp": "NaN"}, "door": true}', "not_a_number"),
        (b'{"data": {"temp": 1e308}, "door": true, "p": 1e306}', "out_of_range"),
        (b'{"data": {"temp": 1}, "door": true, "ts": "2024-05-01T10:15:30"}', "bad_time"),
        (b'{"data": {"temp": 1}, "door": true, "ts": 1714529730}', "bad_time"),
        (b'{"data": {"temp": 1}, "door": true, "ts": "yesterday"}', "bad_time"),
    ],
)
def test_json_errors(payload: bytes, expected: str) -> None:
    assert reason(mapper(JSON_SPEC).map, payload) == expected


def test_json_mapping_config_errors() -> None:
    with pytest.raises(ValidationError, match="mapped twice"):
        MAPPING.validate_python(
            {"format": "json", "fields": [{"metric": "t", "path": "a"}, {"metric": "t", "path": "b"}]}
        )
    with pytest.raises(ValidationError, match="not a field path"):
        MAPPING.validate_python({"format": "json", "fields": [{"metric": "t", "path": "a..b"}]})
    with pytest.raises(ValidationError, match="String should match pattern"):
        MAPPING.validate_python({"format": "json", "fields": [{"metric": "Temp C", "path": "a"}]})


# --- CSV -----------------------------------------------------------------------------------------------------


def test_csv_by_index_with_booleans_and_several_lines() -> None:
    spec = {
        "format": "csv",
        "delimiter": ";",
        "columns": [
            {"metric": "temperature", "column": 0, "unit": "°C"},
            {"metric": "door_open", "column": 2},
            {"metric": "power", "column": 1, "scale": 0.001, "unit": "kW"},
        ],
    }
    result = mapper(spec).map(b"4.5;1200;true\r\n-18.25;0;OFF\n\n")
    assert [m.sample.values for m in result] == [
        {"temperature": 4.5, "door_open": 1, "power": 1.2},
        {"temperature": -18.25, "door_open": 0, "power": 0},
    ]
    assert result[0].sample.units == {"temperature": "°C", "power": "kW"}


def test_csv_with_header_names_columns_in_any_order() -> None:
    spec = {
        "format": "csv",
        "header": True,
        "columns": [
            {"metric": "temperature", "column": "temp"},
            {"metric": "humidity", "column": "rh", "optional": True},
        ],
    }
    assert one(mapper(spec).map(b"rh,temp\n50,3.5\n")).values == {"humidity": 50, "temperature": 3.5}
    assert one(mapper(spec).map(b'"temp"\n"3.5"\n')).values == {"temperature": 3.5}
    assert reason(mapper(spec).map, b"rh\n50\n") == "missing_field"
    assert reason(mapper(spec).map, b"temp,rh\n") == "empty"


def test_csv_names_need_a_header() -> None:
    with pytest.raises(ValidationError, match="header: true"):
        MAPPING.validate_python({"format": "csv", "columns": [{"metric": "t", "column": "temp"}]})


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"\xff\xfe", "not_utf8"),
        (b"abc,1", "not_a_number"),
        (b",1", "missing_field"),
        (b'"4.5,1', "not_csv"),
        (b"4\x00,1", "not_csv"),
        (b"1e400,1", "out_of_range"),
        (b"1\n" * 101, "too_many_lines"),
    ],
)
def test_csv_errors(payload: bytes, expected: str) -> None:
    spec = {
        "format": "csv",
        "columns": [{"metric": "t", "column": 0}, {"metric": "h", "column": 1, "optional": True}],
    }
    assert reason(mapper(spec).map, payload) == expected


# --- raw bytes -----------------------------------------------------------------------------------------------

RAW_SPEC: dict[str, Any] = {
    "format": "raw",
    "length": 10,
    "fields": [
        {"metric": "temperature", "byte": 0, "type": "int16", "scale": 0.1, "unit": "°C", "invalid": -32768},
        {"metric": "humidity", "byte": 2, "type": "uint16", "endian": "little", "scale": 0.01},
        {"metric": "pressure", "byte": 4, "type": "float32"},
        {"metric": "door_open", "byte": 8, "type": "uint8"},
        {"metric": "counter", "byte": 9, "type": "int8"},
    ],
}


def test_raw_fields_endianness_and_scale() -> None:
    frame = struct.pack(">h", -185) + struct.pack("<H", 5055) + struct.pack(">f", 1013.25) + bytes([1, 0xFF])
    sample = one(mapper(RAW_SPEC).map(frame))
    assert sample.values == {
        "temperature": pytest.approx(-18.5),
        "humidity": pytest.approx(50.55),
        "pressure": 1013.25,
        "door_open": 1,
        "counter": -1,
    }
    assert sample.faults == {}


def test_raw_invalid_marker_and_non_finite_float_are_faults() -> None:
    frame = struct.pack(">h", -32768) + b"\x00\x00" + struct.pack(">f", float("nan")) + b"\x00\x00"
    sample = one(mapper(RAW_SPEC).map(frame))
    assert set(sample.faults) == {"temperature", "pressure"}
    assert "temperature" not in sample.values
    assert sample.values["humidity"] == 0


@pytest.mark.parametrize("size", [0, 9, 11, 100])
def test_raw_wrong_length(size: int) -> None:
    assert reason(mapper(RAW_SPEC).map, bytes(size)) == "bad_length"


def test_raw_without_a_length_needs_enough_bytes_for_its_fields() -> None:
    spec = {"format": "raw", "fields": [{"metric": "v", "byte": 2, "type": "uint32", "endian": "little"}]}
    assert one(mapper(spec).map(b"\x00\x00\x01\x00\x00\x00extra")).values == {"v": 1}
    assert reason(mapper(spec).map, b"\x00" * 5) == "bad_length"


def test_raw_field_past_the_frame_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="past the frame length"):
        MAPPING.validate_python(
            {"format": "raw", "length": 2, "fields": [{"metric": "v", "byte": 1, "type": "int16"}]}
        )


# --- kiosk check-ins -----------------------------------------------------------------------------------------


def checkin(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "employee_id": "E1001",
        "direction": "in",
        "latitude": 22.2819,
        "longitude": 114.1585,
        "accuracy_m": 12.0,
        "face_match_score": 0.93,
        "kiosk_time": "2024-05-01T08:58:03.12+08:00",
    }
    body.update(changes)
    return body


def checkin_reason(body: dict[str, Any] | bytes) -> str:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return reason(decode_checkin, payload)


def test_valid_checkin() -> None:
    result = decode_checkin(orjson.dumps(checkin()))
    assert result.data == StaffCheckin(
        employee_id="E1001",
        direction="in",
        latitude=22.2819,
        longitude=114.1585,
        accuracy_m=12,
        face_match_score=0.93,
    )
    assert result.occurred_at == "2024-05-01T08:58:03.120+08:00"


def test_checkin_without_time_or_direction() -> None:
    body = checkin()
    del body["kiosk_time"], body["direction"]
    result = decode_checkin(orjson.dumps(body))
    assert result.occurred_at is None
    assert result.data.direction == "in"


BLOB = base64.b64encode(bytes(range(256)) * 2).decode()


@pytest.mark.parametrize(
    "changes",
    [
        {"face_image": "x"},
        {"photo": None},
        {"Picture": "a.jpg"},
        {"face": {"score": 1}},
        {"face_template": "AAAA"},
        {"embedding": [0.1, 0.2]},
        {"extra": {"selfie_jpeg": "x"}},
        {"meta": [{"thumbnail": 1}]},
        {"note": BLOB},
        {"note": "data:image/png;base64,iVBORw0KGgo="},
        {"scores": [0.5] * 128},
        {"biometric": True},
        {"fingerprint_hash": "ab"},
    ],
)
def test_biometric_looking_fields_are_refused(changes: dict[str, Any]) -> None:
    assert checkin_reason(checkin(**changes)) == "biometric_refused"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # JPEG SOI + APP0
        b"\x89PNG\r\n\x1a\n",
        b"x" * 200,
        orjson.dumps(checkin(note="y" * MAX_CHECKIN_BYTES)),
    ],
)
def test_images_and_large_messages_are_refused(payload: bytes) -> None:
    assert checkin_reason(payload) == "biometric_refused"


def test_face_match_score_is_the_one_face_field_allowed() -> None:
    assert checkin_reason(checkin(face_match_score_raw=1)) == "biometric_refused"
    assert decode_checkin(orjson.dumps(checkin())).data.face_match_score == 0.93


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"latitude": 91}, "invalid"),
        ({"longitude": -181}, "invalid"),
        ({"face_match_score": 1.5}, "invalid"),
        ({"accuracy_m": -1}, "invalid"),
        ({"direction": "sideways"}, "invalid"),
        ({"employee_id": ""}, "invalid"),
        ({"name": "Chan Tai Man"}, "invalid"),
        ({"kiosk_time": "2024-05-01T08:58:03"}, "bad_time"),
    ],
)
def test_invalid_checkins(changes: dict[str, Any], expected: str) -> None:
    assert checkin_reason(checkin(**changes)) == expected


@pytest.mark.parametrize("payload", [b"{", b"", b"null", b"[]", b"1"])
def test_small_garbage_is_not_json_or_invalid(payload: bytes) -> None:
    assert checkin_reason(payload) in ("not_json", "invalid")


def test_checkin_dedup_key_needs_the_kiosk_time() -> None:
    config = MqttDriverConfig(routes=[TopicRoute(pattern="k/{device_id}/c", profile="checkin-kiosk")])
    router = TopicRouter(config, {"kiosk-1": "checkin-kiosk"})
    matched = router.match("k/kiosk-1/c")
    assert not isinstance(matched, Rejection)
    spec, device = matched
    assert spec.redact
    [timed] = _decoded(decode_routed(spec, device, orjson.dumps(checkin())))
    assert timed.dedup_key == '["kiosk-1","staff.checkin","E1001","2024-05-01T08:58:03.120+08:00"]'
    assert timed.kind == "staff.checkin"
    body = checkin()
    del body["kiosk_time"]
    [untimed] = _decoded(decode_routed(spec, device, orjson.dumps(body)))
    assert untimed.dedup_key is None


def _decoded(result: list[Decoded] | Rejection) -> list[Decoded]:
    assert not isinstance(result, Rejection), result
    return result


# --- RFID shelf tag reads ------------------------------------------------------------------------------------

TDS_EPC = "3074257BF7194E4000001A85"  # GS1 EPC Tag Data Standard SGTIN-96 worked example


def test_tag_read_shapes() -> None:
    single = {"epc": TDS_EPC.lower(), "rssi": -52, "antenna": 1}
    assert decode_reads(orjson.dumps(single)) == [TagRead(TDS_EPC, -52.0, 1)]
    assert decode_reads(orjson.dumps([single, {"epc": "ABCD"}])) == [
        TagRead(TDS_EPC, -52.0, 1),
        TagRead("ABCD", None, None),
    ]
    assert decode_reads(orjson.dumps({"reads": [single]})) == [TagRead(TDS_EPC, -52.0, 1)]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"nope", "not_json"),
        (b"[]", "empty"),
        (orjson.dumps({"epc": "XYZ1"}), "bad_epc"),
        (orjson.dumps({"epc": "ABC"}), "bad_epc"),
        (orjson.dumps({"epc": 1234}), "bad_epc"),
        (orjson.dumps({"epc": "ABCD", "rssi": "loud"}), "invalid"),
        (orjson.dumps({"epc": "ABCD", "antenna": 300}), "invalid"),
        (orjson.dumps({"epc": "ABCD", "antenna": True}), "invalid"),
        (orjson.dumps({"epc": "ABCD", "tid": "00"}), "invalid"),
        (orjson.dumps({"reads": [], "x": 1}), "invalid"),
        (orjson.dumps([{"epc": "ABCD"}] * 1001), "too_many_reads"),
        (b"[1]", "invalid"),
    ],
)
def test_bad_tag_reads(body: bytes, expected: str) -> None:
    assert reason(decode_reads, body) == expected
    rejection = decode_tag_reads("shelf-1", body)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == expected


# --- profiles, routes and devices ----------------------------------------------------------------------------


def test_mqtt_profiles_are_valid_and_honest() -> None:
    assert set(MQTT_PROFILES) <= set(available("mqtt"))
    for name in MQTT_PROFILES:
        profile = get_profile(name, MqttProfile)
        assert profile.confidence != "verified on hardware"
        assert profile.source
        assert profile.topics


def test_profile_mapping_goes_with_decoder_sample() -> None:
    base = {
        "profile": "x",
        "family": "mqtt",
        "vendor": "v",
        "model": "m",
        "source": "s",
        "confidence": "third-party map: verify",
    }
    with pytest.raises(ValidationError, match="decoder 'sample'"):
        MqttProfile.model_validate({**base, "decoder": "sample"})
    with pytest.raises(ValidationError, match="decoder 'sample'"):
        MqttProfile.model_validate(
            {
                **base,
                "decoder": "pos",
                "mapping": {"format": "json", "fields": [{"metric": "t", "path": "t"}]},
            }
        )


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"pattern": "a/{device_id}"}, "give the route a 'profile'"),
        ({"pattern": "a/{device_id}", "profile": "pos-terminal"}, "give kind pos.sale or pos.return"),
        ({"pattern": "a/{device_id}", "profile": "checkin-kiosk", "kind": "pos.sale"}, "leave 'kind' out"),
        (
            {"pattern": "a/{device_id}", "profile": "checkin-kiosk", "mapping": JSON_SPEC},
            "for sensor profiles",
        ),
        ({"pattern": "a/{device_id}", "kind": "pos.sale", "mapping": JSON_SPEC}, "needs a sensor 'profile'"),
        ({"pattern": "a/{device_id}", "profile": "kiosk"}, "no mqtt profile 'kiosk'"),
    ],
)
def test_bad_routes(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TopicRoute.model_validate(route)


def test_route_mapping_overrides_the_profile_mapping() -> None:
    route = TopicRoute.model_validate(
        {"pattern": "s/{device_id}/raw", "profile": "generic-json-sensor", "mapping": RAW_SPEC}
    )
    router = TopicRouter(MqttDriverConfig(routes=[route]), {"s1": "generic-json-sensor"})
    matched = router.match("s/s1/raw")
    assert not isinstance(matched, Rejection)
    frame = struct.pack(">hHfBb", 40, 0, 0.0, 0, 0)
    [decoded] = _decoded(decode_routed(*matched, frame))
    assert isinstance(decoded.data, SensorSample)
    assert decoded.data.values["temperature"] == 4.0
    assert decoded.data.source == "generic-json-sensor"
    assert json.loads(decoded.data_json)["source"] == "generic-json-sensor"


def test_a_device_on_another_profiles_route_is_refused() -> None:
    config = MqttDriverConfig(
        routes=[
            TopicRoute(pattern="store/pos/{device_id}/sale", kind="pos.sale"),
            TopicRoute(pattern="store/kiosk/{device_id}/checkin", profile="checkin-kiosk"),
        ]
    )
    router = TopicRouter(config, {"till-1": "pos-terminal", "kiosk-1": "checkin-kiosk"})
    assert router.route("store/pos/till-1/sale") == ("pos.sale", "till-1")
    assert router.route("store/kiosk/kiosk-1/checkin") == ("staff.checkin", "kiosk-1")
    wrong = router.route("store/kiosk/till-1/checkin")
    assert isinstance(wrong, Rejection)
    assert wrong.reason == "wrong_profile"
    assert config.profiles() == {"pos-terminal", "checkin-kiosk"}


def test_device_profiles_aliases_and_limits() -> None:
    assert DeviceConfig(id="t1", profile="pos_terminal").profile == "pos_terminal"
    assert DeviceConfig(id="s1", profile="sensor").profile == "sensor"
    with pytest.raises(ValidationError, match="no mqtt profile 'kiosk'"):
        DeviceConfig(id="k1", profile="kiosk")
    kiosk = DeviceConfig(id="k1", profile="checkin-kiosk", rate_burst=3)
    limits = kiosk.limits_over(profile_limits("checkin-kiosk"))
    assert (limits.rate_burst, limits.rate_limit_per_s, limits.max_payload_bytes) == (3, 5, 2048)


# --- properties: nothing but DecodeError ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
JSON_MAPPER = mapper(JSON_SPEC)
CSV_MAPPER = mapper(
    {
        "format": "csv",
        "header": True,
        "columns": [{"metric": "t", "column": "t"}, {"metric": "h", "column": "h", "optional": True}],
    }
)
CSV_INDEX_MAPPER = mapper(
    {"format": "csv", "columns": [{"metric": "t", "column": 0}, {"metric": "h", "column": 3}]}
)
RAW_MAPPER = mapper(RAW_SPEC)
RAW_OPEN_MAPPER = mapper(
    {"format": "raw", "fields": [{"metric": "v", "byte": 1, "type": "float32", "scale": 1e30}]}
)


def only_decode_errors(run: Any, payload: bytes) -> None:
    error: DecodeError | None = None
    try:
        result = run(payload)
    except DecodeError as err:
        error = err
    if error is not None:
        assert error.reason
        assert error.detail.isprintable()
        return
    for item in result if isinstance(result, list) else [result]:
        if isinstance(item, Mapped):
            SensorSample.model_validate_json(orjson.dumps(item.sample.model_dump(mode="json")))


DECODERS = (
    JSON_MAPPER.map,
    CSV_MAPPER.map,
    CSV_INDEX_MAPPER.map,
    RAW_MAPPER.map,
    RAW_OPEN_MAPPER.map,
    decode_checkin,
    decode_reads,
)


@PROPERTY
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_errors(payload: bytes) -> None:
    for run in DECODERS:
        only_decode_errors(run, payload)


@PROPERTY
@given(JSON_VALUES)
def test_random_json_raises_only_decode_errors(value: Any) -> None:
    payload = json.dumps(value).encode()
    for run in DECODERS:
        only_decode_errors(run, payload)


@PROPERTY
@given(st.dictionaries(st.sampled_from(sorted(checkin())), JSON_VALUES, max_size=7))
def test_random_checkin_shaped_json_raises_only_decode_errors(changes: dict[str, Any]) -> None:
    only_decode_errors(decode_checkin, json.dumps(checkin(**changes)).encode())


@PROPERTY
@given(
    st.lists(st.lists(st.text(max_size=8) | st.floats().map(str), max_size=5), max_size=5),
    st.sampled_from(",;\t|"),
)
def test_random_csv_raises_only_decode_errors(rows: list[list[str]], delimiter: str) -> None:
    payload = "\n".join(delimiter.join(r) for r in [["t", "h"], *rows]).encode()
    only_decode_errors(CSV_MAPPER.map, payload)
