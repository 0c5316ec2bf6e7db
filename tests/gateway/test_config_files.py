"""The files a config names (TLS CA, certificate and key; the stock CSV): check-config and run say which file
is missing, unreadable, not PEM, or a key that does not match its certificate, at the line of the key.

Real files made here (a CA, a certificate and keys from ``cryptography``), real subprocesses of the installed
console script where the exit code matters; nothing depends on the clock (certificates are valid 2000-2100).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config_loader import (
    ConfigError,
    ConfigIssue,
    check_config,
    load_config,
    stock_csv_problems,
    tls_file_problems,
)
from gateway.kernel.config import BrokerConfig, TlsConfig
from gateway.kernel.mqtt_client import TlsFilesError, tls_context
from tests.harness.pki import write_pki

SCRIPT = str(Path(sysconfig.get_path("scripts")) / "store-gateway")
"""The console script installed with this interpreter (not whichever one is first on PATH)."""
TOKEN = "api-token-0123456789abcdef"
ENV = {"API_TOKEN": TOKEN}
NOBODY = 65534

CONFIG = """\
gateway_id: gw-01
store:
  id: hk-001
  name: Test Store
hq:
  host: hq.example.com
  tls:
    ca_file: tls/ca.pem
    cert_file: tls/gateway.crt
    key_file: tls/gateway.key
api:
  token: {env: API_TOKEN}
"""
CA_LINE, CERT_LINE, KEY_LINE = 8, 9, 10
"""The lines of ca_file, cert_file and key_file in CONFIG."""


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A config whose hq.tls names tls/ca.pem, tls/gateway.crt and tls/gateway.key, all good."""
    pki = write_pki(tmp_path / "tls")
    config = tmp_path / "store.yaml"
    config.write_text(CONFIG)
    return config, pki


def issues_of(path: Path) -> dict[str, ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV, check_files=True)
    keyed = {issue.key_path: issue for issue in info.value.issues}
    assert len(keyed) == len(info.value.issues), info.value.issues
    return keyed


def run_cli(*args: str, cwd: Path | None = None, user: int | None = None) -> subprocess.CompletedProcess[str]:
    command = [SCRIPT, *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ENV},
        cwd=cwd,
        timeout=60,
        check=False,
    )


# --- good files


def test_good_tls_files_pass_and_load(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    cfg = load_config(config, env=ENV, check_files=True)
    assert cfg.hq.tls is not None
    assert cfg.hq.tls.key_file == pki["key"]
    assert tls_context(cfg.hq) is not None
    code, text = check_config(config, env=ENV)
    assert code == 0, text
    assert text.startswith(f"OK: {config}: ")


# --- each problem, at the line of its key


def test_missing_tls_files_are_each_reported_at_their_line(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    for name in ("ca", "cert", "key"):
        pki[name].unlink()
    issues = issues_of(config)
    assert set(issues) == {"hq.tls.ca_file", "hq.tls.cert_file", "hq.tls.key_file"}
    for key, line, path in (
        ("ca_file", CA_LINE, pki["ca"]),
        ("cert_file", CERT_LINE, pki["cert"]),
        ("key_file", KEY_LINE, pki["key"]),
    ):
        issue = issues[f"hq.tls.{key}"]
        assert (issue.file, issue.line, issue.column) == (str(config), line, 5)
        assert issue.message == f"{path}: missing"
        assert (
            issue.hint
            == f"check the path; relative paths in the config are relative to its folder, {config.parent}"
        )
    assert str(issues["hq.tls.ca_file"]) == (
        f"{config}:{CA_LINE}:5: hq.tls.ca_file: {pki['ca']}: missing (hint: check the path; relative paths in "
        f"the config are relative to its folder, {config.parent})"
    )


@pytest.mark.parametrize(
    ("key", "line", "replacement", "message", "hint"),
    [
        pytest.param(
            "ca_file",
            CA_LINE,
            "junk",
            "{path}: not PEM: no CA certificate in it",
            "ca_file is the CA",
            id="ca-junk",
        ),
        pytest.param(
            "ca_file",
            CA_LINE,
            "cert_der",
            "{path}: not PEM: binary DER",
            "convert it: openssl x509",
            id="ca-der",
        ),
        pytest.param(
            "cert_file",
            CERT_LINE,
            "key",
            "{path}: not PEM: a private key, no certificate",
            "cert_file and key_file swapped?",
            id="cert-is-a-key",
        ),
        pytest.param(
            "key_file",
            KEY_LINE,
            "cert",
            "{path}: not PEM: a certificate, no private key",
            "cert_file and key_file swapped?",
            id="key-is-a-cert",
        ),
        pytest.param(
            "key_file",
            KEY_LINE,
            "junk",
            "{path}: not PEM: no private key in it",
            "key_file is this gateway's private key",
            id="key-junk",
        ),
        pytest.param(
            "key_file",
            KEY_LINE,
            "encrypted_key",
            "{path}: encrypted with a passphrase, which the gateway cannot give",
            "write it decrypted",
            id="key-encrypted",
        ),
        pytest.param(
            "key_file",
            KEY_LINE,
            "other_key",
            "{path}: the key does not match the certificate {cert}",
            "cert_file and key_file must be a pair",
            id="key-mismatch",
        ),
    ],
)
def test_bad_tls_files_are_classified(
    store: tuple[Path, dict[str, Path]], key: str, line: int, replacement: str, message: str, hint: str
) -> None:
    config, pki = store
    target = {"ca_file": pki["ca"], "cert_file": pki["cert"], "key_file": pki["key"]}[key]
    if replacement == "junk":
        target.write_text("this is not a certificate\n")
    else:
        shutil.copyfile(pki[replacement], target)
    [issue] = issues_of(config).values()
    assert (issue.key_path, issue.line) == (f"hq.tls.{key}", line)
    assert issue.message == message.format(path=target, cert=pki["cert"])
    assert issue.hint is not None
    assert issue.hint.startswith(hint), issue.hint


def test_a_folder_where_a_file_should_be(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    pki["ca"].unlink()
    pki["ca"].mkdir()
    [issue] = issues_of(config).values()
    assert (issue.key_path, issue.message) == ("hq.tls.ca_file", f"{pki['ca']}: a folder, not a file")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to its user)."""
    with tempfile.TemporaryDirectory(prefix="store-gateway-test-") as name:
        folder = Path(name)
        folder.chmod(0o755)
        yield folder


def test_an_unreadable_key_is_reported_by_check_config(shared_dir: Path) -> None:
    """As root, check-config runs as 'nobody' (root reads everything); otherwise as this user."""
    pki = write_pki(shared_dir / "tls")
    config = shared_dir / "store.yaml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    pki["key"].chmod(0o600 if os.geteuid() == 0 else 0)
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    result = run_cli("check-config", str(config), user=NOBODY if os.geteuid() == 0 else None)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"{config}:{KEY_LINE}:5: hq.tls.key_file: {pki['key']}: unreadable (Permission denied) (hint: the "
        "gateway's user must be able to read it (and to enter its folders))",
        f"1 problem(s) in {config}",
    ]


def test_every_file_problem_is_reported_with_the_other_errors(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    config.write_text(CONFIG.replace("host: hq.example.com", "host: hq.example.com\n  port: 70000"))
    pki["ca"].unlink()
    shutil.copyfile(pki["other_key"], pki["key"])
    issues = issues_of(config)
    assert set(issues) == {"hq.port", "hq.tls.ca_file", "hq.tls.key_file"}
    assert [i.line for i in issues.values()] == sorted(i.line or 0 for i in issues.values())


def test_files_are_checked_on_the_store_broker_too(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    config.write_text(CONFIG + "store_broker:\n  tls: {ca_file: tls/nope.pem}\n")
    [issue] = issues_of(config).values()
    assert (issue.key_path, issue.line, issue.message) == (
        "store_broker.tls.ca_file",
        14,
        f"{pki['ca'].parent / 'nope.pem'}: missing",
    )


def test_load_config_checks_files_only_when_asked(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    pki["ca"].unlink()
    assert load_config(config, env=ENV).hq.tls is not None  # tests and tools build configs for other boxes


# --- the stock CSV


def test_the_stock_csv_must_exist_and_parse(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        CONFIG.split("  tls:")[0] + "api:\n  token: {env: API_TOKEN}\nstock:\n  initial_csv: stock.csv\n"
    )
    csv = tmp_path / "stock.csv"
    [issue] = issues_of(config).values()
    assert (issue.key_path, issue.line, issue.message) == ("stock.initial_csv", 10, f"{csv}: missing")
    csv.write_text("sku,on_hand\nTEA,24\nRICE,lots\n")
    [issue] = issues_of(config).values()
    assert issue.message.startswith(
        f"{csv}: not a valid stock CSV: line 3: expected sku,on_hand[,safety_stock]"
    )
    csv.write_text("sku,on_hand,safety_stock\nTEA,24,6\n")
    assert load_config(config, env=ENV, check_files=True).stock.initial_csv == csv
    assert stock_csv_problems(csv) == []


# --- one function for check-config, run and tls_context


def test_tls_file_problems_is_empty_for_good_files(tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    assert tls_file_problems(pki["ca"], pki["cert"], pki["key"]) == []
    assert tls_file_problems(pki["ca"], None, None) == []
    assert tls_file_problems(None, None, None) == []


def test_tls_context_names_the_file_and_the_reason(tmp_path: Path) -> None:
    pki = write_pki(tmp_path)
    missing = BrokerConfig(tls=TlsConfig(ca_file=tmp_path / "nope.pem"))
    with pytest.raises(TlsFilesError) as info:
        tls_context(missing)
    assert str(info.value).startswith(f"ca_file: {tmp_path / 'nope.pem'}: missing")
    assert isinstance(info.value, OSError)  # what the MQTT supervisors already catch
    swapped = BrokerConfig(tls=TlsConfig(ca_file=pki["ca"], cert_file=pki["cert"], key_file=pki["other_key"]))
    with pytest.raises(TlsFilesError) as info:
        tls_context(swapped)
    assert str(info.value).startswith(
        f"key_file: {pki['other_key']}: the key does not match the certificate {pki['cert']}"
    )
    encrypted = BrokerConfig(tls=TlsConfig(cert_file=pki["cert"], key_file=pki["encrypted_key"]))
    with pytest.raises(TlsFilesError, match="encrypted with a passphrase"):
        tls_context(encrypted)  # refused, never an interactive passphrase prompt


def test_run_refuses_bad_tls_files_naming_each_file(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    pki["ca"].write_text("not PEM\n")
    shutil.copyfile(pki["other_key"], pki["key"])
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-3:] == [
        f"{config}:{CA_LINE}:5: hq.tls.ca_file: {pki['ca']}: not PEM: no CA certificate in it (hint: ca_file is "
        "the CA certificate(s) that signed the broker's certificate (-----BEGIN CERTIFICATE-----))",
        f"{config}:{KEY_LINE}:5: hq.tls.key_file: {pki['key']}: the key does not match the certificate "
        f"{pki['cert']} (hint: cert_file and key_file must be a pair: the key the certificate was issued for)",
        f"store-gateway: 2 problem(s) in {config}: not started",
    ]
    assert "Traceback" not in result.stderr


def test_check_config_reports_the_same_as_run(store: tuple[Path, dict[str, Path]]) -> None:
    config, pki = store
    pki["cert"].unlink()
    checked = run_cli("check-config", str(config))
    ran = run_cli("run", "--config", str(config))
    assert (checked.returncode, ran.returncode) == (1, 1)
    problem = f"{config}:{CERT_LINE}:5: hq.tls.cert_file: {pki['cert']}: missing"
    assert checked.stdout.splitlines()[0].startswith(problem)
    assert ran.stderr.splitlines()[0] == checked.stdout.splitlines()[0]
