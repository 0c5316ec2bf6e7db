"""Broker accounts for the store's mosquitto: one per MQTT device, named by its device id, and the gateway's.

``store-gateway broker provision`` writes two files for mosquitto 2 from the store config:

- ``passwd``: ``user:$7$...`` lines, mosquitto's own PBKDF2-SHA512 format (what ``mosquitto_passwd`` writes),
  hashed here so that no password ever appears in a command line (``mosquitto_passwd -b`` puts it in
  ``ps`` for every local user to read) and no mosquitto is needed where the command runs;
- ``acl``: one ``user`` block per account. A device may publish only on its own topics: the routes of the
  MQTT drivers for its profile, with its id in place of ``{device_id}``; it may subscribe to nothing (the
  MQTT devices the gateway reads take no commands). The gateway's account may subscribe to the routes and
  publish only on the topics of the rules' ``mqtt_publish`` actions. Everything else, ``#`` and ``$SYS``
  included, is denied: with an ACL file mosquitto denies what it does not grant.

Passwords already in ``passwd`` are kept (the tills keep working) unless the account is rotated; accounts of
devices no longer in the config are removed. New passwords are returned to the caller, never logged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from drivers.mqtt.config import MqttDriverConfig
from drivers.mqtt.profile import profile_limits, resolve_profile
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.rule_actions import PLACEHOLDER, template_names

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

USERS_FILE: Final = "passwd"
ACL_FILE: Final = "acl"
HASH_ITERATIONS: Final = 101
"""mosquitto 2's own default. The passwords made here are 192 random bits: stretching adds nothing to that,
and more rounds would cost the broker CPU on every CONNECT, a wrong password's included."""
SALT_BYTES: Final = 12
HASH_BYTES: Final = 64
PASSWORD_BYTES: Final = 24
FILE_MODE: Final = 0o600
BROKER_MAX_PACKET_BYTES: Final = 262_144
"""The store broker's max_packet_size (docker/mosquitto/mosquitto.conf, and the systemd install's copy)."""
PUBLISH_OVERHEAD_BYTES: Final = 16
"""A PUBLISH packet's bytes besides its topic and payload (fixed header, topic length, packet id, MQTT 5
property length), rounded up."""


class ProvisionError(StoreGatewayError):
    """The accounts cannot be made from this config, or the files in the output folder cannot be used."""


@dataclass(frozen=True, slots=True)
class Account:
    """One broker user and the topics the ACL lets it use."""

    username: str
    write: tuple[str, ...]
    """Topics it may publish to: a device's own (no wildcards); the gateway's actions' (a level with a
    placeholder not known at provisioning as '+')."""
    read: tuple[str, ...]
    """Topic filters it may subscribe to and receive from."""
    device: bool
    """A device's account (else the gateway's)."""


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What :func:`provision` did."""

    accounts: tuple[Account, ...]
    new_passwords: tuple[tuple[str, str], ...]
    """(username, password) of every account that got a fresh password: show each once, to its device."""
    kept: tuple[str, ...]
    """Accounts whose password in ``passwd`` was kept."""
    removed: tuple[str, ...]
    """Accounts that were in ``passwd`` but are no longer in the config."""
    unrouted: tuple[str, ...]
    """Devices whose profile no MQTT route carries: an account that can publish nothing."""
    too_large: tuple[tuple[str, int], ...]
    """(device, bytes): devices whose largest message the gateway accepts is a packet over the broker's limit."""


def accounts(config: GatewayConfig) -> list[Account]:
    """The gateway's account first, then one per device of ``devices``, from the MQTT drivers' routes."""
    gateway_user = config.store_broker.username
    if not gateway_user:
        raise ProvisionError(
            "store_broker.username is not set: the gateway needs its own broker account (e.g. 'gateway')"
        )
    routes = [r for d in config.drivers if isinstance(d, MqttDriverConfig) for r in d.routes]
    clash = [d.id for d in config.devices if d.id == gateway_user]
    if clash:
        raise ProvisionError(
            f"device {clash[0]!r} has the gateway's broker user name (store_broker.username): rename one"
        )
    reads = tuple(_unique(r.subscription for r in routes))
    found = [Account(gateway_user, action_topics(config), reads, device=False)]
    for device in config.devices:
        profile = resolve_profile(device.profile)
        own = tuple(
            _unique(
                r.pattern.replace("{device_id}", device.id) for r in routes if r.device_profile == profile
            )
        )
        if own:  # a device no MQTT route reads needs no broker login (one would be a password for nothing)
            found.append(Account(device.id, own, (), device=True))
    return found


def action_topics(config: GatewayConfig) -> tuple[str, ...]:
    """The topics the configured rules' ``mqtt_publish`` actions publish to (docs/RULES.md, "Actions"): the
    gateway's only writes on the store broker. What is known now is filled in: ``{rule_id}``, ``{store_id}``,
    and ``{device_id}`` as each of the rule's ``select.devices`` when it lists some; a level with any other
    placeholder (or ``{device_id}`` of a rule for every device) is granted as ``+``, that level only."""
    topics: list[str] = []
    for rule in (config.stock.low_alert, *config.rules):
        known = {"rule_id": rule.id, "store_id": config.store.id}
        devices: list[str | None] = [*rule.select.devices] or [None]
        for action in rule.actions:
            if action.type != "mqtt_publish":
                continue
            for device in devices:
                values = known if device is None else {**known, "device_id": device}
                topics.append("/".join(_grant_level(level, values) for level in action.topic.split("/")))
    return tuple(_unique(topics))


def _grant_level(level: str, values: Mapping[str, str]) -> str:
    """A topic level with its placeholders filled in from ``values``; '+' if one of them is not known."""
    names = template_names(level)
    if not names:
        return level
    if not names <= values.keys():
        return "+"
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], level)


def too_large_for_broker(config: GatewayConfig) -> list[tuple[str, int]]:
    """Devices the gateway accepts larger messages from than the broker lets through (its max_packet_size),
    with the largest such packet: the broker would close their connection before the gateway saw them."""
    drivers = [d for d in config.drivers if isinstance(d, MqttDriverConfig)]
    found: list[tuple[str, int]] = []
    for device in config.devices:
        profile = resolve_profile(device.profile)
        limit = device.limits_over(profile_limits(profile)).max_payload_bytes
        packets = [
            min(driver.max_payload_bytes, limit)
            + len(route.pattern.replace("{device_id}", device.id).encode())
            + PUBLISH_OVERHEAD_BYTES
            for driver in drivers
            for route in driver.routes
            if route.device_profile == profile
        ]
        if packets and max(packets) > BROKER_MAX_PACKET_BYTES:
            found.append((device.id, max(packets)))
    return found


def acl_text(accounts_: Iterable[Account], source: str) -> str:
    """The mosquitto ACL file: one ``user`` block per account; nothing granted outside them."""
    lines = [
        f"# mosquitto ACL made by 'store-gateway broker provision' from {source}.",
        "# Do not edit: change the config and run the command again. What is not granted here is denied,",
        "# '#' and '$SYS' included.",
    ]
    for account in accounts_:
        lines += ["", f"user {account.username}"]
        lines += [f"topic write {topic}" for topic in account.write]
        lines += [f"topic read {topic}" for topic in account.read]
    return "\n".join(lines) + "\n"


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """mosquitto 2's ``$7$`` hash: PBKDF2-HMAC-SHA512, ``$7$<iterations>$<base64 salt>$<base64 hash>``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, HASH_ITERATIONS, HASH_BYTES)
    return f"$7${HASH_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def read_passwd(path: Path) -> dict[str, str]:
    """user -> hash of a mosquitto password file; empty when there is none yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ProvisionError(f"cannot read {path}: {err.strerror or err}") from err
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith("$"):
            raise ProvisionError(f"{path}:{number}: not a 'user:$hash' line of a mosquitto password file")
        entries[user] = hashed
    return entries


def read_secret(path: Path) -> str:
    """A password from a secret file, as the gateway reads it (one trailing newline ignored)."""
    try:
        value = path.read_text().removesuffix("\n")
    except OSError as err:
        raise ProvisionError(f"cannot read {path}: {err.strerror or err}") from err
    if not value:
        raise ProvisionError(f"{path} is empty: it must hold the gateway's password")
    return value


def provision(
    config: GatewayConfig,
    out: Path,
    *,
    source: str,
    rotate: Iterable[str] = (),
    gateway_password: str | None = None,
) -> Provisioned:
    """Write ``out/passwd`` and ``out/acl`` (mode 0600) for the config's accounts.

    A password already in ``out/passwd`` is kept unless its account is in ``rotate``; other accounts get a
    fresh one, returned in ``new_passwords``. ``gateway_password``, when given, is the gateway's password
    (its ``store_broker.password``) and is set on every run, never returned."""
    found = accounts(config)
    names = {a.username for a in found}
    gateway_user = found[0].username
    rotate = set(rotate)
    unknown = sorted(rotate - names)
    if unknown:
        raise ProvisionError(
            f"--rotate {', '.join(unknown)}: no such account (known: {', '.join(sorted(names))})"
        )
    if gateway_password is not None and gateway_user in rotate:
        raise ProvisionError(f"the gateway's password comes from its file: do not --rotate {gateway_user}")
    out.mkdir(parents=True, exist_ok=True)
    existing = read_passwd(out / USERS_FILE)
    hashes: dict[str, str] = {}
    fresh: list[tuple[str, str]] = []
    kept: list[str] = []
    for account in found:
        name = account.username
        if name == gateway_user and gateway_password is not None:
            hashes[name] = hash_password(gateway_password)
        elif name in existing and name not in rotate:
            hashes[name] = existing[name]
            kept.append(name)
        else:
            password = new_password()
            hashes[name] = hash_password(password)
            fresh.append((name, password))
    # The ACL first: if the password file then cannot be written, no password was shown that it does not hold
    # (a rerun would keep it, unknown to anyone). A user the ACL names but the password file lacks cannot log
    # in; a user only the password file names may log in but is granted nothing.
    _write_private(out / ACL_FILE, acl_text(found, source))
    _write_private(out / USERS_FILE, _passwd_text(hashes))
    return Provisioned(
        accounts=tuple(found),
        new_passwords=tuple(fresh),
        kept=tuple(kept),
        removed=tuple(sorted(set(existing) - names)),
        unrouted=tuple(a.username for a in found if a.device and not a.write),
        too_large=tuple(too_large_for_broker(config)),
    )


def _passwd_text(hashes: Mapping[str, str]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in hashes.items())


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read (0600 whatever the umask)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), FILE_MODE)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
