"""Every shipped device profile validates against its family's model, states its source and confidence, and is
used by the example store config (so check-config keeps them all honest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from drivers.ble.config import BleProfile
from drivers.http.config import HttpProfile
from drivers.modbus.profile import ModbusProfile
from drivers.mqtt.profile import MqttProfile
from drivers.profiles import ProfileBase, ProfileError, available, get_profile
from drivers.serial.config import SerialProfile

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "firmware_configs" / "store-example.yaml"
MODELS: dict[str, type[ProfileBase]] = {
    "ble": BleProfile,
    "http": HttpProfile,
    "modbus": ModbusProfile,
    "mqtt": MqttProfile,
    "serial": SerialProfile,
}
SHIPPED = sorted(available())


def family_of(name: str) -> str:
    data = YAML(typ="safe", pure=True).load(available()[name].read_text(encoding="utf-8"))
    return str(data["family"])


def test_the_issue_profiles_are_shipped() -> None:
    assert {
        "eliwell-idplus-9xx",
        "dixell-xr",
        "carel-ir33",
        "danfoss-ekc-202d",
        "bthome-v2",
        "ruuvi-rawv2",
        "pvvx-lywsd03mmc",
        "chafon-cf-ru5102",
        "pos-terminal",
        "checkin-kiosk",
        "rfid-shelf-mqtt",
    } <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_validates_and_says_where_it_comes_from(name: str) -> None:
    family = family_of(name)
    profile = get_profile(name, MODELS[family])
    assert profile.profile == name
    assert profile.source.strip()
    # Nothing in this repository has been checked on a real device yet: no profile may claim it.
    assert profile.confidence != "verified on hardware"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_example_store_uses_every_profile(name: str) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    if family_of(name) == "http":
        fmt = get_profile(name, HttpProfile).format
        assert f"format: {fmt}" in text, f"no webhook source of format {fmt} in {EXAMPLE.name}"
    else:
        assert f"profile: {name}" in text, f"{name} is not used in {EXAMPLE.name}"


def test_a_profile_of_another_family_is_refused_with_a_hint() -> None:
    with pytest.raises(ProfileError, match="did you mean 'dixell-xr'"):
        get_profile("dixel-xr", ModbusProfile)
    with pytest.raises(ProfileError, match="no modbus profile 'bthome-v2'"):
        get_profile("bthome-v2", ModbusProfile)
