"""The config loader: every problem reported at once with file:line:col, secrets resolved and never shown."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from drivers.serial.config import SerialDriverConfig
from gateway.config import GatewayConfig
from gateway.config_loader import (
    ConfigError,
    ConfigIssue,
    check_config,
    config_hash,
    demo_config,
    json_schema,
    load_config,
)
from tests.harness.pki import write_pki

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "firmware_configs" / "store-example.yaml"
BAD = REPO / "tests" / "data" / "configs"

EXAMPLE_ENV = {
    "STORE_MQTT_PASSWORD": "store-broker-pass",
    "HQ_MQTT_PASSWORD": "hq-broker-pass-7f3a",
    "GATEWAY_API_TOKEN": "api-token-0123456789abcdef",
    "CHILLER_PROBE_BINDKEY": "231d39c1d7cc1ab1aee224cd096db932",
    "LIGHTSPEED_CLIENT_SECRET": "ls-client-secret-0123",
    "SQUARE_SIGNATURE_KEY": "sq-signature-key-0123",
    "WEB_SHOP_WEBHOOK_SECRET": "web-shop-secret-0123",
}
TOKEN = "api-token-0123456789abcdef"

MINIMAL = """\
gateway_id: gw-01
store:
  id: hk-001
  name: Test Store
hq:
  host: hq.example.com
api:
  token: {env: API_TOKEN}
"""


def line_of(path: Path, marker: str) -> int:
    """1-based line of the only line containing ``marker``."""
    lines = [n for n, text in enumerate(path.read_text().splitlines(), start=1) if marker in text]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def issues_of(path: Path, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return info.value.issues


def by_key(issues: list[ConfigIssue]) -> dict[str, ConfigIssue]:
    keyed = {issue.key_path: issue for issue in issues}
    assert len(keyed) == len(issues), issues
    return keyed


def write(tmp_path: Path, text: str, name: str = "store.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the shipped example


def test_example_config_validates() -> None:
    cfg = load_config(EXAMPLE, env=EXAMPLE_ENV)

    assert cfg.store.timezone == "Asia/Hong_Kong"
    assert cfg.hq.port == 8883
    assert cfg.hq.password is not None
    assert cfg.hq.password.get_secret_value() == EXAMPLE_ENV["HQ_MQTT_PASSWORD"]
    assert cfg.api.token is not None
    assert cfg.api.token.get_secret_value() == TOKEN
    assert cfg.hq.tls is not None
    assert cfg.hq.tls.ca_file == EXAMPLE.parent / "tls" / "hq-ca.pem"
    assert cfg.hq.tls.key_file == EXAMPLE.parent / "tls" / "gateway.key"
    assert [d.id for d in cfg.devices] == [
        "pos-01",
        "pos-02",
        "pos-03",
        "kiosk-staff",
        "shelf-a1",
        "fridge-01",
        "humidity-01",
    ]
    assert [d.type for d in cfg.drivers] == ["mqtt", "modbus", "modbus", "ble", "serial", "http"]
    assert cfg.outbox.classes["telemetry"].max_bytes == 2**30
    assert cfg.hq.compression == "zstd"
    assert all(item.sku for item in cfg.stock.items)


def test_check_config_on_the_example_with_its_secrets_and_tls_files(tmp_path: Path) -> None:
    """As on the box: the secrets set, and the TLS files it names (tls/ beside it) real PEM files."""
    example = shutil.copy(EXAMPLE, tmp_path / "store.yaml")
    pki = write_pki(tmp_path / "tls")
    pki["ca"].rename(tmp_path / "tls" / "hq-ca.pem")
    code, text = check_config(example, env=EXAMPLE_ENV)
    assert code == 0, text
    assert text.startswith("OK: ")
    assert "hk-cwb-012" in text
    assert all(secret not in text for secret in EXAMPLE_ENV.values())


def test_check_config_on_the_example_without_its_tls_files(tmp_path: Path) -> None:
    code, text = check_config(EXAMPLE, env=EXAMPLE_ENV)
    assert code == 1
    assert [line.split(": ")[1] for line in text.splitlines()[:-1]] == [
        "hq.tls.ca_file",
        "hq.tls.cert_file",
        "hq.tls.key_file",
    ]
    assert text.splitlines()[0].endswith(
        f"{EXAMPLE.parent / 'tls' / 'hq-ca.pem'}: missing (hint: check the path; relative paths in the config "
        f"are relative to its folder, {EXAMPLE.parent})"
    )


def test_check_config_no_secrets_on_the_example() -> None:
    code, text = check_config(EXAMPLE, env={}, no_secrets=True)
    assert code == 0, text
    assert re.search(r"; --no-secrets: 7 secret\(s\)( and \d TLS file\(s\))? not checked$", text), text


def test_no_secrets_fits_the_placeholder_to_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  port: {env: API_PORT}\n")
    code, text = check_config(path, env={}, no_secrets=True)
    assert code == 0, text
    assert text.endswith("; --no-secrets: 2 secret(s) not checked")
    assert "0123456789abcdef" not in text


def test_no_secrets_does_not_hide_errors_of_the_section_of_a_secret(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  port: 70000\n")
    code, text = check_config(path, env={}, no_secrets=True)
    assert code == 1
    assert "api.port: 70000 -> Input should be less than or equal to 65535" in text
    assert "API_TOKEN" not in text


def test_check_config_reports_problems_with_exit_code_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("API_TOKEN", raising=False)
    code, text = check_config(BAD / "several_errors.yaml")
    assert code == 1
    assert "hq.port: 70000 -> " in text
    assert "API_TOKEN is not set" in text
    assert text.splitlines()[-1].startswith("10 problem(s)")


def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    code, text = check_config(tmp_path / "nope.yaml")
    assert code == 1
    assert "cannot read the config file" in text


# --- every error at once, with lines


def test_several_errors_are_all_reported_with_lines_and_key_paths() -> None:
    path = BAD / "several_errors.yaml"
    issues = by_key(issues_of(path, env={"API_TOKEN": TOKEN}))

    expected = {
        "gateway_id": "E1",
        "store.timezone": "E2",
        "hq.port": "E3",
        "hq.protocol": "E4",
        "hq.pasword": "E5",
        "drivers[0].routes[0].kind": "E6",
        "devices[0].profile": "E7",
        "devices[1].profile": "E8",
        "stock.items[0].on_hand": "E9",
    }
    assert set(issues) == set(expected)
    for key_path, marker in expected.items():
        assert issues[key_path].line == line_of(path, marker), key_path
        assert issues[key_path].file == str(path)

    port = issues["hq.port"]
    assert (port.column, port.value_repr) == (5, "70000")
    assert port.message == "Input should be less than or equal to 65535"
    assert str(port) == (
        f"{path}:{port.line}:5: hq.port: 70000 -> Input should be less than or equal to 65535 "
        "(hint: Broker TCP port (8883 is usual with TLS).)"
    )
    assert issues["hq.protocol"].hint == "allowed values: '3.1.1', '5'"
    assert (
        issues["drivers[0].routes[0].kind"].hint
        == "allowed values: 'pos.sale', 'pos.return', 'sensor.reading'"
    )
    missing = issues["devices[1].profile"]
    assert missing.value_repr is None
    assert missing.hint is not None
    assert missing.hint.startswith("add 'profile': What the device is")
    assert issues["store.timezone"].value_repr == "'Asia/Hongkong'"


def test_error_text_has_one_line_per_issue_in_file_order() -> None:
    path = BAD / "several_errors.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.issues) == 10
    pattern = re.compile(rf"^{re.escape(str(path))}:(\d+):(\d+): \S+: ")
    numbers = []
    for line in lines:
        match = pattern.match(line)
        assert match, line
        numbers.append(int(match.group(1)))
    assert numbers == sorted(numbers)


def test_an_absent_section_whose_defaults_are_invalid_does_not_hide_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway_id: gw-01\nstore: {id: hk-001, name: Test}\nhq: {port: 0}\n")
    issues = by_key(issues_of(path))
    assert issues["api"].message == "Field required"
    assert "hq.port" in issues  # reported together with the missing section, not hidden by it


def test_duplicate_keys_are_all_reported() -> None:
    path = BAD / "duplicate_keys.yaml"
    issues = by_key(issues_of(path))
    assert set(issues) == {"store.id", "hq.port"}
    assert issues["store.id"].line == line_of(path, "D1")
    assert issues["store.id"].message == "duplicate key 'id' (first at line 3)"
    assert issues["hq.port"].line == line_of(path, "D2")
    assert issues["hq.port"].column == 3


def test_a_yaml_syntax_error_has_its_line() -> None:
    path = BAD / "syntax_error.yaml"
    [issue] = issues_of(path)
    assert issue.line == line_of(path, "S1")
    assert issue.message.startswith("YAML syntax error: mapping values are not allowed here")
    assert issue.hint is not None


def test_an_unclosed_bracket_names_where_it_opened(tmp_path: Path) -> None:
    [issue] = issues_of(write(tmp_path, "gateway_id: gw-01\nstore: [x, y\nhq: {}\n"))
    assert issue.line == 3
    assert "that starts at line 2" in issue.message


def test_an_unknown_key_gets_did_you_mean() -> None:
    path = BAD / "unknown_key.yaml"
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert issue.key_path == "hq.topic_prefx"
    assert issue.line == line_of(path, "U1")
    assert issue.hint == "did you mean 'topic_prefix'?"


def test_an_unknown_key_far_from_any_field_lists_the_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "journal:\n  zzz: 1\n")
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert issue.key_path == "journal.zzz"
    assert issue.hint is not None
    assert issue.hint.startswith("allowed keys here: commit_max_events, ")


def test_a_driver_without_type_is_told_which_types_exist(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "drivers:\n  - routes: []\n")
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert (issue.key_path, issue.line) == ("drivers[0]", 10)
    assert issue.hint == "add 'type: mqtt' (one of: 'mqtt', 'serial', 'ble', 'http', 'modbus')"


def test_a_number_where_text_is_expected_suggests_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("gateway_id: gw-01", "gateway_id: 0012"))
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert issue.key_path == "gateway_id"
    assert issue.hint is not None
    assert "quotes" in issue.hint


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", 1, "empty"),
        ("- a\n- b\n", 1, "must be a mapping"),
        ("gateway_id: gw-01\nstore: !!set {a}\n", 2, "!!set is not supported"),
        ("gateway_id: !custom gw-01\n", 1, "!custom is not supported"),
        ("a: &x 1\nb: &x 2\n", 2, "anchor &x is defined twice"),
        ("gateway_id: gw-01\n? [1, 2]\n: 3\n", 2, "keys must be text"),
        ("a: 1\n---\nb: 2\n", 2, "a second YAML document starts here"),
    ],
)
def test_odd_documents_are_config_errors_with_lines(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    issues = issues_of(write(tmp_path, text))
    assert any(i.line == line and fragment in i.message for i in issues), issues


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "store.yaml"
    path.write_bytes(b"gateway_id: gw-01\nstore:\n  name: caf\xe9\n")
    [issue] = issues_of(path)
    assert (issue.line, issue.column) == (3, 12)
    assert "UTF-8" in issue.message


def test_a_missing_file(tmp_path: Path) -> None:
    [issue] = issues_of(tmp_path / "nope.yaml")
    assert issue.line is None
    assert str(issue).startswith(f"{tmp_path / 'nope.yaml'}: cannot read the config file")
    assert issue.hint == "check the path"


def test_a_missing_file_given_by_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    [issue] = issues_of(Path("conf") / "nope.yaml")
    assert issue.hint == f"check the path; it is relative to the current directory {tmp_path}"


# --- secrets


def test_secrets_from_env_and_file_resolve(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hq_password").write_text("file-secret-value\n")
    path = write(
        tmp_path,
        MINIMAL.replace(
            "  host: hq.example.com\n", "  host: hq.example.com\n  password: {file: secrets/hq_password}\n"
        ),
    )
    cfg = load_config(path, env={"API_TOKEN": TOKEN})

    assert cfg.hq.password is not None
    assert cfg.hq.password.get_secret_value() == "file-secret-value"
    assert cfg.api.token is not None
    assert cfg.api.token.get_secret_value() == TOKEN
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert "file-secret-value" not in text
        assert TOKEN not in text


def test_a_missing_env_var_is_reported_with_line_and_hint(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    [issue] = issues_of(path, env={})
    assert (issue.key_path, issue.line, issue.column) == ("api.token", 8, 3)
    assert issue.message == "environment variable API_TOKEN is not set"
    assert issue.hint is not None
    assert "API_TOKEN" in issue.hint


def test_a_missing_secret_file_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("{env: API_TOKEN}", "{file: /nonexistent/api_token}"))
    [issue] = issues_of(path)
    assert (issue.key_path, issue.line) == ("api.token", 8)
    assert "cannot read secret file /nonexistent/api_token" in issue.message


def test_a_malformed_secret_reference(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("{env: API_TOKEN}", "{env: API_TOKEN, file: x}"))
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert issue.key_path == "api.token"
    assert "exactly one key" in issue.message


def test_secret_values_never_appear_in_errors_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    short_token = "tok-tooshort"  # fails the 16-character rule, so the api section is in the error
    (tmp_path / "pw").write_text("hq-file-password\n")
    text = """\
gateway_id: gw-01
store: {id: hk-001, name: Test}
hq:
  port: 99999
  password: {file: pw}
  pasword: inline-typo-password
store_broker:
  password: 12345678
api:
  token: {env: API_TOKEN}
  port: -1
"""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"API_TOKEN": short_token})
    rendered = str(info.value)
    keys = {i.key_path for i in info.value.issues}
    assert {"hq.port", "hq.pasword", "store_broker.password", "api.port"} <= keys
    assert "***" in rendered
    for secret in (short_token, "hq-file-password", "inline-typo-password", "12345678"):
        assert secret not in rendered
        assert secret not in repr(info.value.issues)
        assert secret not in caplog.text


def test_api_token_too_short_masks_the_token(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    [issue] = issues_of(path, env={"API_TOKEN": "short-token"})
    assert issue.key_path == "api"
    assert issue.value_repr == "{'token': ***}"
    assert "short-token" not in str(issue)


# --- paths, hash, schema, demo


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(
        conf_dir,
        MINIMAL
        + "data_dir: ../var/data\nstock:\n  initial_csv: stock.csv\n"
        + "store_broker:\n  tls: {ca_file: tls/ca.pem, cert_file: /abs/c.pem, key_file: tls/k.pem}\n",
    )
    cfg = load_config(path, env={"API_TOKEN": TOKEN})
    assert cfg.data_dir == tmp_path / "var" / "data"
    assert cfg.stock.initial_csv == conf_dir / "stock.csv"
    assert cfg.store_broker.tls is not None
    assert cfg.store_broker.tls.ca_file == conf_dir / "tls" / "ca.pem"
    assert cfg.store_broker.tls.cert_file == Path("/abs/c.pem")
    assert cfg.store_broker.tls.key_file == conf_dir / "tls" / "k.pem"


def test_config_hash_is_stable_and_ignores_secret_values(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    first = load_config(path, env={"API_TOKEN": TOKEN})
    other_token = load_config(path, env={"API_TOKEN": "another-token-value-42"})
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash(first))
    assert config_hash(first) == config_hash(load_config(path, env={"API_TOKEN": TOKEN}))
    assert config_hash(first) == config_hash(other_token)
    changed = load_config(write(tmp_path, MINIMAL.replace("hk-001", "hk-002")), env={"API_TOKEN": TOKEN})
    assert config_hash(first) != config_hash(changed)


def test_demo_config() -> None:
    cfg = demo_config(Path("/tmp/demo-data"), 18831, 18832, 18080, "demo-token-0123456789")
    assert isinstance(cfg, GatewayConfig)
    assert (cfg.gateway_id, cfg.store.id, cfg.store.name, cfg.store.timezone) == (
        "gw-demo",
        "demo-001",
        "Demo Store",
        "Asia/Hong_Kong",
    )
    assert cfg.store.location is not None
    assert 22.1 < cfg.store.location.latitude < 22.6
    assert 113.8 < cfg.store.location.longitude < 114.5
    for broker, port in ((cfg.store_broker, 18831), (cfg.hq, 18832)):
        assert (broker.host, broker.port, broker.protocol) == ("127.0.0.1", port, "3.1.1")
    [driver] = cfg.drivers
    assert [(r.pattern, r.kind) for r in driver.routes] == [
        ("store/pos/{device_id}/sale", "pos.sale"),
        ("store/pos/{device_id}/return", "pos.return"),
    ]
    assert [(d.id, d.profile) for d in cfg.devices] == [(f"pos-0{n}", "pos_terminal") for n in (1, 2, 3)]
    assert [i.sku for i in cfg.stock.items] == [f"SKU-{n:04d}" for n in range(1, 21)]
    assert {(i.on_hand, i.safety_stock) for i in cfg.stock.items} == {(200, 20), (26, 20)}  # 3 SKUs start low
    assert cfg.api.port == 18080
    assert cfg.data_dir == Path("/tmp/demo-data")
    assert "demo-token-0123456789" not in repr(cfg)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _undocumented_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    found = set()
    for name, field in model.model_fields.items():
        if not field.description:
            found.add(f"{prefix}{name}")
        for sub in _models_in(field.annotation):
            found |= _undocumented_fields(sub, f"{sub.__name__}.")
    return found


def test_json_schema_has_descriptions() -> None:
    schema = json_schema()
    assert schema["properties"]["gateway_id"]["description"].startswith("This box's id")
    defs = schema["$defs"]
    assert "IANA timezone" in defs["StoreConfig"]["properties"]["timezone"]["description"]
    assert defs["HqConfig"]["properties"]["port"]["description"]
    assert defs["TopicRoute"]["properties"]["pattern"]["description"]
    # Secret fields accept {env: NAME} / {file: PATH} in editors too.
    assert '"#/$defs/SecretRef"' in repr(schema["$defs"]["ApiConfig"]).replace("'", '"')
    assert _undocumented_fields(GatewayConfig) == set()


# --- robustness

_FRAGMENTS = [
    "gateway_id", "store", "hq", "port", "drivers", "api", "token", "env", "file", "{env: X}", "{file: s}",
    "a", ":", ": ", " ", "  ", "\n", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "!!set ",
    "!!omap ", "!t ", "<<: ", "? ", "'", '"', "#", "|", ">", "%YAML 1.1\n", "---\n", "...", "\t", "0x1F",
    ".nan", "null", "true", "2020-01-01", "70000", "\\", "@", "`", "\x00", "\ufeff", "é", "\r", "=", "~",
    "-1", "&", "*",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200).map(str.encode),
        st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map(lambda parts: "".join(parts).encode()),
        st.binary(max_size=100),
    )
)
def test_random_yaml_never_raises_anything_but_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(data)
    try:
        load_config(path, env={"X": "fuzz-secret-value"})
    except ConfigError as exc:
        error = exc
    else:
        return
    assert error.issues
    assert "fuzz-secret-value" not in str(error)


def test_a_device_id_used_by_two_drivers_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + "drivers:\n"
        + '  - {type: ble, devices: [{id: pos-01, mac: "A4:C1:38:00:00:01", profile: bthome-v2}]}\n'
        + "devices:\n  - {id: pos-01, profile: pos-terminal}\n",
    )
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert "duplicate id(s) pos-01" in issue.message


def test_a_serial_port_opened_by_two_drivers_is_refused(tmp_path: Path) -> None:
    port = "/dev/serial/by-id/usb-FTDI-if00-port0"
    path = write(
        tmp_path,
        MINIMAL
        + "drivers:\n"
        + f"  - {{type: modbus, transport: rtu, serial_port: {port},\n"
        + "     devices: [{id: f1, unit: 1, profile: dixell-xr}]}\n"
        + f"  - {{type: serial, devices: [{{id: rfid-1, port: {port}, profile: chafon-cf-ru5102}}]}}\n",
    )
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert f"duplicate id(s) {port}" in issue.message


# --- serial devices: 'id' like every other device list; 'device_id' still read, with a warning

SERIAL = """\
drivers:
  - type: serial
    devices:
      - id: rfid-1
        port: /dev/serial/by-id/usb-a
        profile: chafon-cf-ru5102
"""


def test_serial_devices_take_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + SERIAL), env={"API_TOKEN": TOKEN})
    [driver] = cfg.drivers
    assert isinstance(driver, SerialDriverConfig)
    assert [d.id for d in driver.devices] == ["rfid-1"]
    assert "rfid-1" in cfg.device_ids()
    assert "deprecated" not in caplog.text


def test_serial_device_id_still_works_with_a_warning_naming_its_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, MINIMAL + SERIAL.replace("- id: rfid-1", "- device_id: rfid-1"))
    with caplog.at_level(logging.WARNING, logger="gateway.config_loader"):
        cfg = load_config(path, env={"API_TOKEN": TOKEN})
    [driver] = cfg.drivers
    assert isinstance(driver, SerialDriverConfig)
    assert [d.id for d in driver.devices] == ["rfid-1"]
    [record] = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert record.levelno == logging.WARNING
    line = line_of(path, "device_id: rfid-1")
    assert record.getMessage() == (
        f"{path}:{line}:9: drivers[0].devices[0].device_id: 'device_id' is deprecated: rename it to 'id'"
    )


def test_serial_id_and_device_id_together_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + SERIAL + "        device_id: rfid-2\n")
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert (issue.key_path, issue.line) == ("drivers[0].devices[0].device_id", line_of(path, "device_id"))
    assert issue.message == "'device_id' is the old name of 'id', which is given too"
    assert issue.hint == "keep only 'id'"


def test_an_invalid_old_device_id_is_reported_under_its_own_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + SERIAL.replace("- id: rfid-1", "- device_id: rfid 1"))
    [issue] = issues_of(path, env={"API_TOKEN": TOKEN})
    assert (issue.key_path, issue.line) == ("drivers[0].devices[0].device_id", line_of(path, "device_id"))
    assert issue.value_repr == "'rfid 1'"


def test_serial_configs_built_in_code_take_both_spellings(caplog: pytest.LogCaptureFixture) -> None:
    device = {"port": "/dev/serial/by-id/usb-a", "profile": "barcode-scanner-line"}
    new = SerialDriverConfig.model_validate({"devices": [{"id": "scanner-1", **device}]})
    assert "deprecated" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="drivers.serial.config"):
        old = SerialDriverConfig.model_validate({"devices": [{"device_id": "scanner-1", **device}]})
    assert old == new
    assert "serial device 'scanner-1': 'device_id' is deprecated: rename it to 'id'" in caplog.text
    with pytest.raises(ValidationError, match="'device_id' is the old name of 'id', which is given too"):
        SerialDriverConfig.model_validate({"devices": [{"id": "a", "device_id": "b", **device}]})


def test_serial_devices_must_have_unique_ids(tmp_path: Path) -> None:
    second = "      - {id: rfid-1, port: /dev/serial/by-id/usb-b, profile: chafon-cf-ru5102}\n"
    [issue] = issues_of(write(tmp_path, MINIMAL + SERIAL + second), env={"API_TOKEN": TOKEN})
    assert "each id once: rfid-1 repeated" in issue.message


# --- hq.command_keys (docs/OUTBOX.md, "Signed commands")


def test_command_keys_take_every_form_and_bad_ones_are_reported_at_once(tmp_path: Path) -> None:
    pem = tmp_path / "hq-b.pub"
    pem.write_text(
        "-----BEGIN PUBLIC KEY-----\n"
        "MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n"
        "-----END PUBLIC KEY-----\n"
    )
    good = MINIMAL.replace(
        "  host: hq.example.com\n",
        "  host: hq.example.com\n  command_keys:\n"
        "    - {id: hq-a, public_key: 11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=}\n"
        "    - {id: hq-b, public_key: {file: hq-b.pub}}\n",
    )
    cfg = load_config(write(tmp_path, good), env={"API_TOKEN": TOKEN})
    assert [k.id for k in cfg.hq.command_keys] == ["hq-a", "hq-b"]
    bad = MINIMAL.replace(
        "  host: hq.example.com\n",
        "  host: hq.example.com\n  command_keys:\n"
        "    - {id: hq-a, public_key: not-a-key}\n"
        "    - {id: hq-b, public_key: {file: missing.pub}}\n",
    ).replace("id: hk-001", "id: hk/001")
    path = write(tmp_path, bad, "bad.yaml")
    issues = by_key(issues_of(path, env={"API_TOKEN": TOKEN}))
    assert {"store.id", "hq.command_keys[0].public_key", "hq.command_keys[1].public_key"} <= set(issues)
    key = issues["hq.command_keys[0].public_key"]
    assert key.line == line_of(path, "not-a-key")
    assert "not an Ed25519 public key" in key.message
    assert "openssl pkey" in str(key)
