"""BLE decoders with vectors from each format's spec and from the reference implementations' own tests, the
simulator's encoders round-tripped through them, and random bytes (hypothesis) that never raise anything but
DecodeError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DecodeError
from drivers.ble.bthome import OBJECTS, decode_bthome
from drivers.ble.decode import decode_advertisement
from drivers.ble.formats import BTHOME_UUID, ENVIRONMENTAL_SENSING_UUID, FORMATS, RUUVI_COMPANY_ID, mac_bytes
from drivers.ble.ruuvi import decode_ruuvi
from drivers.ble.xiaomi import decode_atc1441, decode_pvvx
from simulators import ble as enc

SHELLY_MAC = mac_bytes("54:48:E6:8F:80:A5")
BTHOME_KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
RUUVI_MAC = mac_bytes("CB:B8:33:4C:88:4F")
ATC_MAC = mac_bytes("A4:C1:38:02:83:F4")
PVVX_ENC_MAC = mac_bytes("A4:C1:38:8D:18:B2")
PVVX_KEY = bytes.fromhex("b9ea895fac7eea6d30532432a516f3a3")


def reason(call: object, *args: object) -> str:
    assert callable(call)
    with pytest.raises(DecodeError) as caught:
        call(*args)
    return caught.value.reason


# --- BTHome v2 ----------------------------------------------------------------------------------------------


def test_bthome_spec_example() -> None:
    # bthome.io/format: service data 4002c40903bf13 -> temperature 25.00 °C, humidity 50.55 %.
    got = decode_bthome(bytes.fromhex("4002c40903bf13"), SHELLY_MAC)
    assert got.values == {"temperature": 25.0, "humidity": 50.55}
    assert got.units == {"temperature": "°C", "humidity": "%"}
    assert got.source == "bthome.v2"
    assert got.counter is None


def test_bthome_pressure() -> None:
    # Bluetooth-Devices/bthome-ble tests/test_parser_v2.py test_mac_as_name: 40 04 13 8a 01 -> 1008.83 hPa.
    assert decode_bthome(bytes.fromhex("4004138a01"), SHELLY_MAC).values == {"pressure": 1008.83}


def test_bthome_shelly_display_packet_id_battery_and_one_decimal_temperature() -> None:
    # bthome-ble tests/test_parser_v2.py test_shelly_blu_ht_display_zb: packet 46, battery 100 %,
    # humidity 52 % (0x2E), temperature 27.8 °C (0x45); 0x1E is a binary object (light).
    got = decode_bthome(bytes.fromhex("40002e01641e012e34451601"), SHELLY_MAC)
    assert got.counter == 46
    assert got.battery_pct == 100
    assert got.values["humidity"] == 52
    assert got.values["temperature"] == 27.8
    assert got.values["light"] == 1


def test_bthome_window_open() -> None:
    # bthome-ble tests/test_parser_v2.py test_bthome_binary_sensor_window: 40 2D 01 -> window open.
    assert decode_bthome(bytes.fromhex("402d01"), SHELLY_MAC).values == {"window_open": 1}


def test_bthome_door_opening_and_battery_low() -> None:
    # Derived from the bthome.io/format table: 0x11 opening, 0x15 battery low, 0x1A door (1 = open).
    got = decode_bthome(bytes.fromhex("4011011501" + "1a00"), SHELLY_MAC)
    assert got.values == {"opening": 1, "battery_low": 1, "door_open": 0}


def test_bthome_negative_temperatures() -> None:
    # Derived from the spec: 0x02 is sint16 * 0.01 (0xF830 = -2000 -> -20.00), 0x45 sint16 * 0.1 (0xFF9C = -100).
    got = decode_bthome(bytes.fromhex("4002" + "30f8" + "45" + "9cff"), SHELLY_MAC)
    assert got.values == {"temperature": -20.0, "temperature_2": -10.0}


def test_bthome_voltage_and_power() -> None:
    # Derived from the spec: 0x0C voltage uint16 * 0.001 (0x0C02 = 3074 -> 3.074 V), 0x0B power uint24 * 0.01.
    got = decode_bthome(bytes.fromhex("400b" + "021b00" + "0c" + "020c"), SHELLY_MAC)
    assert got.values == {"power": 69.14, "voltage": 3.074}
    assert got.units == {"power": "W", "voltage": "V"}


def test_bthome_encrypted_reference_vector() -> None:
    # bthome-ble tests/test_parser_v2.py test_bindkey_correct (MAC 54:48:E6:8F:80:A5, counter 00112233):
    # temperature 25.06 °C, humidity 50.55 %.
    frame = bytes.fromhex("41a47266c95f730011223378237214")
    got = decode_bthome(frame, SHELLY_MAC, BTHOME_KEY)
    assert got.values == {"temperature": 25.06, "humidity": 50.55}
    assert got.counter == 0x33221100


def test_bthome_encrypted_wrong_key() -> None:
    # bthome-ble tests/test_parser_v2.py test_bindkey_wrong: this frame does not verify under 814aac74...
    frame = bytes.fromhex("41d2fcefe52eb212d6001122 33bc38c966".replace(" ", ""))
    wrong = bytes.fromhex("814aac74c4f17b6c1581e1ab87816b99")
    assert reason(decode_bthome, frame, mac_bytes("A4:C1:38:8D:18:B2"), wrong) == "decrypt_failed"


def test_bthome_encrypted_frame_from_another_mac_fails() -> None:
    # The MAC is part of the nonce: the reference frame replayed from another address does not verify.
    frame = bytes.fromhex("41a47266c95f730011223378237214")
    assert reason(decode_bthome, frame, mac_bytes("54:48:E6:8F:80:A6"), BTHOME_KEY) == "decrypt_failed"


def test_bthome_encryption_round_trip_matches_reference_encoder() -> None:
    # bthome-ble tests/test_v2_encryption.py: data 02CA0903BF13, counter 00112233, info 0x41 -> this payload.
    sealed = enc.bthome_encrypted(bytes.fromhex("02ca0903bf13"), SHELLY_MAC, BTHOME_KEY, 0x33221100)
    assert sealed == bytes.fromhex("41a47266c95f730011223378237214")


def test_bthome_refusals() -> None:
    # bthome-ble test_has_incorrect_version: info byte 0xE1 is version 7.
    assert reason(decode_bthome, bytes.fromhex("e102000c04"), SHELLY_MAC) == "unsupported_version"
    assert reason(decode_bthome, b"", SHELLY_MAC) == "truncated"
    # Encrypted without a key, and plain while the device has a key (downgrade, as bthome-ble refuses it).
    assert (
        reason(decode_bthome, bytes.fromhex("41a47266c95f730011223378237214"), SHELLY_MAC)
        == "bindkey_missing"
    )
    assert reason(decode_bthome, bytes.fromhex("4004138a01"), SHELLY_MAC, BTHOME_KEY) == "not_encrypted"
    # Truncated object (temperature needs 2 bytes), and an unknown object id before anything was read.
    assert reason(decode_bthome, bytes.fromhex("4002c4"), SHELLY_MAC) == "truncated"
    with pytest.raises(DecodeError, match="0x9f"):
        decode_bthome(bytes.fromhex("409f0102c409"), SHELLY_MAC)
    assert reason(decode_bthome, bytes.fromhex("41a47266"), SHELLY_MAC, BTHOME_KEY) == "truncated"


def test_bthome_unknown_object_keeps_what_came_before_it() -> None:
    # bthome-ble (parser.py, V2): an object id not in MEAS_TYPES ends parsing ("break"), the objects before it
    # are reported. Derived: temperature 25.00 °C (02 c409), then id 0x9f, unknown, so its length too.
    got = decode_bthome(bytes.fromhex("4002c4099f01"), SHELLY_MAC)
    assert got.values == {"temperature": 25.0}
    assert list(got.faults) == ["object_9f"]
    assert "0x9f" in got.faults["object_9f"]
    assert "2 bytes not read" in got.faults["object_9f"]


def test_a_battery_above_100_is_a_fault_and_the_rest_is_kept() -> None:
    # Derived from the bthome.io/format table: battery (0x01) 0xC8 = 200 %, temperature (0x02) 25.00 °C.
    got = decode_bthome(bytes.fromhex("4001c802c409"), SHELLY_MAC)
    assert got.values == {"temperature": 25.0}
    assert got.battery_pct is None
    assert "200 %" in got.faults["battery_pct"]


def test_bthome_every_object_id_has_a_usable_metric_name() -> None:
    names = {o.metric for o in OBJECTS.values()} - {""}
    assert all(n.replace("_", "").isalnum() and n.islower() for n in names)


# --- Ruuvi RAWv2 --------------------------------------------------------------------------------------------


def test_ruuvi_valid() -> None:
    # docs.ruuvi.com data format 5, "valid data" test vector.
    got = decode_ruuvi(bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F"), RUUVI_MAC)
    assert got.values == {
        "temperature": 24.3,
        "humidity": 53.49,
        "pressure": 1000.44,
        "acceleration_x": 0.004,
        "acceleration_y": -0.004,
        "acceleration_z": 1.036,
        "voltage": 2.977,
        "tx_power": 4,
        "movement_count": 66,
    }
    assert got.counter == 205
    assert got.faults == {}


def test_ruuvi_maximum() -> None:
    # docs.ruuvi.com data format 5, "maximum values" test vector.
    got = decode_ruuvi(bytes.fromhex("057FFFFFFEFFFE7FFF7FFF7FFFFFDEFEFFFECBB8334C884F"), RUUVI_MAC)
    assert got.values["temperature"] == 163.835
    assert got.values["humidity"] == 163.835
    assert got.values["pressure"] == 1155.34
    assert got.values["acceleration_z"] == 32.767
    assert got.values["tx_power"] == 20
    assert got.values["voltage"] == 3.646
    assert got.values["movement_count"] == 254
    assert got.counter == 65534


def test_ruuvi_minimum_negative_temperature() -> None:
    # docs.ruuvi.com data format 5, "minimum values" test vector.
    got = decode_ruuvi(bytes.fromhex("058001000000008001800180010000000000CBB8334C884F"), RUUVI_MAC)
    assert got.values["temperature"] == -163.835
    assert got.values["humidity"] == 0
    assert got.values["pressure"] == 500.0
    assert got.values["acceleration_x"] == -32.767
    assert got.values["tx_power"] == -40
    assert got.values["voltage"] == 1.6
    assert got.counter == 0


def test_ruuvi_invalid_markers_are_faults() -> None:
    # docs.ruuvi.com data format 5, "invalid values" test vector: every field not available.
    got = decode_ruuvi(bytes.fromhex("058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF"), RUUVI_MAC)
    assert got.values == {}
    assert set(got.faults) == {
        "temperature",
        "humidity",
        "pressure",
        "acceleration_x",
        "acceleration_y",
        "acceleration_z",
        "voltage",
        "tx_power",
        "movement_count",
        "sequence",
    }
    assert got.counter is None


def test_ruuvi_refusals() -> None:
    valid = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    assert reason(decode_ruuvi, valid[:-1], RUUVI_MAC) == "bad_length"
    assert reason(decode_ruuvi, b"\x03" + valid[1:], RUUVI_MAC) == "unsupported_format"
    assert reason(decode_ruuvi, valid, ATC_MAC) == "mac_mismatch"


# --- Xiaomi LYWSD03MMC custom firmware ------------------------------------------------------------------


def test_atc1441_reference_vector() -> None:
    # custom-components/ble_monitor tests/test_atc_parser.py test_atc_atc1441 (service data after 1a18):
    # 16.2 °C, 47 %, battery 95 %, 3.064 V, packet 25.
    got = decode_atc1441(bytes.fromhex("a4c1380283f400a22f5f0bf819"), ATC_MAC)
    assert got.values == {"temperature": 16.2, "humidity": 47, "voltage": 3.064, "battery_pct": 95}
    assert got.counter == 25
    assert got.battery_pct == 95


def test_atc1441_extended_advertisement_vector() -> None:
    # ble_monitor tests/test_atc_parser.py test_atc_atc1441_ext: 25.8 °C, 40 %, 79 %, 2.919 V, packet 32.
    got = decode_atc1441(bytes.fromhex("a4c138bc7c4e0102284f0b6720"), mac_bytes("A4:C1:38:BC:7C:4E"))
    assert got.values == {"temperature": 25.8, "humidity": 40, "voltage": 2.919, "battery_pct": 79}
    assert got.counter == 32


def test_atc1441_negative_temperature() -> None:
    # Derived from the README: int16 big-endian * 0.1; 0xFF9C = -100 -> -10.0 °C.
    frame = enc.atc1441(ATC_MAC, temperature=-10.0, humidity=80, battery_pct=50, millivolts=2800, counter=1)
    assert frame[6:8] == b"\xff\x9c"
    assert decode_atc1441(frame, ATC_MAC).values["temperature"] == -10.0


def test_pvvx_reed_switch_is_flags_bit_0_and_set_means_open() -> None:
    """pvvx's custom format: flags bit 0 is the reed input, and opening = flags & 1. The firmware's source, at
    commit 7363cc80 (2026-05-15):

    - README.md line 449, the custom format's ``uint8_t flags``: ``// bit0: Reed Switch, input``
      https://github.com/pvvx/ATC_MiThermometer/blob/7363cc80e5642157369926f115e5c791977db7f2/README.md?plain=1#L449
    - src/trigger.h line 16: ``u8 rds1_input : 1; // Reed Switch, input``, the first bit of ``trg.flg_byte``,
      which src/custom_beacon.c line 116 sends as the flags byte (``p->flags = trg.flg_byte;``)
      https://github.com/pvvx/ATC_MiThermometer/blob/7363cc80e5642157369926f115e5c791977db7f2/src/custom_beacon.c#L116
    - src/rds_count.h line 54, ``get_rds1_input()``: the pin's level under a pull-up (``RDS1_PULLUP``), so an
      open contact reads 1 (the ``rs1_invert`` option flips it on the device itself)
    - src/bthome_beacon.c line 136: the firmware sends that same bit as BTHome's "opened" (1 = open):
      ``p->opened1 = trg.flg.rds1_input;``
      https://github.com/pvvx/ATC_MiThermometer/blob/7363cc80e5642157369926f115e5c791977db7f2/src/bthome_beacon.c#L136
    """
    closed = enc.pvvx_plain(
        ATC_MAC, temperature=4.0, humidity=50.0, millivolts=3000, battery_pct=90, counter=1
    )
    opened = enc.pvvx_plain(
        ATC_MAC, temperature=4.0, humidity=50.0, millivolts=3000, battery_pct=90, counter=2, door_open=True
    )
    assert (closed[-1] & 1, opened[-1] & 1) == (0, 1)
    assert decode_pvvx(closed, ATC_MAC, reed_switch=True).values["opening"] == 0
    assert decode_pvvx(opened, ATC_MAC, reed_switch=True).values["opening"] == 1
    for flags, opening in ((0x00, 0), (0x01, 1), (0x0E, 0), (0x0D, 1), (0xFF, 1)):
        frame = closed[:-1] + bytes((flags,))
        assert decode_pvvx(frame, ATC_MAC, reed_switch=True).values["opening"] == opening, hex(flags)


def test_pvvx_reference_vectors() -> None:
    # ble_monitor tests/test_atc_parser.py test_atc_custom: 17.05 °C, 44.57 %, 2.998 V, 88 %, packet 247.
    frame = bytes.fromhex("f4830238c1a4a9066911b60b58f70d")
    got = decode_pvvx(frame, ATC_MAC)
    assert got.values == {"temperature": 17.05, "humidity": 44.57, "voltage": 2.998, "battery_pct": 88}
    assert got.counter == 247
    # Its flags byte 0x0d has bit 0 set: with a reed switch fitted, the contact is open (see the test above).
    assert decode_pvvx(frame, ATC_MAC, reed_switch=True).values["opening"] == 1
    # ble_monitor test_atc_custom_v2_9: 20.91 °C, 44.96 %, 2.807 V, 67 %, packet 32.
    got = decode_pvvx(bytes.fromhex("b2188d38c1a42b089011f70a43200f"), PVVX_ENC_MAC)
    assert (got.values["temperature"], got.values["humidity"], got.values["voltage"]) == (20.91, 44.96, 2.807)
    assert (got.battery_pct, got.counter) == (67, 32)


def test_pvvx_encrypted_reference_vector() -> None:
    # ble_monitor tests/test_atc_parser.py test_atc_custom_encrypted (key b9ea895f..., MAC A4:C1:38:8D:18:B2):
    # 23.45 °C, 41.73 %, battery 61 %, packet 17.
    # Its decrypted flags byte has bit 0 clear: the contact is closed.
    got = decode_pvvx(bytes.fromhex("11d603fbfa7b6dfb1e26fd"), PVVX_ENC_MAC, PVVX_KEY, reed_switch=True)
    assert got.values == {"temperature": 23.45, "humidity": 41.73, "battery_pct": 61, "opening": 0}
    assert got.counter == 17
    without = decode_pvvx(bytes.fromhex("11d603fbfa7b6dfb1e26fd"), PVVX_ENC_MAC, PVVX_KEY)
    assert "opening" not in without.values


def test_pvvx_negative_temperature_round_trip_plain_and_encrypted() -> None:
    # Derived from the README: int16 little-endian * 0.01; -18.5 °C in a freezer.
    plain = enc.pvvx_plain(
        ATC_MAC, temperature=-18.5, humidity=70.0, millivolts=2900, battery_pct=80, counter=9, door_open=True
    )
    assert plain[6:8] == (-1850).to_bytes(2, "little", signed=True)
    got = decode_pvvx(plain, ATC_MAC, reed_switch=True)
    assert (got.values["temperature"], got.values["opening"], got.counter) == (-18.5, 1, 9)
    sealed = enc.pvvx_encrypted(
        ATC_MAC, PVVX_KEY, temperature=-18.5, humidity=70.0, battery_pct=80, counter=10
    )
    got = decode_pvvx(sealed, ATC_MAC, PVVX_KEY, reed_switch=True)
    assert (got.values["temperature"], got.values["opening"], got.counter) == (-18.5, 0, 10)


def test_xiaomi_refusals() -> None:
    assert (
        reason(decode_pvvx, bytes.fromhex("11d603fbfa7b6dfb1e26fd"), PVVX_ENC_MAC, bytes(16))
        == "decrypt_failed"
    )
    assert reason(decode_pvvx, bytes.fromhex("11d603fbfa7b6dfb1e26fd"), PVVX_ENC_MAC) == "bindkey_missing"
    assert (
        reason(decode_pvvx, bytes.fromhex("f4830238c1a4a9066911b60b58f70d"), ATC_MAC, PVVX_KEY)
        == "not_encrypted"
    )
    assert reason(decode_pvvx, bytes.fromhex("f4830238c1a4a9066911b60b58f7"), ATC_MAC) == "bad_length"
    assert (
        reason(decode_pvvx, bytes.fromhex("f4830238c1a4a9066911b60b58f70d"), PVVX_ENC_MAC) == "mac_mismatch"
    )
    assert reason(decode_atc1441, bytes.fromhex("a4c1380283f400a22f5f0bf8"), ATC_MAC) == "bad_length"
    # Battery 255 % cannot be: a fault of the battery, the temperature is kept.
    got = decode_atc1441(bytes.fromhex("a4c1380283f400a22fff0bf819"), ATC_MAC)
    assert (got.values["temperature"], got.battery_pct, "battery_pct" in got.faults) == (16.2, None, True)


# --- dispatch and encoders ----------------------------------------------------------------------------------


def test_dispatch_reads_the_formats_own_entry() -> None:
    ruuvi = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    got = decode_advertisement("ruuvi.rawv2", RUUVI_MAC, {}, {RUUVI_COMPANY_ID: ruuvi})
    assert got.source == "ruuvi.rawv2"
    got = decode_advertisement("bthome.v2", SHELLY_MAC, {BTHOME_UUID: bytes.fromhex("402d01")}, {})
    assert got.values == {"window_open": 1}
    with pytest.raises(DecodeError) as caught:
        decode_advertisement("pvvx", ATC_MAC, {BTHOME_UUID: b"\x40"}, {})
    assert caught.value.reason == "no_payload"


@pytest.mark.parametrize("fmt", FORMATS)
def test_simulated_sensors_decode_to_their_state(fmt: str) -> None:
    key = PVVX_KEY if fmt in ("bthome.v2", "pvvx") else None
    for sensor in enc.sensors(2, fmt, key, seed=7):  # type: ignore[arg-type]
        for _ in range(5):
            sensor.step(10.0)
            advert = sensor.advert()
            got = decode_advertisement(
                sensor.fmt, sensor.mac, advert.service_data, advert.manufacturer_data, sensor.key
            )
            places = 1 if fmt == "atc1441" else 2
            assert got.values["temperature"] == pytest.approx(round(sensor.temperature, places), abs=0.011)
            assert got.counter == sensor.counter % (0xFFFF if fmt == "ruuvi.rawv2" else 256)


def test_simulator_main_prints_adverts(capsys: pytest.CaptureFixture[str]) -> None:
    assert enc.main(["--sensors", "2", "--count", "4", "--fast", "--format", "pvvx"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert ENVIRONMENTAL_SENSING_UUID in lines[0]


# --- property tests -----------------------------------------------------------------------------------------

MACS = st.binary(min_size=6, max_size=6)
KEYS = st.none() | st.binary(min_size=16, max_size=16)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64), mac=MACS, key=KEYS)
def test_bthome_random_bytes_only_decode_error(data: bytes, mac: bytes, key: bytes | None) -> None:
    for frame in (data, b"\x40" + data, b"\x41" + data):
        with contextlib.suppress(DecodeError):
            decode_bthome(frame, mac, key)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40), mac=MACS, key=KEYS)
def test_other_decoders_random_bytes_only_decode_error(data: bytes, mac: bytes, key: bytes | None) -> None:
    for frame in (data, b"\x05" + data[:23], data[:11], data[:13], data[:15]):
        with contextlib.suppress(DecodeError):
            decode_ruuvi(frame, mac)
        with contextlib.suppress(DecodeError):
            decode_atc1441(frame, mac)
        with contextlib.suppress(DecodeError):
            decode_pvvx(frame, mac, key)


@settings(max_examples=200, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    service=st.dictionaries(
        st.sampled_from([BTHOME_UUID, ENVIRONMENTAL_SENSING_UUID]), st.binary(max_size=30)
    ),
    maker=st.dictionaries(st.sampled_from([RUUVI_COMPANY_ID, 0x004C]), st.binary(max_size=30)),
    key=KEYS,
)
def test_dispatch_random_adverts_only_decode_error(
    fmt: str, service: dict[str, bytes], maker: dict[int, bytes], key: bytes | None
) -> None:
    with contextlib.suppress(DecodeError):
        decode_advertisement(fmt, bytes(6), service, maker, key)  # type: ignore[arg-type]
