"""Threat: a profile in ``$STORE_GATEWAY_PROFILES`` changes how devices are read, behind the operator's back
(docs/SECURITY.md).

Whoever can write a profile decides what the gateway makes of a device's messages, and an override of the
kiosk's profile could switch off its biometric refusal. So every override is logged at WARNING with both paths;
the folder, the folders above it and each profile must belong to root or to the gateway's user and not be
writable by group or others (or no profile is read and check-config fails, naming the path and the fix); and an
override may not change the kind of device a shipped profile reads (its family, or the kiosk's ``checkin``
decoder). Real files and modes in a temporary folder; the ownership cases need root to chown.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from drivers.modbus.profile import ModbusProfile
from drivers.mqtt.profile import MqttProfile
from drivers.profiles import PROFILES_ENV, ProfileError, available, get_profile
from gateway.config_loader import check_config

SHIPPED = available()
OTHER_USER = 65534
"""nobody: a non-root user other than the gateway's."""

CONFIG = """\
gateway_id: gw-01
store:
  id: hk-001
  name: Test Store
hq:
  host: hq.example.com
api:
  enabled: false
drivers:
  - type: modbus
    transport: tcp
    host: 127.0.0.1
    devices:
      - {id: fridge-1, unit: 1, profile: dixell-xr}
"""


def shipped_text(name: str, old: str = "", new: str = "") -> str:
    text = SHIPPED[name].read_text(encoding="utf-8")
    assert old in text
    return text.replace(old, new, 1)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profiles folder only this user can write to, named by ``$STORE_GATEWAY_PROFILES``."""
    path = tmp_path / "profiles"
    path.mkdir(mode=0o700)
    path.chmod(0o700)  # whatever the umask
    monkeypatch.setenv(PROFILES_ENV, str(path))
    return path


def put(folder: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_an_override_is_used_and_logged_with_both_paths(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    override = put(
        folder, "dixell-xr", shipped_text("dixell-xr", "vendor: Dixell", "vendor: LOCAL COPY of Dixell")
    )
    put(folder, "acme-fc200", shipped_text("dixell-xr", "profile: dixell-xr", "profile: acme-fc200"))
    with caplog.at_level(logging.WARNING, logger="drivers.profiles"):
        profile = get_profile("dixell-xr", ModbusProfile)
    assert profile.vendor.startswith("LOCAL COPY")
    assert get_profile("acme-fc200", ModbusProfile).profile == "acme-fc200"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"profile dixell-xr: {override} overrides the shipped {SHIPPED['dixell-xr']}"]


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_folder_others_can_write_to_is_refused(folder: Path, mode: int) -> None:
    put(folder, "acme-fc200", shipped_text("dixell-xr", "profile: dixell-xr", "profile: acme-fc200"))
    folder.chmod(mode)
    expected = f"the profiles folder {folder} ({PROFILES_ENV}) can be written by other users"
    with pytest.raises(ProfileError, match=re.escape(expected)) as info:
        get_profile("dixell-xr", ModbusProfile)  # a shipped one: nothing is read from an unsafe folder
    assert str(info.value).endswith(f"chmod go-w {folder}")


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_profile_others_can_write_to_is_refused(folder: Path, mode: int) -> None:
    path = put(
        folder, "acme-fc200", shipped_text("dixell-xr", "profile: dixell-xr", "profile: acme-fc200"), mode
    )
    with pytest.raises(ProfileError, match=re.escape(f"the profile {path} ({PROFILES_ENV}) can be written")):
        get_profile("acme-fc200", ModbusProfile)
    path.chmod(0o644)
    assert get_profile("acme-fc200", ModbusProfile).profile == "acme-fc200"


def test_a_writable_folder_above_is_refused_unless_it_is_sticky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write a folder above can swap the profiles folder itself; the sticky bit (/tmp) stops that."""
    shared = tmp_path / "shared"
    folder = shared / "profiles"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    put(folder, "acme-fc200", shipped_text("dixell-xr", "profile: dixell-xr", "profile: acme-fc200"))
    monkeypatch.setenv(PROFILES_ENV, str(folder))
    shared.chmod(0o777)
    with pytest.raises(
        ProfileError, match=re.escape(f"{shared}, a folder above the profiles folder {folder},")
    ):
        get_profile("acme-fc200", ModbusProfile)
    shared.chmod(0o1777)
    assert get_profile("acme-fc200", ModbusProfile).profile == "acme-fc200"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_folder_or_profile_of_another_user_is_refused(folder: Path) -> None:
    path = put(folder, "acme-fc200", shipped_text("dixell-xr", "profile: dixell-xr", "profile: acme-fc200"))
    os.chown(path, OTHER_USER, -1)
    with pytest.raises(
        ProfileError, match=re.escape(f"the profile {path} ({PROFILES_ENV}) belongs to another")
    ):
        get_profile("acme-fc200", ModbusProfile)
    os.chown(path, 0, -1)
    os.chown(folder, OTHER_USER, -1)
    with pytest.raises(ProfileError, match=f"uid {OTHER_USER}") as info:
        get_profile("acme-fc200", ModbusProfile)
    assert f"chown 0 {folder}" in str(info.value)


def test_an_override_may_not_drop_the_kiosk_checkin_decoder(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``checkin`` decoder is what refuses images and templates and keeps kiosk payloads out of the
    quarantine: an override that reads kiosk messages as plain sensor JSON would let them through."""
    mapping = "mapping:\n  format: json\n  fields:\n    - {path: face_match_score, metric: score}\n"
    put(
        folder,
        "checkin-kiosk",
        shipped_text("checkin-kiosk", "decoder: checkin", "decoder: sample") + mapping,
    )
    with pytest.raises(ProfileError, match="changes its decoder from 'checkin' to 'sample'") as info:
        get_profile("checkin-kiosk", MqttProfile)
    assert "refuses biometric data" in str(info.value)
    assert "give the profile another name" in str(info.value)

    # An override that keeps the decoder (new limits, a new description) is allowed, and logged.
    kept = put(
        folder, "checkin-kiosk", shipped_text("checkin-kiosk", "rate_limit_per_s: 5", "rate_limit_per_s: 2")
    )
    with caplog.at_level(logging.WARNING, logger="drivers.profiles"):
        profile = get_profile("checkin-kiosk", MqttProfile)
    assert profile.decoder == "checkin"
    assert any(str(kept) in r.getMessage() for r in caplog.records)


def test_an_override_may_not_change_the_family(folder: Path) -> None:
    put(folder, "dixell-xr", shipped_text("checkin-kiosk", "profile: checkin-kiosk", "profile: dixell-xr"))
    with pytest.raises(ProfileError, match="changes its family from 'modbus' to 'mqtt'"):
        get_profile("dixell-xr", ModbusProfile)


def test_a_fifo_named_like_a_profile_is_refused_without_hanging(folder: Path) -> None:
    os.mkfifo(folder / "acme-fc200.yaml", 0o600)
    with pytest.raises(ProfileError, match="a profile is a regular file"):
        get_profile("dixell-xr", ModbusProfile)


def test_check_config_names_the_unsafe_folder_and_the_fix(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    device_line = CONFIG.splitlines().index("      - {id: fridge-1, unit: 1, profile: dixell-xr}") + 1
    folder.chmod(0o777)
    code, text = check_config(config, no_secrets=True, env={})
    assert code == 1
    assert f"{config}:{device_line}:" in text
    assert f"the profiles folder {folder} ({PROFILES_ENV}) can be written by other users" in text
    assert f"chmod go-w {folder}" in text
    folder.chmod(0o700)
    assert check_config(config, no_secrets=True, env={})[0] == 0
