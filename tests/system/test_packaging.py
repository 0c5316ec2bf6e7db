"""Packaging and deployment: the installed console script, the Docker image and compose files, the store
broker's mosquitto.conf, the systemd unit and the CI script.

There is no Docker engine here, so the Docker files are checked for what can be checked without one: every
file they name exists, the names they share with each other and with the config agree, and the image's
health check (the very snippet, with only the port changed) is run against a real gateway.
"""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from ruamel.yaml import YAML

import gateway
from gateway.config import GatewayConfig
from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.pki import write_pki

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
MOSQUITTO_CONF = DOCKER / "mosquitto" / "mosquitto.conf"
UNIT = DOCKER / "store-gateway.service"
CI_RUN = REPO / ".ci" / "run"
EXAMPLE = REPO / "firmware_configs" / "store-example.yaml"
SCRIPT = str(Path(sysconfig.get_path("scripts")) / "store-gateway")
"""The console script installed with this interpreter (not whichever one is first on PATH)."""

HEALTH_URL = "http://127.0.0.1:8080/health"
CONFIG_PATH = "/etc/store-gateway/store.yaml"
CREDENTIALS_DIR = "/run/credentials/store-gateway.service"
TLS_KEY_SECRET = "gateway_tls_key"
DEADLINE_S = 60.0


# --- helpers


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text())


def env_secret_names(node: Any) -> list[str]:
    """The NAME of every ``{env: NAME}`` secret reference in a loaded config, in file order."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return [str(node["env"])]
        return [name for value in node.values() for name in env_secret_names(value)]
    if isinstance(node, list):
        return [name for value in node for name in env_secret_names(value)]
    return []


def env_to_file_refs(node: Any, secrets_dir: str) -> Any:
    """The config with each ``{env: NAME}`` replaced by ``{file: <secrets_dir>/<lower-case name>}``."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {"file": f"{secrets_dir}/{str(node['env']).lower()}"}
        return {key: env_to_file_refs(value, secrets_dir) for key, value in node.items()}
    if isinstance(node, list):
        return [env_to_file_refs(value, secrets_dir) for value in node]
    return node


def example_secret_names() -> list[str]:
    """Secrets the deployment files must provide: the example's env names in lower case, and the TLS key."""
    return [name.lower() for name in env_secret_names(load_yaml(EXAMPLE))] + [TLS_KEY_SECRET]


def write_secrets(folder: Path) -> Path:
    """One file per secret, as compose's ``secrets/`` folder holds them (with the trailing newline)."""
    folder.mkdir()
    for name in example_secret_names():
        # A BLE bindkey is 16 bytes in hex; other secrets are free text.
        value = (
            "231d39c1d7cc1ab1aee224cd096db932" if name.endswith("_bindkey") else f"{name}-value-0123456789"
        )
        (folder / name).write_text(f"{value}\n")
    return folder


def tls_files(folder: Path) -> dict[str, Path]:
    """The TLS files the example names (tls/hq-ca.pem, tls/gateway.crt, tls/gateway.key), made for real."""
    pki = write_pki(folder)
    shutil.copy(pki["ca"], folder / "hq-ca.pem")
    return pki


def write_config(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2))  # JSON is YAML
    return path


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


def healthcheck_command() -> list[str]:
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    _, separator, command = healthcheck.partition("CMD ")
    assert separator, healthcheck
    parsed = json.loads(command)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def healthcheck_snippet() -> str:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], command
    return command[2]


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The image's health check, exactly, pointed at ``port`` instead of 8080."""
    snippet = healthcheck_snippet().replace(HEALTH_URL, f"http://127.0.0.1:{port}/health")
    return subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=30, check=False
    )


def poll(predicate: Callable[[], bool], what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text().splitlines()[-40:]) if log is not None else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


class UnitParser(configparser.ConfigParser):
    """systemd unit files: case-sensitive keys, repeated keys allowed (the last one wins here)."""

    def __init__(self) -> None:
        super().__init__(strict=False, interpolation=None)

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def unit_values(key: str) -> list[str]:
    """Every value of a key that may repeat (LoadCredential=, SystemCallFilter=)."""
    prefix = f"{key}="
    return [line[len(prefix) :] for line in UNIT.read_text().splitlines() if line.startswith(prefix)]


def without_secret_env() -> dict[str, str]:
    names = set(env_secret_names(load_yaml(EXAMPLE)))
    return {key: value for key, value in os.environ.items() if key not in names}


# --- the installed package


@pytest.mark.parametrize(
    "name", ["gateway", "drivers", "rules", "cloud_bridge", "simulators", "firmware_configs"]
)
def test_top_level_packages_are_this_repository(name: str) -> None:
    # Generic names such as 'rules' and 'drivers' are also packages on PyPI.
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().is_relative_to(REPO), module.__file__


def test_console_script_prints_the_version() -> None:
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not installed: pip install -e ."
    result = subprocess.run([SCRIPT, "version"], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == f"store-gateway {gateway.__version__}\n"


def test_config_schema_is_json() -> None:
    result = subprocess.run([SCRIPT, "config-schema"], capture_output=True, text=True, timeout=60, check=True)
    schema = json.loads(result.stdout)
    assert {"gateway_id", "store", "hq", "api", "data_dir"} <= set(schema["properties"])


def test_check_config_of_the_example_needs_its_secrets(tmp_path: Path) -> None:
    names = env_secret_names(load_yaml(EXAMPLE))
    assert names == [
        "STORE_MQTT_PASSWORD",
        "HQ_MQTT_PASSWORD",
        "CHILLER_PROBE_BINDKEY",
        "LIGHTSPEED_CLIENT_SECRET",
        "SQUARE_SIGNATURE_KEY",
        "WEB_SHOP_WEBHOOK_SECRET",
        "GATEWAY_API_TOKEN",
    ]
    # The example beside the TLS files it names (tls/ next to it), as a technician's copy would be.
    example = tmp_path / "store.yaml"
    shutil.copy(EXAMPLE, example)
    tls_files(tmp_path / "tls")
    command = [SCRIPT, "check-config", str(example)]
    env = without_secret_env()
    missing = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert missing.returncode == 1, missing.stdout
    for name in names:
        assert f"environment variable {name} is not set" in missing.stdout
    env |= {name: f"{name.lower()}-value-0123456789" for name in names}
    env["CHILLER_PROBE_BINDKEY"] = "231d39c1d7cc1ab1aee224cd096db932"
    ok = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.startswith(f"OK: {example}")


# --- the Docker image


def test_dockerfile_shape() -> None:
    assert [f.split()[0] for f in dockerfile_values("FROM")] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert dockerfile_values("ARG")[0].startswith("PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:")
    assert dockerfile_values("FROM")[0].endswith(" AS build")
    (user,) = dockerfile_values("USER")
    assert user not in ("root", "0")
    assert dockerfile_values("VOLUME") == [str(GatewayConfig.model_fields["data_dir"].default)]
    assert dockerfile_values("EXPOSE") == ["8080"]
    assert dockerfile_values("STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(v) for v in dockerfile_values("ENTRYPOINT")] == [["store-gateway"]]
    assert [json.loads(v) for v in dockerfile_values("CMD")] == [["run", "--config", CONFIG_PATH]]


def test_dockerfile_copies_only_files_that_exist_and_are_in_the_build_context() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources: list[str] = []
    for arguments in dockerfile_values("COPY"):
        words = shlex.split(arguments)
        if any(word.startswith("--from") for word in words):
            continue
        sources += [word for word in words[:-1] if not word.startswith("--")]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        parts = Path(source.rstrip("/")).parts
        within = {"/".join(parts[: n + 1]) for n in range(len(parts))}
        assert within & allowed, f".dockerignore leaves {source} out of the build context"


def test_healthcheck_snippet_is_python_for_the_health_url() -> None:
    snippet = healthcheck_snippet()
    compile(snippet, "<HEALTHCHECK>", "exec")
    assert HEALTH_URL in snippet
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    assert "--start-period=" in healthcheck
    assert "--timeout=" in healthcheck


# --- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def test_base_images_are_pinned_by_digest(compose: dict[str, Any]) -> None:
    """A tag can be pushed again upstream; a digest cannot. Every image the build or compose pulls is pinned."""
    digest = re.compile(r"^[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
    (base,) = [v.split("=", 1)[1] for v in dockerfile_values("ARG") if v.startswith("PYTHON_IMAGE=")]
    assert digest.match(base), base
    pulled = [s["image"] for s in compose["services"].values() if "build" not in s]
    assert pulled
    for image in pulled:
        assert digest.match(image), image


def is_broker(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("eclipse-mosquitto:")


def test_compose_services_are_healthchecked_and_log_little(compose: dict[str, Any]) -> None:
    services: dict[str, dict[str, Any]] = compose["services"]
    assert sum(map(is_broker, services.values())) == 1
    for name, service in services.items():
        assert is_broker(service) or "healthcheck" in service, f"service {name} has no healthcheck"
        assert service["restart"] == "unless-stopped", name
        assert service["stop_grace_period"] == "30s", name
        logging_ = service["logging"]
        assert logging_["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= set(logging_["options"]), name


def test_compose_gateway_matches_the_image(compose: dict[str, Any]) -> None:
    (gateway_service,) = [s for s in compose["services"].values() if not is_broker(s)]
    assert gateway_service["healthcheck"]["test"] == ["CMD", *healthcheck_command()]
    build = gateway_service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert gateway_service["init"] is True
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway_service["volumes"]}
    assert str(Path(CONFIG_PATH).parent) in mounts
    assert mounts[dockerfile_values("VOLUME")[0]] in compose["volumes"]


def test_compose_volumes_and_secrets_are_declared(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    declared_secrets: dict[str, dict[str, str]] = compose.get("secrets") or {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                continue
            assert source in declared_volumes, f"{name}: volume {source} is not declared"
            assert target.startswith("/")
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in declared_secrets, f"{name}: secret {secret_name} is not declared"
    for name, secret in declared_secrets.items():
        assert secret["file"] == f"./secrets/{name}"


def test_compose_provides_every_secret_the_config_uses(compose: dict[str, Any]) -> None:
    (gateway_service,) = [s for s in compose["services"].values() if not is_broker(s)]
    assert gateway_service["secrets"] == example_secret_names()


def test_compose_broker_uses_the_shipped_mosquitto_conf(compose: dict[str, Any]) -> None:
    (broker,) = [s for s in compose["services"].values() if is_broker(s)]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
    assert (COMPOSE.parent / mounts["/mosquitto/config"] / "mosquitto.conf").resolve() == MOSQUITTO_CONF
    assert mounts["/mosquitto/data"] in compose["volumes"]


def test_the_docker_shaped_config_checks_ok(tmp_path: Path) -> None:
    """The example, edited as docker/README.md says, validates with the secrets compose mounts."""
    secrets = write_secrets(tmp_path / "secrets")
    data = env_to_file_refs(load_yaml(EXAMPLE), str(secrets))
    data["store_broker"]["host"] = "broker"
    data["api"]["host"] = "0.0.0.0"
    data["hq"]["tls"]["key_file"] = str(secrets / TLS_KEY_SECRET)
    shutil.copy(tls_files(tmp_path / "tls")["key"], secrets / TLS_KEY_SECRET)
    config = write_config(tmp_path / "store.yaml", data)
    result = subprocess.run(
        [SCRIPT, "check-config", str(config)],
        capture_output=True,
        text=True,
        env=without_secret_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout


@dataclasses.dataclass
class RunningGateway:
    proc: subprocess.Popen[bytes]
    api_port: int
    log: Path


@pytest.fixture
def running_gateway(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> Iterator[RunningGateway]:
    """``store-gateway run`` as the image runs it: the example config, secrets read from files."""
    secrets = write_secrets(tmp_path / "secrets")
    data = env_to_file_refs(load_yaml(EXAMPLE), str(secrets))
    data["data_dir"] = str(tmp_path / "data")
    data["store_broker"] |= {"host": store_broker.host, "port": store_broker.port}
    data["hq"] |= {"host": hq_broker.host, "port": hq_broker.port}
    del data["hq"]["tls"]
    api_port = free_port()
    data["api"]["port"] = api_port
    config = write_config(tmp_path / "store.yaml", data)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [SCRIPT, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=without_secret_env(),
        )
    try:
        yield RunningGateway(proc, api_port, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_image_healthcheck_follows_the_gateway_and_sigterm_stops_it(
    running_gateway: RunningGateway, store_broker: Mosquitto
) -> None:
    gw = running_gateway
    poll(lambda: run_healthcheck(gw.api_port).returncode == 0, "the health check to pass", gw.log)
    report = json.loads(run_healthcheck(gw.api_port).stdout)
    assert report["status"] == "ok"
    store_broker.stop()  # the tills' broker is gone: the gateway is degraded, /health answers 503
    poll(lambda: run_healthcheck(gw.api_port).returncode != 0, "the health check to fail", gw.log)
    assert "503" in run_healthcheck(gw.api_port).stderr
    store_broker.start()
    gw.proc.send_signal(signal.SIGTERM)
    # Within compose's stop_grace_period and the unit's TimeoutStopSec, after which SIGKILL would follow.
    assert gw.proc.wait(timeout=30) == 0, gw.log.read_text()


# --- the store broker's mosquitto.conf


@pytest.fixture
def compose_broker() -> Iterator[Mosquitto]:
    """mosquitto running docker/mosquitto/mosquitto.conf, with paths moved to tmp and a loopback port."""
    broker = Mosquitto()
    try:
        passwd = broker.dir / "passwd"
        for flags, user in ((["-c"], "gateway"), ([], "pos-01")):
            command = ["mosquitto_passwd", "-b", *flags, str(passwd), user, f"{user}-pw"]
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        acl = broker.dir / "acl"
        acl.write_text(
            "user gateway\ntopic read store/pos/+/sale\n\nuser pos-01\ntopic write store/pos/pos-01/sale\n"
        )
        conf = MOSQUITTO_CONF.read_text()
        # The devices' TLS listener is left out here (tests/security/test_broker_accounts.py runs it with certs).
        tls = re.search(
            r"^listener 8883\n(?:(?!listener )[^\n]*\n)*?use_username_as_clientid true\n", conf, re.M
        )
        assert tls is not None, "the shipped conf has the devices' TLS listener"
        conf = conf.replace(tls.group(0), "")
        for old, new in {
            "listener 1883\n": f"listener {broker.port} 127.0.0.1\n",
            "/mosquitto/config/accounts/passwd": str(passwd),
            "/mosquitto/config/accounts/acl": str(acl),
            "/mosquitto/data/": f"{broker.dir}/",
        }.items():
            assert old in conf, old
            conf = conf.replace(old, new)
        broker.conf.write_text(conf)
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to its own user before it reads passwd and writes its
            # queue; the image's entrypoint chowns /mosquitto for the same reason.
            for path in (broker.dir, *broker.dir.iterdir()):
                shutil.chown(path, user="mosquitto", group="mosquitto")
        yield broker.start()
    finally:
        broker.close()


def broker_config(broker: Mosquitto, user: str | None) -> BrokerConfig:
    return BrokerConfig(
        host=broker.host,
        port=broker.port,
        protocol="5",
        username=user,
        password=SecretStr(f"{user}-pw") if user else None,
    )


async def test_shipped_broker_refuses_anonymous_clients(compose_broker: Mosquitto) -> None:
    with pytest.raises(MqttError):
        await MqttClient(broker_config(compose_broker, None), "anonymous", clean_start=True).connect()
    client = MqttClient(broker_config(compose_broker, "pos-01"), "pos-01", clean_start=True)
    await client.connect()
    await client.disconnect()


async def test_shipped_broker_keeps_the_gateways_queue_across_a_restart(compose_broker: Mosquitto) -> None:
    received: list[Message] = []
    arrived = asyncio.Event()

    def on_message(message: Message) -> None:
        received.append(message)
        arrived.set()

    config = broker_config(compose_broker, "gateway")
    gateway_client = MqttClient(config, "gw-session", clean_start=False, on_message=on_message)
    await gateway_client.connect()
    await gateway_client.subscribe([("store/pos/+/sale", 1)])
    await gateway_client.disconnect()

    till = MqttClient(broker_config(compose_broker, "pos-01"), "pos-01", clean_start=True)
    await till.connect()
    await till.publish("store/pos/pos-01/sale", b'{"receipt": "R-1"}', qos=1)
    await till.disconnect()

    compose_broker.stop()  # SIGTERM: mosquitto saves its queue to persistence_location
    compose_broker.start()

    gateway_client = MqttClient(config, "gw-session", clean_start=False, on_message=on_message)
    try:
        assert await gateway_client.connect() is True  # the session survived the restart
        async with asyncio.timeout(DEADLINE_S):
            await arrived.wait()
    finally:
        await gateway_client.disconnect()
    assert [(m.topic, m.payload) for m in received] == [("store/pos/pos-01/sale", b'{"receipt": "R-1"}')]


# --- the systemd unit


def test_systemd_unit_has_the_required_settings() -> None:
    unit = UnitParser()
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    data_dir = str(GatewayConfig.model_fields["data_dir"].default)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "User": "store-gateway",
        "StateDirectory": Path(data_dir).name,
        "Restart": "always",
        "RestartSec": "5",
        "TimeoutStopSec": "30",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": data_dir,
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["ExecStart"].endswith(f"/store-gateway run --config {CONFIG_PATH}")
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_loads_every_secret_the_config_uses() -> None:
    credentials = [value.split(":", 1) for value in unit_values("LoadCredential")]
    assert [name for name, _ in credentials] == example_secret_names()
    for name, source in credentials:
        assert source == f"/etc/store-gateway/secrets/{name}"
    assert CREDENTIALS_DIR in UNIT.read_text()  # the header tells how the config refers to them


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at this machine's console script.
    text = UNIT.read_text().replace("/opt/store-gateway/bin/store-gateway", str(Path(SCRIPT).resolve()))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


# --- CI


def test_ci_run_is_an_executable_bash_script() -> None:
    assert os.access(CI_RUN, os.X_OK)
    assert CI_RUN.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(CI_RUN)], check=True, timeout=30)
    usage = subprocess.run(
        ["bash", str(CI_RUN), "--no-such-option"], capture_output=True, text=True, timeout=30
    )
    assert usage.returncode == 2
    assert "usage:" in usage.stderr
