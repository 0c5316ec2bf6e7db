"""Load the gateway's YAML config and report every problem at once, each with file:line:col and a hint.

The YAML is read with ruamel.yaml's round-trip loader, which keeps the position of every key and item, so a
pydantic error location such as ``('hq', 'port')`` maps back to the line a technician has to fix. Duplicate
keys, syntax errors, unresolvable secrets and validation errors all become :class:`ConfigIssue` entries of a
single :class:`ConfigError`.

Secrets are written as ``{env: NAME}`` or ``{file: PATH}`` and resolved at load time. Their values, and the
value of any secret field, never appear in an error, a log line or ``repr()`` of the config.

``check-config`` and ``run`` also check the files the config names (TLS CA, certificate and key; the stock
CSV) with :func:`tls_file_problems` and :func:`stock_csv_problems`: a file that is missing, unreadable or not
what it should be is an issue at the line of the key that names it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import hashlib
import json
import logging
import os
import re
import stat
import types
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, SecretBytes, SecretStr, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean

from gateway.config import GatewayConfig
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.tls_files import FileProblem, read_named_file, tls_file_problems

_LOGGER = logging.getLogger(__name__)

MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024
"""A store config is a few KiB; anything this large is a mistake (or /dev/zero)."""
MAX_SECRET_FILE_BYTES: Final = 64 * 1024
MAX_DEPTH: Final = 64
MAX_VALUES: Final = 200_000
"""Bounds what YAML aliases may expand to ("billion laughs")."""
VALUE_REPR_MAX: Final = 60
MASK: Final = "***"
MIN_SCRUB_LEN: Final = 4
"""Secret values at least this long are also scrubbed from message text (shorter ones would mangle it)."""

_SECRET_NAME_PARTS: Final = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "api_key",
    "apikey",
    "credential",
)
_SECRET_REF_KEYS: Final = frozenset({"env", "file"})
_UNRESOLVED: Final = "<unresolved secret>"
_PLACEHOLDER: Final = "0123456789abcdef" * 2
"""Stands in for a secret that ``check-config --no-secrets`` does not check: 32 hex digits satisfy the rules of
every secret field (API token length, webhook secret length, BLE bindkey format), so the rest is checked."""
TLS_FILE_KEYS: Final = ("ca_file", "cert_file", "key_file")
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_STANDARD_TAGS: Final = frozenset(
    f"tag:yaml.org,2002:{name}"
    for name in ("str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")
)

KeyPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, with where it is and what to do about it."""

    file: str
    line: int | None
    """1-based; None when the problem is not at a place in the file (for example, the file is missing)."""
    column: int | None
    """1-based."""
    key_path: str
    """Dotted path such as ``drivers[0].routes[1].kind``; empty for the whole file."""
    value_repr: str | None
    """The offending value, repr'd and truncated, ``***`` for secrets; None when there is no value to show."""
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column or 1}"
        text = f"{where}: "
        if self.key_path:
            text += f"{self.key_path}: "
        if self.value_repr is not None:
            text += f"{self.value_repr} -> "
        text += self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class ConfigError(StoreGatewayError):
    """The config cannot be used; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__(f"{len(issues)} config problem(s)")

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def load_config(
    path: Path, env: Mapping[str, str] | None = None, *, check_files: bool = False
) -> GatewayConfig:
    """Read, resolve and validate one config file; raise :class:`ConfigError` listing every problem.

    With ``check_files`` (``run`` and ``check-config``), the files the config names must also be usable:
    see :func:`tls_file_problems` and :func:`stock_csv_problems`."""
    loader = _Loader(Path(path), os.environ if env is None else env, check_files=check_files)
    cfg = loader.load()
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
    loader = _Loader(Path(path), os.environ if env is None else env, check_files=True, no_secrets=no_secrets)
    try:
        cfg = loader.load()
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


class _AbortLoadError(Exception):
    """Stop loading: the issues gathered so far are all that can be said."""


class _Loader:
    """One load: gathers issues across parsing, secret resolution and validation."""

    def __init__(
        self, path: Path, env: Mapping[str, str], *, check_files: bool = False, no_secrets: bool = False
    ) -> None:
        self.path = path
        self.check_files = check_files
        self.no_secrets = no_secrets
        self.unchecked_secrets: list[KeyPath] = []
        """--no-secrets: secret references this machine cannot resolve; not errors, and not validated."""
        self.unchecked_files = 0
        """--no-secrets: TLS files this machine lacks."""
        self.fields: dict[KeyPath, FieldInfo] = {}
        """The model field at each path read so far (for the placeholder of an unchecked secret)."""
        self.renamed: dict[KeyPath, KeyPath] = {}
        """Where a deprecated key was read under its new name: new path -> the path written in the file."""
        self.label = str(path)
        self.base_dir = path.absolute().parent
        self.env = env
        self.issues: list[ConfigIssue] = []
        self.root: Any = None
        self.secret_paths: set[KeyPath] = set()
        self.secret_values: set[str] = set()
        self.problem_paths: list[KeyPath] = []
        self.values_seen = 0

    def load(self) -> GatewayConfig:
        try:
            text = self._read()
            self.root = self._parse(text)
            data = self._build(self.root, GatewayConfig, (), 0)
        except _AbortLoadError:
            data = None
        if data is not None and self.check_files:
            self._check_files(data)
        cfg: GatewayConfig | None = None
        if data is not None:
            try:
                cfg = GatewayConfig.model_validate(data)
            except ValidationError as exc:
                # A section whose default_factory fails raises its own error in place of the whole model's
                # (pydantic behaviour): put those errors under that section's key.
                prefix = _default_factory_path(GatewayConfig, exc.title) or ()
                for error in exc.errors(include_url=False):
                    self._add_validation_issue(error, prefix)
        if cfg is None and not self.issues and self.unchecked_secrets:
            # Every validation error was about a placeholder (a secret in a field no placeholder fits).
            for path in self.unchecked_secrets:
                self._issue_at(
                    self._position(path),
                    path,
                    None,
                    "the config cannot be validated without this secret",
                    "set it and check without --no-secrets",
                )
        if self.issues or cfg is None:
            self.issues.sort(key=lambda i: (i.line or 0, i.column or 0))
            raise ConfigError(self.issues)
        return cfg

    # -- reading and parsing

    def _read(self) -> str:
        try:
            with self.path.open("rb") as fh:
                raw = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            self._issue_at(
                None,
                (),
                None,
                f"cannot read the config file: {exc.strerror or exc}",
                self._hint_for_config(exc),
            )
            raise _AbortLoadError from exc
        if len(raw) > MAX_CONFIG_BYTES:
            self._issue_at(None, (), None, f"the config file is larger than {MAX_CONFIG_BYTES} bytes", None)
            raise _AbortLoadError
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            self._issue_at((line, column), (), None, "the file is not valid UTF-8", "save it as UTF-8")
            raise _AbortLoadError from exc

    def _hint_for_config(self, exc: OSError) -> str | None:
        """The config file itself is named on the command line: a relative path is the current directory's."""
        if isinstance(exc, FileNotFoundError):
            if self.path.is_absolute():
                return "check the path"
            return f"check the path; it is relative to the current directory {Path.cwd()}"
        return _hint_for_os(exc)

    def _parse(self, text: str) -> Any:
        """Compose first (syntax, duplicate keys, tags: all reported with lines), then construct."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                node = YAML(typ="rt").compose(text)
        except MarkedYAMLError as exc:
            self._issue_from_mark(exc, "YAML syntax error")
            raise _AbortLoadError from exc
        except YAMLError as exc:
            self._issue_at(None, (), None, f"YAML error: {_first_line(str(exc))}", None)
            raise _AbortLoadError from exc
        except RecursionError as exc:
            self._issue_at(None, (), None, "YAML is nested too deeply", None)
            raise _AbortLoadError from exc
        for warning in caught:
            self._issue_from_warning(warning.message)
        if node is None:
            self._issue_at(
                (1, 1), (), None, "the config file is empty", "start from firmware_configs/store-example.yaml"
            )
            raise _AbortLoadError
        if self._check_nodes(node):
            raise _AbortLoadError
        yaml = YAML(typ="rt")
        yaml.allow_duplicate_keys = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already reported from compose()
                root = yaml.load(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            position = (mark.line + 1, mark.column + 1) if mark is not None else None
            # Not exc.problem: for a duplicate key it quotes both values, which may be secrets.
            self._issue_at(position, (), None, "YAML error: this value cannot be read", None)
            raise _AbortLoadError from exc
        except RecursionError as exc:
            self._issue_at(None, (), None, "YAML is nested too deeply", None)
            raise _AbortLoadError from exc
        except Exception as exc:  # ruamel's constructor can fail on odd but well-formed documents
            _LOGGER.debug("YAML construction failed", exc_info=True)
            self._issue_at(None, (), None, f"YAML cannot be read: {type(exc).__name__}", None)
            raise _AbortLoadError from exc
        if not isinstance(root, CommentedMap):
            self._issue_at(
                (1, 1),
                (),
                _short_repr(root),
                "the config must be a mapping of keys to values",
                "see firmware_configs/store-example.yaml",
            )
            raise _AbortLoadError
        return root

    def _check_nodes(self, root: Node) -> bool:
        """Report every duplicate key and unsupported tag; True if there was any."""
        found = False
        for node, path, first_line in _suspect_nodes(root):
            found = True
            mark = node.start_mark
            if first_line is not None:
                message = f"duplicate key {node.value!r} (first at line {first_line})"
                hint = "keep one of them: YAML would silently use only one"
            else:
                message = f"YAML tag {str(node.tag).replace('tag:yaml.org,2002:', '!!')} is not supported"
                hint = "remove the tag; '!!str' is the only one needed, to force text"
            self._issue_at((mark.line + 1, mark.column + 1), path, None, message, hint)
        return found

    def _issue_from_mark(self, exc: MarkedYAMLError, what: str) -> None:
        mark = exc.problem_mark or exc.context_mark
        position = (mark.line + 1, mark.column + 1) if mark is not None else None
        problem = _first_line(exc.problem or "") or _first_line(str(exc))
        context = _first_line(exc.context or "")
        if context.startswith("expected a single document"):
            problem, context = "a second YAML document starts here", ""
        if context and exc.context_mark is not None and mark is not exc.context_mark:
            context += f" that starts at line {exc.context_mark.line + 1}"
        message = f"{what}: {problem}" + (f" ({context})" if context else "")
        self._issue_at(position, (), None, message, _syntax_hint(problem))

    def _issue_from_warning(self, message: Warning | str) -> None:
        text = str(message)
        if isinstance(message, ReusedAnchorWarning):
            name = re.search(r"anchor '([^']*)'", text)
            second = re.search(r"second occurrence.*?line (\d+), column (\d+)", text, re.DOTALL)
            position = (int(second.group(1)), int(second.group(2))) if second else None
            self._issue_at(
                position,
                (),
                None,
                f"anchor &{name.group(1) if name else '?'} is defined twice",
                "give each anchor a unique name",
            )
        else:
            self._issue_at(None, (), None, f"YAML warning: {_first_line(text)}", None)

    # -- YAML values to plain data, resolving secrets and relative paths

    def _build(self, node: Any, expected: Any, path: KeyPath, depth: int) -> Any:
        self.values_seen += 1
        if self.values_seen > MAX_VALUES:
            self._issue_at(
                None, (), None, f"the config expands to more than {MAX_VALUES} values (YAML aliases?)", None
            )
            raise _AbortLoadError
        if depth > MAX_DEPTH:
            return self._problem(path, f"nested more than {MAX_DEPTH} levels deep", None)
        info = _TypeInfo.of(expected)
        if isinstance(node, Mapping):
            if info.scalar and set(node) and set(node) <= _SECRET_REF_KEYS:
                return self._resolve_secret(node, path)
            model = info.model_for(node)
            renames: Mapping[str, str] = getattr(model, "DEPRECATED_KEYS", {}) if model is not None else {}
            out: dict[str, Any] = {}
            for written, value in node.items():
                key = written
                if isinstance(written, str) and written in renames:
                    key = renames[written]
                    if not self._rename(node, path, written, key):
                        continue
                if not isinstance(key, str):
                    # Dropped, not a field: nothing downstream to suppress.
                    self._issue_at(
                        _key_position(node, key) or self._position(path),
                        path,
                        None,
                        f"keys must be text, not {_short_repr(key)}",
                        "quote the key",
                    )
                    continue
                child: Any = None
                if model is not None:
                    field = model.model_fields.get(key)
                    if field is not None:
                        child = _field_type(field)
                        self.fields[(*path, key)] = field
                        if _is_secret_field(key, field):
                            self.secret_paths.add((*path, key))
                    elif _looks_secret(key) or _looks_secret(_closest(key, list(model.model_fields)) or ""):
                        self.secret_paths.add((*path, key))
                elif _looks_secret(key):
                    self.secret_paths.add((*path, key))
                out[key] = self._build(value, child, (*path, key), depth + 1)
            return out
        if isinstance(node, list | tuple):
            item = info.item_type()
            return [self._build(value, item, (*path, i), depth + 1) for i, value in enumerate(node)]
        if isinstance(node, str):
            value = str(node)
            if path in self.secret_paths:
                self.secret_values.add(value)
            if info.path and value:
                return _absolute(self.base_dir, value)
            return value
        if isinstance(node, bool | ScalarBoolean):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if node is None or isinstance(node, dt.date):
            return node
        return self._problem(path, f"unsupported YAML value of type {type(node).__name__}", None)

    def _rename(self, node: Mapping[Any, Any], path: KeyPath, old: str, new: str) -> bool:
        """A deprecated key (a model's ``DEPRECATED_KEYS``) is read as its new name, with a warning naming
        file:line; False (and an issue) when both names are given."""
        position = _key_position(node, old)
        if new in node:
            self._issue_at(
                position or self._position(path),
                (*path, old),
                None,
                f"'{old}' is the old name of '{new}', which is given too",
                f"keep only '{new}'",
            )
            return False
        self.renamed[(*path, new)] = (*path, old)
        where = f"{self.label}:{position[0]}:{position[1]}" if position else self.label
        _LOGGER.warning(
            "%s: %s: '%s' is deprecated: rename it to '%s'", where, _format_path((*path, old)), old, new
        )
        return True

    def _resolve_secret(self, ref: Mapping[Any, Any], path: KeyPath) -> Any:
        self.secret_paths.add(path)
        if len(ref) != 1:
            self._problem(path, "a secret reference has exactly one key", "write {env: NAME} or {file: PATH}")
            return _UNRESOLVED
        kind, target = next(iter(ref.items()))
        if not isinstance(target, str) or not target:
            self._problem(path, f"'{kind}' needs a non-empty name", "write {env: NAME} or {file: PATH}")
            return _UNRESOLVED
        target = str(target)
        if kind == "env":
            value = self.env.get(target)
            if value is None and self.no_secrets:
                return self._unchecked(path)
            if value is None:
                self._problem(
                    path,
                    f"environment variable {target} is not set",
                    f"better, read it from a file: {{file: /run/secrets/NAME}} (compose secrets, systemd "
                    f"LoadCredential=); an environment variable {target} shows in 'docker inspect' and "
                    "'systemctl show'",
                )
                return _UNRESOLVED
            if not value:
                self._problem(path, f"environment variable {target} is empty", f"give {target} a value")
                return _UNRESOLVED
        else:
            file = Path(_absolute(self.base_dir, target))
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
        self.unchecked_secrets.append(path)
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
                self._problem(path, f"secret file {file} is not a regular file", None)
                return None
            if info.st_size > MAX_SECRET_FILE_BYTES:
                self._problem(path, f"secret file {file} is larger than {MAX_SECRET_FILE_BYTES} bytes", None)
                return None
            with file.open("rb") as fh:
                raw = fh.read(MAX_SECRET_FILE_BYTES + 1)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._problem(path, f"cannot read secret file {file}: {reason}", _hint_for_os(exc))
            return None
        try:
            value = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            self._problem(path, f"secret file {file} is not UTF-8 text", None)
            return None
        if not value:
            self._problem(path, f"secret file {file} is empty", None)
            return None
        return value

    # -- issues

    def _problem(self, path: KeyPath, message: str, hint: str | None) -> None:
        """An issue found before validation; validation errors along this path are then not repeated."""
        self.problem_paths.append(path)
        self._issue_at(self._position(path), path, None, message, hint)

    def _issue_at(
        self,
        position: tuple[int, int] | None,
        path: KeyPath,
        value_repr: str | None,
        message: str,
        hint: str | None,
    ) -> None:
        line, column = position if position is not None else (None, None)
        self.issues.append(
            ConfigIssue(
                file=self.label,
                line=line,
                column=column,
                key_path=_format_path(path),
                value_repr=self._scrub(value_repr) if value_repr is not None else None,
                message=self._scrub(message),
                hint=self._scrub(hint) if hint is not None else None,
            )
        )

    def _add_validation_issue(self, error: Mapping[str, Any], prefix: KeyPath) -> None:
        loc = _LocInfo.walk((*prefix, *error["loc"]))
        if any(_related(loc.data_path, p) for p in self.problem_paths):
            return
        if any(loc.data_path[: len(p)] == p for p in self.unchecked_secrets):
            return  # about the placeholder of a secret --no-secrets does not check
        kind = str(error["type"])
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value_repr = None
        if prefix:
            hint: str | None = f"'{_format_path(prefix)}' is absent and its defaults are not valid: add it"
        else:
            hint = _hint(kind, error, loc)
            if kind != "missing" and loc.data_path:
                value_repr = self._value_repr(error.get("input"), loc.data_path)
        written = self._written_path(loc.data_path)
        self._issue_at(self._position(written), written, value_repr, message, hint)

    def _written_path(self, path: KeyPath) -> KeyPath:
        """The path as written in the file: a deprecated key read under its new name gets its old one back."""
        for end in range(len(path), 0, -1):
            old = self.renamed.get(path[:end])
            if old is not None:
                return (*old, *path[end:])
        return path

    # -- the files the config names

    def _check_files(self, data: Mapping[str, Any]) -> None:
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
        if not isinstance(value, str) or not value or path in self.unchecked_secrets:
            return None
        if any(path[: len(p)] == p for p in self.problem_paths):
            return None  # an unresolved secret or an unreadable value: already reported
        return Path(value)

    def _file_issue(self, path: KeyPath, problem: FileProblem) -> None:
        self._issue_at(self._position(path), path, None, problem.message, problem.hint)

    def _value_repr(self, value: Any, path: KeyPath) -> str:
        redacted = self._redact(value, path)
        if redacted is _MASKED:
            return MASK
        text = self._scrub(repr(redacted))
        return text if len(text) <= VALUE_REPR_MAX else text[: VALUE_REPR_MAX - 3] + "..."

    def _redact(self, value: Any, path: KeyPath) -> Any:
        if path in self.secret_paths:
            return _MASKED
        if isinstance(value, dict):
            return {k: self._redact(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact(v, (*path, i)) for i, v in enumerate(value)]
        return value

    def _scrub(self, text: str) -> str:
        for secret in sorted(self.secret_values, key=len, reverse=True):
            if len(secret) >= MIN_SCRUB_LEN:
                text = text.replace(secret, MASK).replace(repr(secret)[1:-1], MASK)
        return text

    def _position(self, path: KeyPath) -> tuple[int, int] | None:
        node = self.root
        if node is None:
            return None
        position = _lc(node)
        for elem in path:
            try:
                if isinstance(node, CommentedMap) and isinstance(elem, str) and elem in node:
                    try:
                        position = node.lc.key(elem)
                    except KeyError:  # a key merged in with '<<: *anchor'
                        position = _lc(node)
                    node = node[elem]
                elif isinstance(node, CommentedSeq) and isinstance(elem, int) and 0 <= elem < len(node):
                    position = node.lc.item(elem)
                    node = node[elem]
                else:
                    break
            except (KeyError, IndexError, TypeError):
                break
        return position[0] + 1, position[1] + 1


class _Masked:
    def __repr__(self) -> str:
        return MASK


_MASKED: Final = _Masked()


# --- types: what the models expect at a place in the document


@dataclasses.dataclass(frozen=True, slots=True)
class _TypeInfo:
    """An expected type without Annotated and Optional, and its discriminator if it is a tagged union."""

    base: Any
    discriminator: str | None = None

    @classmethod
    def of(cls, tp: Any) -> _TypeInfo:
        discriminator: str | None = None
        while True:
            if get_origin(tp) is Annotated:
                args = get_args(tp)
                for meta in args[1:]:
                    if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                        discriminator = meta.discriminator
                tp = args[0]
                continue
            if _is_union(tp):
                members = [a for a in get_args(tp) if a is not type(None)]
                if len(members) == 1:
                    tp = members[0]
                    continue
            return cls(tp, discriminator)

    @property
    def models(self) -> list[type[BaseModel]]:
        members = get_args(self.base) if _is_union(self.base) else (self.base,)
        found = [_TypeInfo.of(m).base for m in members]
        return [m for m in found if isinstance(m, type) and issubclass(m, BaseModel)]

    @property
    def scalar(self) -> bool:
        """True where a secret reference may stand: a known type that is not a model or a container."""
        if self.base is None or self.models:
            return False
        return get_origin(self.base) not in (list, dict, tuple, set, frozenset)

    @property
    def path(self) -> bool:
        return isinstance(self.base, type) and issubclass(self.base, PurePath)

    def item_type(self) -> Any:
        if get_origin(self.base) is list:
            return get_args(self.base)[0]
        return None

    def model_for(self, data: Mapping[Any, Any]) -> type[BaseModel] | None:
        models = self.models
        if self.discriminator is not None and self.discriminator in data:
            return _member_for_tag(models, self.discriminator, data[self.discriminator])
        return models[0] if len(models) == 1 else None


@dataclasses.dataclass(frozen=True, slots=True)
class _LocInfo:
    """A pydantic error location read against the models: the path in the document and the field there."""

    data_path: KeyPath
    owner: type[BaseModel] | None
    """The model the last key belongs to (or should belong to)."""
    name: str | None
    field: FieldInfo | None
    expected: _TypeInfo | None
    """The type expected at the end of the location."""
    union_models: tuple[type[BaseModel], ...] = ()
    discriminator: str | None = None

    @classmethod
    def walk(cls, loc: tuple[Any, ...]) -> _LocInfo:
        info: _TypeInfo | None = _TypeInfo.of(GatewayConfig)
        data_path: list[str | int] = []
        owner: type[BaseModel] | None = None
        name: str | None = None
        field: FieldInfo | None = None
        expect_tag = False
        for elem in loc:
            models = info.models if info is not None else []
            if isinstance(elem, int):
                data_path.append(elem)
                item = info.item_type() if info is not None else None
                info = _TypeInfo.of(item) if item is not None else None
                expect_tag = info is not None and info.discriminator is not None
                continue
            elem = str(elem)
            if expect_tag and info is not None and info.discriminator is not None:
                model = _member_for_tag(models, info.discriminator, elem)
                info = _TypeInfo.of(model) if model is not None else None
                expect_tag = False
                continue
            data_path.append(elem)
            if len(models) == 1:
                owner, name = models[0], elem
                field = owner.model_fields.get(elem)
                info = _TypeInfo.of(_field_type(field)) if field is not None else None
                expect_tag = info is not None and info.discriminator is not None
            else:
                owner, name, field, info = None, elem, None, None
        if info is not None and info.discriminator is not None and expect_tag:
            return cls(tuple(data_path), owner, name, field, info, tuple(info.models), info.discriminator)
        return cls(tuple(data_path), owner, name, field, info)


def _default_factory_path(model: type[BaseModel], title: str, depth: int = 0) -> KeyPath | None:
    """Where, under ``model``, a section defaults to a model named ``title``; () for ``model`` itself."""
    if depth == 0 and title == model.__name__:
        return ()
    if depth > MAX_DEPTH:
        return None
    for name, field in model.model_fields.items():
        factory = field.default_factory
        if isinstance(factory, type) and factory.__name__ == title:
            return (name,)
        for sub in _TypeInfo.of(field.annotation).models:
            found = _default_factory_path(sub, title, depth + 1)
            if found:
                return (name, *found)
    return None


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _field_type(field: FieldInfo) -> Any:
    if isinstance(field.discriminator, str):
        return Annotated[field.annotation, Field(discriminator=field.discriminator)]
    return field.annotation


def _member_for_tag(models: list[type[BaseModel]], discriminator: str, tag: Any) -> type[BaseModel] | None:
    for model in models:
        if tag in _allowed_tags(model, discriminator):
            return model
    return None


def _allowed_tags(model: type[BaseModel], discriminator: str) -> tuple[Any, ...]:
    field = model.model_fields.get(discriminator)
    if field is None:
        return ()
    base = _TypeInfo.of(field.annotation).base
    return get_args(base) if get_origin(base) is Literal else ()


def _is_secret_field(name: str, field: FieldInfo) -> bool:
    return _looks_secret(name) or any(
        isinstance(t, type) and issubclass(t, SecretStr | SecretBytes) for t in _leaf_types(field.annotation)
    )


def _leaf_types(tp: Any) -> Iterator[Any]:
    info = _TypeInfo.of(tp)
    if _is_union(info.base):
        for member in get_args(info.base):
            yield from _leaf_types(member)
    else:
        yield info.base


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_NAME_PARTS)


def _closest(word: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


# --- hints


def _hint(kind: str, error: Mapping[str, Any], loc: _LocInfo) -> str | None:
    description = loc.field.description if loc.field is not None else None
    if kind == "extra_forbidden" and loc.owner is not None and loc.name is not None:
        names = list(loc.owner.model_fields)
        close = _closest(loc.name, names)
        return f"did you mean {close!r}?" if close else f"allowed keys here: {', '.join(names)}"
    if kind == "missing" and loc.name is not None:
        if description:
            return f"add '{loc.name}': {description}"
        required = _required_keys(loc.expected)
        return f"add '{loc.name}' (a mapping with {', '.join(required)})" if required else f"add '{loc.name}'"
    if kind in ("literal_error", "enum"):
        allowed = _allowed_values(loc.expected)
        if allowed:
            return f"allowed values: {allowed}"
        return f"expected {error.get('ctx', {}).get('expected', '')}".strip() or description
    if kind in ("union_tag_not_found", "union_tag_invalid") and loc.discriminator is not None:
        tags = [t for m in loc.union_models for t in _allowed_tags(m, loc.discriminator)]
        shown = ", ".join(repr(t) for t in tags)
        if kind == "union_tag_not_found" and tags:
            return f"add '{loc.discriminator}: {tags[0]}' (one of: {shown})"
        return f"allowed values for '{loc.discriminator}': {shown}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        keys = _required_keys(loc.expected) or (
            list(loc.expected.models[0].model_fields) if loc.expected and loc.expected.models else []
        )
        if loc.discriminator is not None and loc.discriminator not in keys:
            keys.insert(0, loc.discriminator)
        if keys:
            return f"write a mapping with keys such as {', '.join(keys)}"
    if kind == "list_type":
        return "write a list (one '- ' item per line)" + (f"; {description}" if description else "")
    if kind == "string_type" and isinstance(error.get("input"), int | float | bool | dt.date):
        return "YAML read this as a number, boolean or date: put it in quotes" + (
            f"; {description}" if description else ""
        )
    return description


def _allowed_values(expected: _TypeInfo | None) -> str | None:
    if expected is None:
        return None
    values = [v for t in _leaf_types(expected.base) if get_origin(t) is Literal for v in get_args(t)]
    return ", ".join(repr(v) for v in values) if values else None


def _required_keys(expected: _TypeInfo | None) -> list[str]:
    if expected is None or len(expected.models) != 1:
        return []
    return [name for name, field in expected.models[0].model_fields.items() if field.is_required()]


def _syntax_hint(problem: str) -> str | None:
    if "\\t" in problem or "tab" in problem:
        return "YAML indentation must use spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "check the indentation, and quote values that contain ': '"
    if "found character" in problem and "that cannot start any token" in problem:
        return "quote values that start with '@', '`' or '%'"
    if "expected <block end>" in problem or "could not find expected ':'" in problem:
        return "check the indentation of this line against the lines above"
    if "found undefined alias" in problem:
        return "define the anchor (&name) before using the alias (*name)"
    if "second YAML document" in problem:
        return "one config per file: remove the extra '---'"
    return None


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


def _hint_for_os(exc: Exception) -> str | None:
    if isinstance(exc, FileNotFoundError):
        return "check the path; relative paths are relative to the config file's folder"
    if isinstance(exc, PermissionError):
        return "the gateway's user must be able to read it"
    if isinstance(exc, IsADirectoryError):
        return "give the path of a file, not a folder"
    return None


# --- small helpers


def _suspect_nodes(root: Node) -> Iterator[tuple[Node, KeyPath, int | None]]:
    """Duplicate keys (with the line of the first) and nodes with an unsupported tag (with None)."""
    seen: set[int] = set()
    stack: list[tuple[Node, KeyPath]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if str(node.tag) not in _STANDARD_TAGS:
            yield node, path, None
        if isinstance(node, MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and str(key.tag) != _MERGE_TAG:
                    ident = (str(key.tag), str(key.value))
                    if ident in first:
                        yield key, (*path, str(key.value)), first[ident]
                    else:
                        first[ident] = key.start_mark.line + 1
                    stack.append((value, (*path, str(key.value))))
                else:
                    stack.append((key, path))
                    stack.append((value, path))
        elif isinstance(node, SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(node.value))


def _key_position(node: Any, key: Any) -> tuple[int, int] | None:
    try:
        line, column = node.lc.key(key)
    except (AttributeError, KeyError, TypeError):
        return None
    return int(line) + 1, int(column) + 1


def _lc(node: Any) -> tuple[int, int]:
    try:
        return int(node.lc.line), int(node.lc.col)
    except (AttributeError, TypeError):
        return 0, 0


def _related(a: KeyPath, b: KeyPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _absolute(base_dir: Path, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))


def _format_path(path: KeyPath) -> str:
    text = ""
    for elem in path:
        text += f"[{elem}]" if isinstance(elem, int) else (f".{elem}" if text else elem)
    return text


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= VALUE_REPR_MAX else text[: VALUE_REPR_MAX - 3] + "..."


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
