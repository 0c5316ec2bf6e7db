"""The console script as a user runs it: real subprocesses of the installed ``store-gateway``, real files."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import subprocess
import sysconfig
from pathlib import Path

import pytest

import gateway
from tests.gateway.test_config import EXAMPLE, MINIMAL, REPO
from tests.harness.pki import write_pki
from tests.security.test_broker_accounts import STORE_CONFIG

SCRIPT = str(Path(sysconfig.get_path("scripts")) / "store-gateway")
"""The console script installed with this interpreter (not whichever one is first on PATH)."""
ENV_REF = re.compile(r"\{env: ([A-Z0-9_]+)\}")


def example_secret_names() -> list[str]:
    return ENV_REF.findall(EXAMPLE.read_text())


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``store-gateway ARGS`` with no secret in its environment but ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in example_secret_names() and k != "API_TOKEN"}
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        env=base | (env or {}),
        cwd=cwd,
        timeout=60,
        check=False,
    )


# --- version and help


def test_version_flag_and_subcommand() -> None:
    for args in (["--version"], ["version"]):
        result = cli(*args)
        assert (result.returncode, result.stdout, result.stderr) == (
            0,
            f"store-gateway {gateway.__version__}\n",
            "",
        )


def test_bare_command_prints_the_help_and_succeeds() -> None:
    result = cli()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: store-gateway ")
    for command in ("run", "check-config", "config-schema", "demo", "version", "hq-receiver", "simulate"):
        assert f"\n    {command}" in result.stdout, command
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        ("run", ["Run the gateway with one config file", "exit codes:", "store-gateway run --config "]),
        (
            "check-config",
            ["Check a config file without starting anything", "exit codes:", "--no-secrets", "1  not valid"],
        ),
        ("config-schema", ["JSON Schema", "exit codes:", "store-gateway config-schema > "]),
        (
            "demo",
            ["simulated store", "exit codes:", "--verbose", "as a line stream instead of the live view"],
        ),
        ("version", ["store-gateway --version", "exit codes:"]),
    ],
)
def test_each_command_has_a_description(command: str, fragments: list[str]) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps option help
    for fragment in fragments:
        assert " ".join(fragment.split()) in text, (fragment, result.stdout)


def test_a_usage_error_exits_2() -> None:
    result = cli("check-config")
    assert result.returncode == 2
    assert "the following arguments are required: file" in result.stderr


def test_export_reads_times_with_offsets_and_refuses_what_is_not_a_time(tmp_path: Path) -> None:
    from gateway.cli import _utc_time

    assert _utc_time("2026-11-01") == "2026-11-01T00:00:00.000Z"
    assert _utc_time("2026-11-01T08:00+08:00") == "2026-11-01T00:00:00.000Z"  # as recorded_at is written
    result = cli("export", "--config", str(tmp_path / "store.yaml"), "--since", "last tuesday")
    assert result.returncode == 2
    assert "not an ISO 8601 time: 'last tuesday'" in result.stderr


# --- check-config --no-secrets


def test_check_config_of_the_example_without_its_secrets_fails() -> None:
    result = cli("check-config", str(EXAMPLE))
    assert result.returncode == 1, result.stdout
    for name in example_secret_names():
        assert f"environment variable {name} is not set" in result.stdout


def test_check_config_no_secrets_accepts_the_example() -> None:
    result = cli("check-config", "--no-secrets", "firmware_configs/store-example.yaml", cwd=REPO)
    assert result.returncode == 0, result.stdout
    [line] = result.stdout.splitlines()
    assert line.startswith("OK: firmware_configs/store-example.yaml: gateway gw-hk-cwb-012-a, ")
    secrets = len(example_secret_names())
    assert secrets == 7
    assert re.search(rf"; --no-secrets: {secrets} secret\(s\)( and \d TLS file\(s\))? not checked$", line), (
        line
    )


def test_no_secrets_still_checks_everything_else(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        MINIMAL.replace(
            "  host: hq.example.com\n", "  host: hq.example.com\n  password: {file: secrets/hq}\n"
        )
        + "drivers:\n"
        + '  - {type: ble, devices: [{id: pos-01, mac: "A4:C1:38:00:00:01", profile: bthome-v2}]}\n'
        + "devices:\n  - {id: pos-01, profile: pos-terminal}\n"
    )
    result = cli("check-config", "--no-secrets", str(config))
    assert result.returncode == 1, result.stdout
    assert "duplicate id(s) pos-01" in result.stdout
    assert "API_TOKEN" not in result.stdout
    assert "secrets/hq" not in result.stdout
    assert result.stdout.splitlines()[-1] == f"1 problem(s) in {config}"


def test_no_secrets_counts_what_it_did_not_check(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        MINIMAL.replace(
            "  host: hq.example.com\n", "  host: hq.example.com\n  password: {file: secrets/hq}\n"
        )
    )
    result = cli("check-config", "--no-secrets", str(config))
    assert result.returncode == 0, result.stdout
    assert result.stdout.rstrip().endswith("; --no-secrets: 2 secret(s) not checked")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hq").write_text("hq-password\n")
    result = cli("check-config", "--no-secrets", str(config), env={"API_TOKEN": "api-token-0123456789abcdef"})
    assert result.returncode == 0, result.stdout
    assert result.stdout.rstrip().endswith("; --no-secrets: 0 secret(s) not checked")


def test_no_secrets_still_reports_secrets_and_files_that_are_there_but_wrong(tmp_path: Path) -> None:
    pki = write_pki(tmp_path / "tls")
    pki["cert"].write_text("not a certificate\n")
    pki["key"].unlink()  # absent: not checked, like a secret
    config = tmp_path / "store.yaml"
    config.write_text(
        MINIMAL.replace(
            "  host: hq.example.com\n",
            "  host: hq.example.com\n"
            "  tls: {ca_file: tls/ca.pem, cert_file: tls/gateway.crt, key_file: tls/gateway.key}\n",
        )
    )
    result = cli("check-config", "--no-secrets", str(config), env={"API_TOKEN": "short"})
    assert result.returncode == 1, result.stdout
    problems = result.stdout.splitlines()[:-1]
    assert [p.split(": ")[1] for p in problems] == ["hq.tls.cert_file", "api"]
    assert f"{pki['cert']}: not PEM: no certificate in it" in problems[0]
    assert "api.token is required (16+ characters)" in problems[1]
    assert "short" not in result.stdout


def test_without_no_secrets_a_missing_tls_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        MINIMAL.replace("  host: hq.example.com\n", "  host: hq.example.com\n  tls: {ca_file: ca.pem}\n")
    )
    result = cli("check-config", str(config), env={"API_TOKEN": "api-token-0123456789abcdef"})
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[0].startswith(
        f"{config}:7:9: hq.tls.ca_file: {tmp_path / 'ca.pem'}: missing"
    )
    result = cli("check-config", "--no-secrets", str(config), env={"API_TOKEN": "api-token-0123456789abcdef"})
    assert result.returncode == 0, result.stdout
    assert result.stdout.rstrip().endswith("; --no-secrets: 0 secret(s) and 1 TLS file(s) not checked")


# --- the config file itself


def test_a_missing_config_file_names_the_current_directory(tmp_path: Path) -> None:
    result = cli("check-config", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "nope.yaml: cannot read the config file: No such file or directory "
        f"(hint: check the path; it is relative to the current directory {tmp_path})",
        "1 problem(s) in nope.yaml",
    ]
    result = cli("run", "--config", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert f"it is relative to the current directory {tmp_path}" in result.stderr


def test_a_missing_config_file_given_by_absolute_path(tmp_path: Path) -> None:
    result = cli("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"{tmp_path / 'nope.yaml'}: cannot read the config file: No such file or directory (hint: check the path)"
    )


def test_a_missing_secret_file_is_still_relative_to_the_config_folder(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(MINIMAL.replace("{env: API_TOKEN}", "{file: token}"))
    result = cli("check-config", str(config), cwd=REPO)
    assert result.returncode == 1
    assert "relative paths are relative to the config file's folder" in result.stdout


# --- serial devices: id, and the old device_id


def test_check_config_warns_about_device_id_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        MINIMAL
        + "drivers:\n"
        + "  - type: serial\n"
        + "    devices:\n"
        + "      - {device_id: rfid-1, port: /dev/serial/by-id/usb-a, profile: chafon-cf-ru5102}\n"
        + "      - {id: scanner-1, port: /dev/serial/by-id/usb-b, profile: barcode-scanner-line}\n"
    )
    result = cli("check-config", str(config), env={"API_TOKEN": "api-token-0123456789abcdef"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK: {config}: ")
    assert result.stderr.splitlines() == [
        f"{config}:12:10: drivers[0].devices[0].device_id: 'device_id' is deprecated: rename it to 'id'"
    ]


@pytest.mark.parametrize("rate", ["0", "-1", "nan", "inf", "101", "abc"])
def test_the_demo_refuses_a_till_rate_it_cannot_play(rate: str) -> None:
    result = cli("demo", "--rate", rate, "--duration", "1")
    assert result.returncode == 2
    assert "argument --rate" in result.stderr


# --- broker provision

ACCOUNTS = ["gateway", "pos-01", "pos-02", "kiosk-staff", "fridge-01"]
"""The store broker's users for STORE_CONFIG: the gateway's (store_broker.username), then its MQTT devices."""


def store_config(folder: Path, text: str = STORE_CONFIG) -> Path:
    path = folder / "store.yaml"
    path.write_text(text)
    return path


def provision_cli(
    config: Path, out: Path, *options: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run ``broker provision``; the new passwords it printed, by account."""
    result = cli("broker", "provision", "--config", str(config), "--out", str(out), *options)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = dict(re.findall(r"^  (\S+) +(\S+)", result.stdout, re.MULTILINE))
    return result, printed


def passwd_entries(out: Path) -> dict[str, str]:
    return dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())


def matches(hashed: str, password: str) -> bool:
    """mosquitto's $7$ check: PBKDF2-SHA512 of the password with the salt, as the broker does it."""
    _, seven, rounds, salt, digest = hashed.split("$")
    computed = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(rounds), 64)
    return seven == "7" and base64.b64encode(computed).decode() == digest


def test_broker_provision_writes_one_account_per_mqtt_device(tmp_path: Path) -> None:
    out = tmp_path / "accounts"
    result, printed = provision_cli(store_config(tmp_path), out)
    assert list(printed) == ACCOUNTS  # Modbus, BLE, serial and webhook devices get none
    assert len(set(printed.values())) == len(printed)
    for password in printed.values():
        assert len(password) >= 32
        assert result.stdout.count(password) == 1, "each password is printed once"
        assert password not in result.stderr
    for name in ("passwd", "acl"):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    entries = passwd_entries(out)
    assert list(entries) == ACCOUNTS
    for user, password in printed.items():
        assert matches(entries[user], password), user
        assert password not in (out / "acl").read_text()
    acl = (out / "acl").read_text()
    assert "user pos-01\ntopic write store/pos/pos-01/sale\ntopic write store/pos/pos-01/return\n\n" in acl
    assert "user kiosk-staff\ntopic write store/kiosk/kiosk-staff/checkin\n\n" in acl
    assert acl.endswith("user fridge-01\ntopic write store/sensor/fridge-01/state\n")
    assert (
        "user gateway\n" + "".join(f"topic read {t}\n" for t in ("store/pos/+/sale", "store/pos/+/return"))
        in acl
    )
    assert "pattern" not in acl
    assert [line for line in acl.splitlines() if "#" in line and not line.startswith("#")] == []
    assert "chiller-01" not in acl


def test_broker_provision_again_keeps_passwords_rotates_on_request_and_drops_removed_devices(
    tmp_path: Path,
) -> None:
    out = tmp_path / "accounts"
    config = store_config(tmp_path)
    _, first = provision_cli(config, out)
    before = passwd_entries(out)
    result, printed = provision_cli(config, out)
    assert printed == {}
    assert passwd_entries(out) == before
    assert "Kept the passwords of: gateway, pos-01, " in result.stdout
    _, printed = provision_cli(config, out, "--rotate", "pos-02")
    assert list(printed) == ["pos-02"]
    assert printed["pos-02"] != first["pos-02"]
    after = passwd_entries(out)
    assert matches(after["pos-02"], printed["pos-02"])
    assert {u: h for u, h in after.items() if u != "pos-02"} == {
        u: h for u, h in before.items() if u != "pos-02"
    }
    # A till taken out of the config loses its account; one added gets a password.
    store_config(tmp_path, STORE_CONFIG.replace("{id: pos-01,", "{id: pos-04,"))
    result, printed = provision_cli(config, out)
    assert list(printed) == ["pos-04"]
    assert "Removed the accounts of: pos-01" in result.stdout
    assert "pos-01" not in (out / "passwd").read_text() + (out / "acl").read_text()
    assert (out / "passwd").stat().st_mode & 0o777 == 0o600


def test_broker_provision_sets_the_gateway_password_from_its_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "store_mqtt_password"
    secret.write_text("gateway-password-0123456789\n")
    out = tmp_path / "accounts"
    result, printed = provision_cli(store_config(tmp_path), out, "--gateway-password-file", str(secret))
    assert "gateway" not in printed
    assert "gateway-password-0123456789" not in result.stdout
    assert matches(passwd_entries(out)["gateway"], "gateway-password-0123456789")


def test_broker_provision_refuses_an_unknown_rotation_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "accounts"
    config = store_config(tmp_path)
    result = cli("broker", "provision", "--config", str(config), "--out", str(out), "--rotate", "chiller-01")
    assert result.returncode == 1
    assert "--rotate chiller-01: no such account" in result.stderr
    assert not (out / "passwd").exists()
    result = cli("broker", "provision", "--config", str(config))
    assert result.returncode == 2
    assert "--out" in result.stderr


def test_broker_provision_has_a_description() -> None:
    result = cli("broker", "provision", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for fragment in ("printed once", "exit codes:", "--rotate ID", "store-gateway broker provision --config"):
        assert fragment in text, fragment


# --- run


def test_run_says_in_one_line_why_it_cannot_start(tmp_path: Path) -> None:
    """The gateway's own start-up errors (here: the API's port is taken) are one line and exit 1, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "store.yaml"
        config.write_text(
            MINIMAL.replace(
                "  token: {env: API_TOKEN}\n", f"  token: {{env: API_TOKEN}}\n  port: {port}\n"
            ).replace("  host: hq.example.com\n", "  host: 127.0.0.1\n  port: 1\n")
            + f"data_dir: {tmp_path / 'data'}\n"
            + "store_broker: {host: 127.0.0.1, port: 1}\n"
        )
        result = cli("run", "--config", str(config), env={"API_TOKEN": "t" * 32})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("store-gateway: cannot start:")]
    assert str(port) in line
