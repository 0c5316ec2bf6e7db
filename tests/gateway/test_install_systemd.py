"""docker/install-systemd.sh, run for real into a scratch root (``STORE_GATEWAY_ROOT``): the venv with the gateway,
the config with its secrets read from systemd's credentials, the generated secrets, the unit and journald's
limits; run again, it upgrades and keeps the store's config and secrets. The unit asks for ``Type=notify`` and a
watchdog, which the gateway serves (tests/gateway/test_systemd_notify.py)."""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "install-systemd.sh"


def install(into: Path) -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "STORE_GATEWAY_ROOT": str(into)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_the_install_script_installs_and_an_upgrade_keeps_the_stores_settings(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = install(root)
    etc = root / "etc" / "store-gateway"
    version = subprocess.run(
        [str(root / "opt/store-gateway/bin/store-gateway"), "version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("store-gateway ")
    [site] = (root / "opt/store-gateway/lib").glob("python3*/site-packages")
    for package in ("gateway", "rules", "drivers", "cloud_bridge"):
        installed = {p.relative_to(site) for p in (site / package).rglob("*.py")}
        assert installed == {p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py")}, (
            "only the checkout's modules"
        )

    config = (etc / "store.yaml").read_text()
    assert "{env:" not in config, "no secret from the environment"
    assert "{file: /run/credentials/store-gateway.service/hq_mqtt_password}" in config
    assert "key_file: /run/credentials/store-gateway.service/gateway_tls_key" in config
    assert mode(etc / "store.yaml") == 0o640
    assert mode(etc / "secrets") == 0o700
    for name in ("store_mqtt_password", "gateway_api_token"):
        assert mode(etc / "secrets" / name) == 0o600
        assert len((etc / "secrets" / name).read_text().strip()) >= 32
    assert "hq_mqtt_password" in out, "the secrets left to make are named"

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(root / "etc/systemd/system/store-gateway.service")
    assert unit["Service"]["Type"] == "notify"
    assert int(unit["Service"]["WatchdogSec"]) > 0
    journald = configparser.ConfigParser(interpolation=None)
    journald.read(root / "etc/systemd/journald.conf.d/store-gateway.conf")
    assert journald["Journal"]["SystemMaxUse"]
    assert journald["Journal"]["SystemKeepFree"]

    # Run again (an upgrade): the store's config and secrets stay as they are.
    (etc / "store.yaml").write_text(config.replace("gateway_id:", "# edited\ngateway_id:", 1))
    token = (etc / "secrets" / "gateway_api_token").read_text()
    install(root)
    assert "# edited" in (etc / "store.yaml").read_text()
    assert (etc / "secrets" / "gateway_api_token").read_text() == token
