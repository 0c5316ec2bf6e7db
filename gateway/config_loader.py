"""Load the gateway's YAML config and report every problem at once, each with file:line:col and a hint.

The document loader of the kernel (:mod:`gateway.kernel.loader`) reads the YAML keeping the position of every
key and item, so a pydantic error location such as ``('hq', 'port')`` maps back to the line a technician has to
fix. Duplicate keys, syntax errors, unresolvable secrets and validation errors all become :class:`ConfigIssue`
entries of a single :class:`ConfigError`.

Secrets are written as ``{env: NAME}`` or ``{file: PATH}`` and resolved at load time. Their values, and the
value of any secret field, never appear in an error, a log line or ``repr()`` of the config.

``check-config`` and ``run`` also check the files the config names (TLS CA, certificate and key; the stock
CSV) with :func:`tls_file_problems` and :func:`stock_csv_problems`: a file that is missing, unreadable or not
what it should be is an issue at the line of the key that names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import TypeAdapter, ValidationError

from gateway.config import GatewayConfig
from gateway.kernel.loader import (
    NOT_A_REFERENCE,
    DocumentError,
    DocumentKind,
    DocumentLoader,
    Issue,
    KeyPath,
    absolute,
)
from gateway.kernel.model_types import TypeInfo
from gateway.kernel.tls_files import FileProblem, read_named_file, tls_file_problems
from gateway.kernel.yaml_reader import os_error_hint

__all__ = [
    "CONFIG",
    "ConfigError",
    "ConfigIssue",
    "check_config",
    "config_hash",
    "demo_config",
    "json_schema",
    "load_config",
    "stock_csv_problems",
    "tls_file_problems",
]

_LOGGER = logging.getLogger(__name__)

MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024
"""A store config is a few KiB; anything this large is a mistake (or /dev/zero)."""
MAX_SECRET_FILE_BYTES: Final = 64 * 1024
CONFIG: Final = DocumentKind("config", "firmware_configs/store-example.yaml", MAX_CONFIG_BYTES)
_SECRET_REF_KEYS: Final = frozenset({"env", "file"})
_UNRESOLVED: Final = "<unresolved secret>"
_PLACEHOLDER: Final = "0123456789abcdef" * 2
"""Stands in for a secret that ``check-config --no-secrets`` does not check: 32 hex digits satisfy the rules of
every secret field (API token length, webhook secret length, BLE bindkey format), so the rest is checked."""
TLS_FILE_KEYS: Final = ("ca_file", "cert_file", "key_file")

ConfigIssue = Issue
"""One problem in a config file, with where it is and what to do about it."""


class ConfigError(DocumentError):
    """The config cannot be used; ``issues`` lists every problem found, in file order."""

    noun = "config"


def load_config(
    path: Path,
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = False,
    no_secrets: bool = False,
) -> GatewayConfig:
    """Read, resolve and validate one config file; raise :class:`ConfigError` listing every problem.

    With ``check_files`` (``run`` and ``check-config``), the files the config names must also be usable:
    see :func:`tls_file_problems` and :func:`stock_csv_problems`. With ``no_secrets`` (tools that read no
    secret, such as ``broker provision``, run where the secrets are not), a secret this machine lacks is not an
    error: a placeholder that fits its field stands in for it."""
    env = os.environ if env is None else env
    loader = _ConfigLoader(Path(path), env, check_files=check_files, no_secrets=no_secrets)
    cfg = loader.load(GatewayConfig)
    _LOGGER.debug("loaded config %s (hash %s)", path, config_hash(cfg))
    return cfg


def config_hash(cfg: GatewayConfig) -> str:
    """A short stable fingerprint of the effective config, secrets excluded; sent in the birth message."""
    data = cfg.model_dump(mode="json")  # SecretStr fields serialise as a fixed mask, never the value
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors and ``store-gateway config-schema``.

    Generated from the models; secret fields also accept the ``{env: NAME}`` / ``{file: PATH}`` form.
    """
    schema = GatewayConfig.model_json_schema()
    schema.setdefault("$defs", {})["SecretRef"] = {
        "title": "SecretRef",
        "description": "Read the value at load time from an environment variable or a file (trailing newline "
        "stripped; relative paths are relative to the config file).",
        "oneOf": [
            {
                "type": "object",
                "properties": {"env": {"type": "string", "minLength": 1}},
                "required": ["env"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"file": {"type": "string", "minLength": 1}},
                "required": ["file"],
                "additionalProperties": False,
            },
        ],
    }
    result: dict[str, Any] = _allow_secret_refs(schema)
    return result


def check_config(
    path: Path, *, no_secrets: bool = False, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Exit code and text of ``store-gateway check-config``: 0 and a summary, or 1 and every problem.

    The files the config names are checked too. With ``no_secrets`` (checking a config away from the box it
    runs on), secrets this machine lacks (an unset variable, a missing or unreadable secret file) and TLS files
    it lacks (missing or unreadable) are counted as not checked instead of being errors; a secret or a file
    that is there but wrong is still an error, and so is everything else."""
    loader = _ConfigLoader(
        Path(path), os.environ if env is None else env, check_files=True, no_secrets=no_secrets
    )
    try:
        cfg = loader.load(GatewayConfig)
    except ConfigError as exc:
        return 1, f"{exc}\n{len(exc.issues)} problem(s) in {path}"
    text = f"OK: {path}: {_summary(cfg)}"
    if no_secrets:
        secrets = f"{len(loader.unchecked_secrets)} secret(s)"
        files = f" and {loader.unchecked_files} TLS file(s)" if loader.unchecked_files else ""
        text += f"; --no-secrets: {secrets}{files} not checked"
    return 0, text


def stock_csv_problems(path: Path, folder: Path | None = None) -> list[FileProblem]:
    """Why the stock CSV cannot be imported at start, or [] if it can (the same reader ``run`` uses)."""
    from gateway.ledger.stock import StockConfigError, read_initial_csv

    problems: list[FileProblem] = []
    if read_named_file("initial_csv", path, folder, problems) is None:
        return problems
    try:
        read_initial_csv(path)
    except StockConfigError as exc:
        detail = str(exc)
        if detail.startswith(f"{path}:"):
            detail = "line " + detail.removeprefix(f"{path}:")
        problems.append(
            FileProblem(
                "initial_csv",
                path,
                "invalid",
                f"{path}: not a valid stock CSV: {detail}",
                "one 'sku,on_hand[,safety_stock]' row per SKU, UTF-8; a header row is allowed",
            )
        )
    return problems


def demo_config(
    data_dir: Path,
    store_port: int,
    hq_port: int,
    api_port: int,
    api_token: str,
    sections: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """The embedded-defaults config of ``store-gateway demo``: one Hong Kong store, three tills, 20 SKUs.
    ``sections`` replaces top-level sections (a scenario's ``drivers`` and ``devices``)."""
    return GatewayConfig.model_validate(
        {
            "gateway_id": "gw-demo",
            "store": {
                "id": "demo-001",
                "name": "Demo Store",
                "timezone": "Asia/Hong_Kong",
                "location": {"latitude": 22.2800, "longitude": 114.1830, "geofence_radius_m": 100},
            },
            "data_dir": str(data_dir),
            "store_broker": {"host": "127.0.0.1", "port": store_port, "protocol": "3.1.1"},
            "hq": {"host": "127.0.0.1", "port": hq_port, "protocol": "3.1.1"},
            "drivers": [
                {
                    "type": "mqtt",
                    "name": "store-mqtt",
                    "routes": [
                        {"pattern": "store/pos/{device_id}/sale", "kind": "pos.sale"},
                        {"pattern": "store/pos/{device_id}/return", "kind": "pos.return"},
                    ],
                }
            ],
            "devices": [
                {"id": f"pos-{n:02d}", "profile": "pos_terminal", "name": f"Till {n}"} for n in range(1, 4)
            ],
            "stock": {
                # Three SKUs start close to their safety stock, so the demo shows a stock.low alert soon.
                "items": [
                    {"sku": f"SKU-{n:04d}", "on_hand": 26 if n <= 3 else 200, "safety_stock": 20}
                    for n in range(1, 21)
                ]
            },
            "api": {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": api_token},
            **(sections or {}),
        }
    )


# --- the loader


class _ConfigLoader(DocumentLoader):
    """One load of a config: the document loader, plus secrets and the files the config names."""

    error = ConfigError

    def __init__(
        self, path: Path, env: Mapping[str, str], *, check_files: bool = False, no_secrets: bool = False
    ) -> None:
        super().__init__(path, CONFIG, logger=_LOGGER)
        self.env = env
        self.check_files = check_files
        self.no_secrets = no_secrets
        self.unchecked_files = 0
        """--no-secrets: TLS files this machine lacks."""

    @property
    def unchecked_secrets(self) -> list[KeyPath]:
        """--no-secrets: secret references this machine cannot resolve; not errors, and not validated."""
        return self.placeholders

    def _explain_placeholders(self) -> None:
        # Every validation error was about a placeholder (a secret in a field no placeholder fits).
        for path in self.placeholders:
            self.issue_at(
                self.position(path),
                path,
                None,
                "the config cannot be validated without this secret",
                "set it and check without --no-secrets",
            )

    # -- secrets

    def _reference(self, node: Mapping[Any, Any], path: KeyPath, info: TypeInfo) -> Any:
        if info.scalar and set(node) and set(node) <= _SECRET_REF_KEYS:
            return self._resolve_secret(node, path)
        return NOT_A_REFERENCE

    def _resolve_secret(self, ref: Mapping[Any, Any], path: KeyPath) -> Any:
        self.secret_paths.add(path)
        if len(ref) != 1:
            self.problem(path, "a secret reference has exactly one key", "write {env: NAME} or {file: PATH}")
            return _UNRESOLVED
        kind, target = next(iter(ref.items()))
        if not isinstance(target, str) or not target:
            self.problem(path, f"'{kind}' needs a non-empty name", "write {env: NAME} or {file: PATH}")
            return _UNRESOLVED
        target = str(target)
        if kind == "env":
            value = self.env.get(target)
            if value is None and self.no_secrets:
                return self._unchecked(path)
            if value is None:
                self.problem(
                    path,
                    f"environment variable {target} is not set",
                    f"better, read it from a file: {{file: /run/secrets/NAME}} (compose secrets, systemd "
                    f"LoadCredential=); an environment variable {target} shows in 'docker inspect' and "
                    "'systemctl show'",
                )
                return _UNRESOLVED
            if not value:
                self.problem(path, f"environment variable {target} is empty", f"give {target} a value")
                return _UNRESOLVED
        else:
            file = Path(absolute(self.base_dir, target))
            if self.no_secrets and not _exists_for_us(file):
                return self._unchecked(path)
            value_or_none = self._read_secret_file(path, file)
            if value_or_none is None:
                return _UNRESOLVED
            value = value_or_none
        self.secret_values.add(value)
        return value

    def _unchecked(self, path: KeyPath) -> Any:
        """--no-secrets: a secret this machine lacks; a placeholder lets everything else be validated."""
        self.placeholders.append(path)
        field = self.fields.get(path)
        if field is None:
            return _PLACEHOLDER
        expected: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        adapter: TypeAdapter[Any] = TypeAdapter(expected)
        default = [] if field.is_required() else [field.get_default(call_default_factory=True)]
        for candidate in (_PLACEHOLDER, *default, 1, 1.0, True):
            try:
                adapter.validate_python(candidate)
            except ValidationError:
                continue
            return candidate
        return _PLACEHOLDER

    def _read_secret_file(self, path: KeyPath, file: Path) -> str | None:
        try:
            info = file.stat()
            if not stat.S_ISREG(info.st_mode):
                self.problem(path, f"secret file {file} is not a regular file", None)
                return None
            if info.st_size > MAX_SECRET_FILE_BYTES:
                self.problem(path, f"secret file {file} is larger than {MAX_SECRET_FILE_BYTES} bytes", None)
                return None
            with file.open("rb") as fh:
                raw = fh.read(MAX_SECRET_FILE_BYTES + 1)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.problem(path, f"cannot read secret file {file}: {reason}", _secret_file_hint(exc))
            return None
        try:
            value = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            self.problem(path, f"secret file {file} is not UTF-8 text", None)
            return None
        if not value:
            self.problem(path, f"secret file {file} is empty", None)
            return None
        return value

    # -- the files the config names

    def _before_validation(self, data: Mapping[str, Any]) -> None:
        if not self.check_files:
            return
        for section in ("store_broker", "hq"):
            tls = _section(data, section, "tls")
            if tls is None:
                continue
            named = {key: self._named_path(tls, (section, "tls", key)) for key in TLS_FILE_KEYS}
            problems = tls_file_problems(
                named["ca_file"], named["cert_file"], named["key_file"], self.base_dir
            )
            for problem in problems:
                if self.no_secrets and problem.absent:
                    self.unchecked_files += 1
                else:
                    self._file_issue((section, "tls", problem.key), problem)
        stock = _section(data, "stock")
        csv = self._named_path(stock, ("stock", "initial_csv")) if stock is not None else None
        if csv is not None:
            for problem in stock_csv_problems(csv, self.base_dir):
                self._file_issue(("stock", "initial_csv"), problem)

    def _named_path(self, section: Mapping[str, Any], path: KeyPath) -> Path | None:
        value = section.get(str(path[-1]))
        if not isinstance(value, str) or not value or path in self.placeholders:
            return None
        if any(path[: len(p)] == p for p in self.problem_paths):
            return None  # an unresolved secret or an unreadable value: already reported
        return Path(value)

    def _file_issue(self, path: KeyPath, problem: FileProblem) -> None:
        self.issue_at(self.position(path), path, None, problem.message, problem.hint)


def _section(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any] | None:
    """data[keys[0]][keys[1]]... if every step is a mapping, else None."""
    node: Any = data
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _exists_for_us(file: Path) -> bool:
    """False if the file is missing or this user may not read it (what --no-secrets does not check)."""
    try:
        info = file.stat()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    except OSError:
        return True  # there but odd: reported when read
    return not stat.S_ISREG(info.st_mode) or os.access(file, os.R_OK)


def _secret_file_hint(exc: Exception) -> str | None:
    if isinstance(exc, FileNotFoundError):
        return "check the path; relative paths are relative to the config file's folder"
    return os_error_hint(exc)


def _allow_secret_refs(schema: Any) -> Any:
    """Where the schema has a secret string, also allow a SecretRef."""
    if isinstance(schema, dict):
        out = {k: _allow_secret_refs(v) for k, v in schema.items()}
        if out.get("type") == "string" and out.get("format") == "password":
            return {"anyOf": [out, {"$ref": "#/$defs/SecretRef"}]}
        return out
    if isinstance(schema, list):
        return [_allow_secret_refs(v) for v in schema]
    return schema


def _summary(cfg: GatewayConfig) -> str:
    hq = cfg.hq
    api = f"API on {cfg.api.host}:{cfg.api.port}" if cfg.api.enabled else "API off"
    return (
        f"gateway {cfg.gateway_id}, store {cfg.store.id} ({cfg.store.name}, {cfg.store.timezone}); "
        f"store broker {cfg.store_broker.host}:{cfg.store_broker.port}; "
        f"HQ {hq.host}:{hq.port} {'TLS' if hq.tls else 'plain TCP'}, prefix {hq.topic_prefix}; "
        f"{len(cfg.drivers)} driver(s), {len(cfg.device_ids())} device(s), {len(cfg.stock.items)} stock item(s); "
        f"{api}; data in {cfg.data_dir}; config hash {config_hash(cfg)}"
    )
