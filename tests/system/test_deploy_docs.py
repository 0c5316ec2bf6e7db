"""The deployment guide, docker/README.md, agrees with the files it deploys: docker/compose.yaml, the systemd
unit docker/store-gateway.service and the example config firmware_configs/store-example.yaml.

What is checked is what a technician would run into: a secret compose mounts that the guide never creates,
a secret the config reads that compose or systemd never provides, an ``{env: NAME}`` nobody sets, an edit
step that names a key the example does not have. No Docker here: the guide's own shell blocks are run, as
written, in a copy of docker/ in a temporary folder (placeholder paths replaced by test files, prompts
answered on stdin, ``sudo chown`` to the container's uid skipped), and the config they produce is checked
with the real ``store-gateway check-config``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.harness.pki import write_pki

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
GUIDE = DOCKER / "README.md"
COMPOSE = DOCKER / "compose.yaml"
UNIT = DOCKER / "store-gateway.service"
EXAMPLE = REPO / "firmware_configs" / "store-example.yaml"
SCRIPT = str(Path(sysconfig.get_path("scripts")) / "store-gateway")
"""The console script installed with this interpreter (not whichever one is first on PATH)."""

COMPOSE_SECRETS = "/run/secrets"
"""Where compose mounts a service's secrets."""
CREDENTIALS = "/run/credentials/store-gateway.service"
"""Where systemd puts the unit's LoadCredential= copies."""
CONFIG_DIR = "/etc/store-gateway"
"""The config's folder: compose mounts config/ there; the systemd install writes it there."""
SYSTEMD_SECRETS = f"{CONFIG_DIR}/secrets"
PLACEHOLDER = "/path/to/"
"""The guide's stand-in for the files the technician brings (HQ CA, gateway certificate and key)."""
BINDKEY = "231d39c1d7cc1ab1aee224cd096db932"
"""A BLE bindkey is 16 bytes in hex; every other secret is free text."""
SHELLS = frozenset({"sh", "bash", "shell", "console"})
ENV_REF = re.compile(r"\{env: ")


# --- reading the guide


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of the guide, with the ``##`` section it is in."""

    lang: str
    text: str
    section: str


def guide_blocks() -> list[Block]:
    blocks: list[Block] = []
    section = ""
    fence: str | None = None
    body: list[str] = []
    for line in GUIDE.read_text().splitlines():
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, body = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append(Block(fence, "\n".join(body) + "\n", section))
            fence = None
        else:
            body.append(line)
    assert fence is None, "docker/README.md ends inside a fenced block"
    return blocks


def section_blocks(section_start: str, langs: frozenset[str] = SHELLS) -> list[Block]:
    blocks = [b for b in guide_blocks() if b.section.startswith(section_start) and b.lang in langs]
    assert blocks, f"no {sorted(langs)} block under '## {section_start}...' in docker/README.md"
    return blocks


def docker_blocks(langs: frozenset[str] = SHELLS) -> list[Block]:
    return section_blocks("With Docker Compose", langs)


def systemd_blocks(langs: frozenset[str] = SHELLS) -> list[Block]:
    return section_blocks("With systemd", langs)


def the_block(blocks: list[Block], marker: str) -> Block:
    """The one block that contains ``marker``."""
    found = [b for b in blocks if marker in b.text]
    assert len(found) == 1, f"{len(found)} shell blocks of the section contain {marker!r}"
    return found[0]


def config_block(blocks: list[Block]) -> Block:
    """The block that makes the store config from the example."""
    return the_block(blocks, "store-example.yaml")


def secrets_block(blocks: list[Block]) -> Block:
    """The block that creates the secret files."""
    return the_block(blocks, "read -rsp")


def logical_lines(script: str) -> list[str]:
    return script.replace("\\\n", " ").splitlines()


def prompted_names(script: str) -> list[str]:
    """The names the ``for name in ...; do read -rsp ...`` loop asks for, in order."""
    joined = " ".join(logical_lines(script))
    loops = re.findall(r"\bfor (\w+) in ([^;]+); do (.*?)\bdone\b", joined)
    names = [word for _, words, body in loops if "read -rsp" in body for word in words.split()]
    assert names, "no read -rsp loop"
    return names


def created_secret_names(script: str, secrets_dir: str) -> list[str]:
    """The secret files a guide block writes in ``secrets_dir``: redirections, cp/install targets, loops."""
    folder = re.escape(secrets_dir)
    names: list[str] = []
    joined = " ".join(logical_lines(script))
    for var, words, body in re.findall(r"\bfor (\w+) in ([^;]+); do (.*?)\bdone\b", joined):
        if re.search(rf'>\s*"?{folder}/\$\{{?{var}\b', body):
            names += words.split()
    for line in logical_lines(script):
        names += re.findall(rf'>\s*"?{folder}/(\w+)"?', line)
        words = line.split()
        if words and words[0] in ("cp", "install") and not words[-1].endswith("/"):
            names += re.findall(rf'^"?{folder}/(\w+)"?$', words[-1])
    return names


def sed_expressions(script: str) -> list[str]:
    """Every ``-e '...'`` expression of the block's sed commands."""
    expressions: list[str] = []
    for line in logical_lines(script):
        if line.split()[:1] == ["sed"]:
            expressions += re.findall(r"-e '([^']*)'", line)
    assert expressions, "no sed -e '...' in the block"
    return expressions


def sed_pattern(expression: str) -> re.Pattern[str]:
    """The pattern of a ``s#PATTERN#REPLACEMENT#flags`` expression, as a Python regex (ERE: sed -E)."""
    assert expression.startswith("s#"), expression
    assert expression.count("#") == 3, expression
    return re.compile(expression.split("#")[1])


def secrets_table(section_start: str) -> list[str]:
    """The first column (a file name in backquotes) of the secrets table in a section of the guide."""
    names: list[str] = []
    section = ""
    for line in GUIDE.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif section.startswith(section_start) and (match := re.match(r"\| `(\w+)` \|", line)):
            names.append(match[1])
    return names


def guide_check_config_commands(blocks: list[Block]) -> list[list[str]]:
    """The arguments after ``check-config`` in each command of these blocks that runs it."""
    commands: list[list[str]] = []
    for block in blocks:
        for line in logical_lines(block.text):
            words = line.split("#")[0].split()
            if "check-config" in words:
                commands.append(words[words.index("check-config") + 1 :])
    return commands


# --- reading the deployed files


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text())


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def gateway_service() -> dict[str, Any]:
    services = compose()["services"]
    (service,) = [s for s in services.values() if not str(s.get("image", "")).startswith("eclipse-mosquitto")]
    assert isinstance(service, dict)
    return service


def declared_secrets() -> list[str]:
    return list(compose().get("secrets") or {})


def mounted_secrets() -> list[str]:
    return [s if isinstance(s, str) else s["source"] for s in gateway_service().get("secrets", [])]


def unit_values(key: str) -> list[str]:
    prefix = f"{key}="
    return [line[len(prefix) :] for line in UNIT.read_text().splitlines() if line.startswith(prefix)]


def unit_credentials() -> dict[str, str]:
    """LoadCredential= lines: name -> source file."""
    pairs = [value.split(":", 1) for value in unit_values("LoadCredential")]
    credentials = dict(pairs)
    assert len(credentials) == len(pairs), "a credential is loaded twice"
    return credentials


def secret_refs(node: Any, path: str = "") -> Iterator[tuple[str, str, str]]:
    """(key path, 'env' or 'file', target) of every secret reference in a loaded config."""
    if isinstance(node, dict):
        if len(node) == 1 and set(node) <= {"env", "file"}:
            ((kind, target),) = node.items()
            yield path, kind, str(target)
            return
        for key, value in node.items():
            yield from secret_refs(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from secret_refs(value, f"{path}[{n}]")


def secret_files(config: Any) -> dict[str, str]:
    """Key path -> file of everything secret the config reads: {file:} references and the TLS client key."""
    files = {path: target for path, kind, target in secret_refs(config) if kind == "file"}
    key_file = ((config.get("hq") or {}).get("tls") or {}).get("key_file")
    if key_file is not None:
        files["hq.tls.key_file"] = str(key_file)
    return files


def leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaf_paths(value, (*prefix, str(key)))
    else:
        yield prefix


def has_path(node: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def overlay(base: Any, edits: Any) -> Any:
    """``base`` with the keys of ``edits`` changed, as a technician edits the config by hand."""
    if not (isinstance(base, dict) and isinstance(edits, dict)):
        return edits
    return {**base, **{key: overlay(base.get(key), value) for key, value in edits.items()}}


def replace_prefix(node: Any, old: str, new: str) -> Any:
    """Every string starting with ``old`` re-rooted at ``new``."""
    if isinstance(node, dict):
        return {key: replace_prefix(value, old, new) for key, value in node.items()}
    if isinstance(node, list):
        return [replace_prefix(value, old, new) for value in node]
    if isinstance(node, str) and node.startswith(f"{old}/"):
        return new + node[len(old) :]
    return node


# --- running the guide


def secret_value(name: str) -> str:
    return BINDKEY if name.endswith("_bindkey") else f"{name}-value-0123456789"


def run_guide_block(
    block: Block, cwd: Path, replacements: dict[str, str], stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """A guide block, as written but for ``replacements`` (each must occur) and chown to another uid."""
    script = block.text
    for old, new in replacements.items():
        assert old in script, f"the guide's block no longer contains {old!r}:\n{script}"
        script = script.replace(old, new)
    lines: list[str] = []
    for line in script.splitlines():
        if line.startswith("sudo chown "):
            continue  # the container's uid 10001: not needed to read the files here
        lines.append(line.removeprefix("sudo "))
    result = subprocess.run(
        ["bash", "-eu", "-c", "\n".join(lines)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- the block, as run:\n{script}"
    return result


def brought_files(folder: Path) -> Path:
    """The files the technician brings, standing in for /path/to/...: HQ's CA, the gateway's certificate
    and its key (check-config reads them: PEM, and the key must match the certificate)."""
    pki = write_pki(folder)
    shutil.copy(pki["ca"], folder / "hq-ca.pem")
    return folder


def check_config(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, "check-config", *options, str(config)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},  # no secret can come from this environment
        timeout=60,
        check=False,
    )


@dataclasses.dataclass
class Install:
    """What the guide's commands left in a temporary folder."""

    config: Path
    """The store config they produced."""
    secrets: Path
    """The folder of secret files they wrote."""
    secrets_at_run_time: str
    """Where the gateway finds those files when it runs (compose's mount, systemd's credentials)."""
    brought: Path
    """The technician's own files, which the guide calls /path/to/..."""


@pytest.fixture(scope="module")
def docker_install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """Steps 1 and 2 of the Docker install, in a copy of docker/ in a checkout-like folder."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(DOCKER, root / "docker")
    (root / "firmware_configs").mkdir()
    shutil.copy(EXAMPLE, root / "firmware_configs")
    brings = brought_files(root / "brings")
    blocks = docker_blocks()
    work = root / "docker"
    run_guide_block(config_block(blocks), work, {PLACEHOLDER: f"{brings}/"})
    script = secrets_block(blocks)
    answers = "".join(f"{secret_value(name)}\n" for name in prompted_names(script.text))
    run_guide_block(script, work, {PLACEHOLDER: f"{brings}/"}, stdin=answers)
    return Install(work / "config" / "store.yaml", work / "secrets", COMPOSE_SECRETS, brings)


@pytest.fixture(scope="module")
def systemd_install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """The systemd install's config and secrets steps, with /etc/store-gateway in a temporary folder."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "firmware_configs").mkdir()
    shutil.copy(EXAMPLE, root / "firmware_configs")
    brings = brought_files(root / "brings")
    etc = root / "etc" / "store-gateway"
    blocks = systemd_blocks()
    replacements = {CONFIG_DIR: str(etc), PLACEHOLDER: f"{brings}/"}
    # install -g: the store-gateway group exists on the box, not here.
    run_guide_block(config_block(blocks), root, replacements | {" -g store-gateway": ""})
    script = secrets_block(blocks)
    answers = "".join(f"{secret_value(name)}\n" for name in prompted_names(script.text))
    run_guide_block(script, root, replacements, stdin=answers)
    return Install(etc / "store.yaml", etc / "secrets", CREDENTIALS, brings)


def runnable_config(install: Install, edits: Any = None) -> Path:
    """The produced config, edited as the guide says, reading its secrets where the guide's steps wrote them
    (as compose and systemd show them to the gateway); next to the original, so tls/ resolves the same."""
    data = overlay(load_yaml(install.config), edits or {})
    data = replace_prefix(data, install.secrets_at_run_time, str(install.secrets))
    path = install.config.with_name("store.as-run.yaml")
    path.write_text(json.dumps(data, indent=2))  # JSON is YAML
    return path


# --- compose and the systemd unit


def test_compose_mounts_every_secret_it_declares_in_the_gateway() -> None:
    declared = declared_secrets()
    assert declared, "compose.yaml declares no secrets"
    assert sorted(mounted_secrets()) == sorted(declared)
    for name, secret in compose()["secrets"].items():
        assert secret == {"file": f"./secrets/{name}"}, name


def test_compose_and_the_unit_pass_no_secret_in_the_environment() -> None:
    environment = gateway_service().get("environment") or {}
    assert not environment, "compose.yaml sets environment variables for the gateway: use secrets"
    assert [value.split("=", 1)[0] for value in unit_values("Environment")] == ["PYTHONUNBUFFERED"]


def test_the_unit_loads_the_secrets_compose_mounts() -> None:
    credentials = unit_credentials()
    assert sorted(credentials) == sorted(declared_secrets())
    for name, source in credentials.items():
        assert source == f"{SYSTEMD_SECRETS}/{name}", name
    assert CREDENTIALS in UNIT.read_text()  # its header says where the config reads them


# --- the guide, read


def test_the_guide_creates_every_secret_compose_declares() -> None:
    created = created_secret_names(secrets_block(docker_blocks()).text, "secrets")
    assert len(created) == len(set(created)), f"a secret is written twice: {created}"
    assert sorted(created) == sorted(declared_secrets())


def test_the_guide_creates_every_secret_the_unit_loads() -> None:
    created = created_secret_names(secrets_block(systemd_blocks()).text, SYSTEMD_SECRETS)
    assert len(created) == len(set(created)), f"a secret is written twice: {created}"
    assert sorted(created) == sorted(unit_credentials())


def test_the_guide_table_of_secrets_is_the_compose_list() -> None:
    assert secrets_table("With Docker Compose") == declared_secrets()


@pytest.mark.parametrize("section", ["docker", "systemd"])
def test_the_guide_sed_edits_match_the_example(section: str) -> None:
    blocks = docker_blocks() if section == "docker" else systemd_blocks()
    text = EXAMPLE.read_text()
    env_refs = [ref for ref in secret_refs(load_yaml(EXAMPLE)) if ref[1] == "env"]
    for expression in sed_expressions(config_block(blocks).text):
        pattern = sed_pattern(expression)
        matches = pattern.findall(text)
        assert matches, f"sed {expression!r} changes nothing in {EXAMPLE.name}"
        if "env:" in expression:
            assert len(matches) == len(env_refs) == len(ENV_REF.findall(text)), (matches, env_refs)
        else:
            assert len(matches) == 1, f"sed {expression!r} matches {len(matches)} places in {EXAMPLE.name}"


def test_the_guide_yaml_edits_name_keys_of_the_example() -> None:
    example = load_yaml(EXAMPLE)
    blocks = docker_blocks(frozenset({"yaml"}))
    for block in blocks:
        edits = YAML(typ="safe", pure=True).load(block.text)
        for path in leaf_paths(edits):
            assert has_path(example, path), (
                f"the guide edits {'.'.join(path)}, which the example does not have"
            )
        assert not list(secret_refs(edits)), "secrets are pointed at their files by the sed step, not by hand"


# --- the guide, run


@pytest.mark.parametrize("kind", ["docker", "systemd"])
def test_the_guide_writes_one_file_per_secret(kind: str, request: pytest.FixtureRequest) -> None:
    install: Install = request.getfixturevalue(f"{kind}_install")
    expected = declared_secrets() if kind == "docker" else list(unit_credentials())
    assert sorted(p.name for p in install.secrets.iterdir()) == sorted(expected)
    for path in install.secrets.iterdir():
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"
        value = path.read_text()
        assert value.endswith("\n"), path.name
        assert value.strip(), path.name
    token = (install.secrets / "gateway_api_token").read_text().strip()
    assert len(token) >= 16, "the generated API token"
    assert re.fullmatch(r"[\w-]+", token), "the generated API token"
    assert (install.secrets / "gateway_tls_key").read_bytes() == (
        install.brought / "gateway.key"
    ).read_bytes()


@pytest.mark.parametrize("kind", ["docker", "systemd"])
def test_the_config_the_guide_produces_reads_every_secret_from_its_file(
    kind: str, request: pytest.FixtureRequest
) -> None:
    install: Install = request.getfixturevalue(f"{kind}_install")
    config = load_yaml(install.config)
    env_refs = [
        f"{path}: {{env: {target}}}" for path, ref_kind, target in secret_refs(config) if ref_kind == "env"
    ]
    assert env_refs == [], "nothing sets these environment variables"
    provided = mounted_secrets() if kind == "docker" else list(unit_credentials())
    read: list[str] = []
    for path, file in secret_files(config).items():
        folder, _, name = file.rpartition("/")
        assert folder == install.secrets_at_run_time, f"{path} reads {file}"
        assert name in provided, f"{path} reads {file}, which is not provided"
        read.append(name)
    # Every secret provided is read by something in the example (none is stale), and each by one key.
    assert sorted(read) == sorted(provided)


def test_the_docker_config_checks_ok_with_the_guide_secrets(docker_install: Install) -> None:
    (edits,) = [YAML(typ="safe", pure=True).load(b.text) for b in docker_blocks(frozenset({"yaml"}))]
    config = runnable_config(docker_install, edits)
    data = load_yaml(config)
    assert data["store_broker"]["host"] in compose()["services"], "store_broker.host: the broker service"
    assert f"127.0.0.1:{data['api']['port']}" in str(gateway_service()["healthcheck"]["test"])
    result = check_config(config)
    assert result.returncode == 0, result.stdout


def test_the_systemd_config_checks_ok_with_the_guide_secrets(systemd_install: Install) -> None:
    result = check_config(runnable_config(systemd_install))
    assert result.returncode == 0, result.stdout


def test_the_systemd_check_config_step_passes_by_hand(systemd_install: Install) -> None:
    """Run by hand, check-config cannot see systemd's credentials: the guide's command must still pass."""
    (arguments,) = guide_check_config_commands(systemd_blocks())
    *options, config = arguments
    assert config == f"{CONFIG_DIR}/store.yaml"
    assert "--no-secrets" in options, "by hand, the credentials do not exist: the check cannot pass"
    result = check_config(systemd_install.config, *options)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"OK: {systemd_install.config}"), result.stdout


def test_the_docker_config_checks_ok_away_from_the_box(docker_install: Install) -> None:
    """What a technician can check on a laptop before the box has its secrets: all but the secrets."""
    result = check_config(docker_install.config, "--no-secrets")
    assert result.returncode == 0, result.stdout


def test_the_docker_check_config_step_checks_the_mounted_config() -> None:
    commands = guide_check_config_commands(docker_blocks())
    assert commands, "the Docker install never runs check-config"
    for arguments in commands:
        assert arguments[-1] == f"{CONFIG_DIR}/store.yaml", arguments
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway_service()["volumes"]}
    assert mounts[CONFIG_DIR] == "./config"
