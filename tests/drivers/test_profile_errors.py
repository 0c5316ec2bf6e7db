"""A broken profile is reported like a broken config: every problem with file:line:col, the key path and a hint.

Real profile files in a ``$STORE_GATEWAY_PROFILES`` folder made here (only this user can write it, as the
gateway requires), read by the same code the gateway runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.modbus.profile import ModbusProfile
from drivers.profiles import PROFILES_ENV, ProfileError, available, get_profile
from gateway.config_loader import check_config
from tests.security.test_profile_overrides import CONFIG as OVERRIDES_CONFIG

DIXELL = available()["dixell-xr"].read_text(encoding="utf-8")
AIR_POINT = "  - {name: air_temperature, address: 0x0100,"

CONFIG = OVERRIDES_CONFIG.replace("profile: dixell-xr}", "profile: acme-fc200}")
"""A store whose one Modbus device names ``acme-fc200``."""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "profiles"
    path.mkdir()
    path.chmod(0o700)
    monkeypatch.setenv(PROFILES_ENV, str(path))
    return path


def acme(folder: Path, old: str = "", new: str = "") -> Path:
    """dixell-xr's map as the override-free profile ``acme-fc200``, with ``old`` replaced by ``new``."""
    text = DIXELL.replace("profile: dixell-xr", "profile: acme-fc200", 1)
    assert old in text
    path = folder / "acme-fc200.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    path.chmod(0o644)
    return path


def line_of(path: Path, marker: str) -> int:
    lines = [n for n, text in enumerate(path.read_text().splitlines(), start=1) if marker in text]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def problem(name: str) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        get_profile(name, ModbusProfile)
    return info.value


def test_a_wrong_type_has_the_file_line_key_path_and_hint(folder: Path) -> None:
    path = acme(folder, "address: 0x0100,", "address: lots,")
    error = problem("acme-fc200")
    [issue] = error.issues
    line = line_of(path, "address: lots,")
    assert (issue.file, issue.line, issue.key_path) == (str(path), line, "points[0].address")
    assert issue.column == path.read_text().splitlines()[line - 1].index("address: lots") + 1
    assert issue.value_repr == "'lots'"
    assert issue.message.startswith("Input should be a valid integer")
    assert issue.hint == "PDU address, 0-based."
    assert str(error) == (
        f"{path}:{line}:{issue.column}: points[0].address: 'lots' -> {issue.message} (hint: PDU address, 0-based.)"
    )


def test_every_problem_is_reported_at_once_in_file_order(folder: Path) -> None:
    path = acme(folder, "confidence:", "confidense:")
    path.write_text(path.read_text().replace(AIR_POINT, "  - {name: air_temperature, address: -1,"))
    error = problem("acme-fc200")
    keys = [i.key_path for i in error.issues]
    assert set(keys) == {"points[0].address", "confidense", "confidence"}
    assert [i.line for i in error.issues] == sorted(i.line or 0 for i in error.issues)
    typo = next(i for i in error.issues if i.key_path == "confidense")
    assert (typo.line, typo.hint) == (line_of(path, "confidense:"), "did you mean 'confidence'?")
    assert len(str(error).splitlines()) == 3


def test_yaml_errors_have_their_lines(folder: Path) -> None:
    path = acme(folder, "vendor: Dixell", "vendor: Dixell\nvendor: Acme")
    [issue] = problem("dixell-xr").issues  # one broken file: no profile is read
    assert (issue.line, issue.key_path) == (line_of(path, "vendor: Acme"), "vendor")
    assert issue.message == "duplicate key 'vendor' (first at line 3)"

    path.write_text(
        DIXELL.replace("profile: dixell-xr", "profile: acme-fc200").replace("family:", " family:")
    )
    [issue] = problem("acme-fc200").issues
    assert issue.line == line_of(path, "family:")
    assert issue.message.startswith("YAML syntax error")
    assert issue.hint is not None


def test_the_profile_name_must_be_the_file_name(folder: Path) -> None:
    path = acme(folder, "profile: acme-fc200", "profile: acme-fc300")
    [issue] = problem("acme-fc200").issues
    assert (issue.line, issue.column, issue.key_path, issue.value_repr) == (1, 1, "profile", "'acme-fc300'")
    assert issue.message == "a profile's 'profile' is its file name, 'acme-fc200'"
    assert issue.hint == "write 'profile: acme-fc200', or rename the file"
    assert str(issue).startswith(f"{path}:1:1: profile: 'acme-fc300' -> ")


def test_check_config_shows_where_the_profile_is_broken(folder: Path, tmp_path: Path) -> None:
    profile = acme(folder, "address: 0x0100,", "address: lots,")
    config = tmp_path / "store.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    code, text = check_config(config, no_secrets=True, env={})
    assert code == 1
    [line, summary] = text.splitlines()
    assert line.startswith(f"{config}:14:33: drivers[0].devices[0].profile: 'acme-fc200' -> {profile}:")
    assert f"{profile}:{line_of(profile, 'address: lots,')}:" in line
    assert "points[0].address: 'lots' -> Input should be a valid integer" in line
    assert summary == f"1 problem(s) in {config}"
