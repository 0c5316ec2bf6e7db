"""Load a YAML document into a pydantic model and report every problem at once, each with file:line:col and a hint.

The store config, device profiles and demo scenarios are all read here. Syntax errors, duplicate keys,
unsupported tags (:mod:`gateway.kernel.yaml_reader`) and validation errors all become :class:`Issue` entries of
a single :class:`DocumentError`, one line each::

    store.yaml:8:3: hq.port: 70000 -> Input should be less than or equal to 65535 (hint: Broker TCP port ...)

A pydantic error location such as ``('hq', 'port')`` maps back to the line someone has to fix, and the hint
comes from the error and the field there (:mod:`gateway.kernel.model_types`). The value of any secret field
never appears in an issue: it is shown as ``***``, and secret values are scrubbed from the message text.

:class:`DocumentLoader` is one load; a kind of document with more to it (the store config resolves secrets and
checks the files it names) subclasses it and fills in its hooks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarbool import ScalarBoolean

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.model_types import (
    MAX_DEPTH,
    KeyPath,
    LocInfo,
    TypeInfo,
    closest,
    default_factory_path,
    field_type,
    format_path,
    is_secret_field,
    looks_secret,
    validation_hint,
)
from gateway.kernel.yaml_reader import (
    VALUE_REPR_MAX,
    AbortLoadError,
    DocumentKind,
    Position,
    decode,
    key_position,
    parse,
    position_of,
    read_file,
    short_repr,
)

__all__ = [
    "MASK",
    "NOT_A_REFERENCE",
    "DocumentError",
    "DocumentKind",
    "DocumentLoader",
    "Issue",
    "KeyPath",
    "absolute",
    "format_path",
    "load_document",
]

_LOGGER = logging.getLogger(__name__)

MAX_VALUES: Final = 200_000
"""Bounds what YAML aliases may expand to ("billion laughs")."""
MASK: Final = "***"
MIN_SCRUB_LEN: Final = 4
"""Secret values at least this long are also scrubbed from message text (shorter ones would mangle it)."""

M = TypeVar("M", bound=BaseModel)


@dataclasses.dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a file, with where it is and what to do about it."""

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


class DocumentError(StoreGatewayError):
    """The document cannot be used; ``issues`` lists every problem found, in file order, one line each."""

    noun: ClassVar[str] = "document"

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__(f"{len(issues)} {self.noun} problem(s)")

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def load_document(
    path: Path,
    model: type[M],
    kind: DocumentKind,
    raw: bytes | None = None,
    *,
    error: type[DocumentError] = DocumentError,
) -> M:
    """``path`` (or ``raw``, its bytes read by the caller) validated by ``model``; ``error`` lists every
    problem."""
    loader = DocumentLoader(path, kind)
    loader.error = error
    return loader.load(model, raw)


class DocumentLoader:
    """One load: gathers issues across parsing, building and validation."""

    error: type[DocumentError] = DocumentError
    """What :meth:`load` raises."""

    def __init__(self, path: Path, kind: DocumentKind, *, logger: logging.Logger | None = None) -> None:
        self.path = path
        self.kind = kind
        self.logger = logger or _LOGGER
        """Where warnings about the document (a deprecated key) go."""
        self.label = str(path)
        self.base_dir = path.absolute().parent
        """Relative paths in the document are relative to its folder."""
        self.issues: list[Issue] = []
        self.root: Any = None
        self.fields: dict[KeyPath, FieldInfo] = {}
        """The model field at each path read so far."""
        self.renamed: dict[KeyPath, KeyPath] = {}
        """Where a deprecated key was read under its new name: new path -> the path written in the file."""
        self.secret_paths: set[KeyPath] = set()
        self.secret_values: set[str] = set()
        self.problem_paths: list[KeyPath] = []
        """Where a problem was found before validation: validation errors along these paths are not repeated."""
        self.placeholders: list[KeyPath] = []
        """Where a value stands in for one that is not checked: validation errors under these are not reported."""
        self.values_seen = 0

    def read(self, raw: bytes | None = None) -> CommentedMap:
        """The document's top mapping, with the position of every key and item (``raw``: its bytes, read by the
        caller); :attr:`error` if it cannot be read."""
        try:
            return self._read(raw)
        except AbortLoadError:
            raise self._error() from None

    def load(self, model: type[M], raw: bytes | None = None) -> M:
        """The document validated by ``model``; :attr:`error` listing every problem if it cannot be."""
        try:
            self.root = self._read(raw)
            data = self._build(self.root, model, (), 0)
        except AbortLoadError:
            data = None
        if data is not None:
            self._before_validation(data)
        result: M | None = None
        if data is not None:
            try:
                result = model.model_validate(data)
            except ValidationError as exc:
                # A section whose default_factory fails raises its own error in place of the whole model's
                # (pydantic behaviour): put those errors under that section's key.
                prefix = default_factory_path(model, exc.title) or ()
                for error in exc.errors(include_url=False):
                    self._add_validation_issue(model, error, prefix)
        if result is None and not self.issues:
            self._explain_placeholders()
        if self.issues or result is None:
            raise self._error()
        return result

    def fail(self, path: KeyPath, message: str, hint: str | None, *, value: Any = None) -> DocumentError:
        """The error to raise for one more problem at ``path`` (with every issue found so far)."""
        shown = short_repr(value) if value is not None else None
        self.issue_at(self.position(path), path, shown, message, hint)
        return self._error()

    def _read(self, raw: bytes | None) -> CommentedMap:
        if raw is None:
            raw = read_file(self.path, self.kind, self.issue_at)
        root = parse(decode(raw, self.kind, self.issue_at), self.kind, self.issue_at)
        self.root = root
        return root

    def _error(self) -> DocumentError:
        self.issues.sort(key=lambda i: (i.line or 0, i.column or 0))
        return self.error(self.issues)

    # -- hooks for a kind of document with more to it

    def _reference(self, node: Mapping[Any, Any], path: KeyPath, info: TypeInfo) -> Any:
        """A mapping that stands for a value (the config's ``{env: NAME}``), resolved; else :data:`NOT_A_REFERENCE`."""
        return NOT_A_REFERENCE

    def _before_validation(self, data: Mapping[str, Any]) -> None:
        """Checks of the built data that go beyond the model (the files a config names)."""

    def _explain_placeholders(self) -> None:
        """Validation failed only where :attr:`placeholders` stand: say why it cannot go further."""
        for path in self.placeholders:
            self.issue_at(self.position(path), path, None, f"the {self.kind.noun} cannot be validated", None)
        if not self.placeholders:
            self.issue_at(None, (), None, f"the {self.kind.noun} cannot be validated", None)

    # -- YAML values to plain data, resolving relative paths

    def _build(self, node: Any, expected: Any, path: KeyPath, depth: int) -> Any:
        self.values_seen += 1
        if self.values_seen > MAX_VALUES:
            message = f"the {self.kind.noun} expands to more than {MAX_VALUES} values (YAML aliases?)"
            self.issue_at(None, (), None, message, None)
            raise AbortLoadError
        if depth > MAX_DEPTH:
            return self.problem(path, f"nested more than {MAX_DEPTH} levels deep", None)
        info = TypeInfo.of(expected)
        if isinstance(node, Mapping):
            value = self._reference(node, path, info)
            return self._build_mapping(node, info, path, depth) if value is NOT_A_REFERENCE else value
        if isinstance(node, list | tuple):
            item = info.item_type()
            return [self._build(value, item, (*path, i), depth + 1) for i, value in enumerate(node)]
        if isinstance(node, str):
            text = str(node)
            if path in self.secret_paths:
                self.secret_values.add(text)
            if info.path and text:
                return absolute(self.base_dir, text)
            return text
        if isinstance(node, bool | ScalarBoolean):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if node is None or isinstance(node, dt.date):
            return node
        return self.problem(path, f"unsupported YAML value of type {type(node).__name__}", None)

    def _build_mapping(self, node: Mapping[Any, Any], info: TypeInfo, path: KeyPath, depth: int) -> Any:
        model = info.model_for(node)
        renames: Mapping[str, str] = getattr(model, "DEPRECATED_KEYS", {}) if model is not None else {}
        out: dict[Any, Any] = {}
        for written, value in node.items():
            key = written
            if isinstance(written, str) and written in renames:
                key = renames[written]
                if not self._rename(node, path, written, key):
                    continue
            if isinstance(key, int) and not isinstance(key, bool) and info.takes_int_keys():
                out[int(key)] = self._build(value, None, (*path, int(key)), depth + 1)
                continue
            if not isinstance(key, str):
                # Dropped, not a field: nothing downstream to suppress.
                self.issue_at(
                    key_position(node, key) or self.position(path),
                    path,
                    None,
                    f"keys must be text, not {short_repr(key)}",
                    "quote the key",
                )
                continue
            child: Any = None
            if model is not None:
                field = model.model_fields.get(key)
                if field is not None:
                    child = field_type(field)
                    self.fields[(*path, key)] = field
                    if is_secret_field(key, field):
                        self.secret_paths.add((*path, key))
                elif looks_secret(key) or looks_secret(closest(key, list(model.model_fields)) or ""):
                    self.secret_paths.add((*path, key))
            elif looks_secret(key):
                self.secret_paths.add((*path, key))
            out[key] = self._build(value, child, (*path, key), depth + 1)
        return out

    def _rename(self, node: Mapping[Any, Any], path: KeyPath, old: str, new: str) -> bool:
        """A deprecated key (a model's ``DEPRECATED_KEYS``) is read as its new name, with a warning naming
        file:line; False (and an issue) when both names are given."""
        position = key_position(node, old)
        if new in node:
            self.issue_at(
                position or self.position(path),
                (*path, old),
                None,
                f"'{old}' is the old name of '{new}', which is given too",
                f"keep only '{new}'",
            )
            return False
        self.renamed[(*path, new)] = (*path, old)
        where = f"{self.label}:{position[0]}:{position[1]}" if position else self.label
        self.logger.warning(
            "%s: %s: '%s' is deprecated: rename it to '%s'", where, format_path((*path, old)), old, new
        )
        return True

    # -- issues

    def problem(self, path: KeyPath, message: str, hint: str | None) -> None:
        """An issue found before validation; validation errors along this path are then not repeated."""
        self.problem_paths.append(path)
        self.issue_at(self.position(path), path, None, message, hint)

    def issue_at(
        self, position: Position | None, path: KeyPath, value_repr: str | None, message: str, hint: str | None
    ) -> None:
        line, column = position if position is not None else (None, None)
        self.issues.append(
            Issue(
                file=self.label,
                line=line,
                column=column,
                key_path=format_path(path),
                value_repr=self._scrub(value_repr) if value_repr is not None else None,
                message=self._scrub(message),
                hint=self._scrub(hint) if hint is not None else None,
            )
        )

    def position(self, path: KeyPath) -> Position | None:
        """Where ``path`` is in the document (or the deepest part of it that is there)."""
        return position_of(self.root, path)

    def _add_validation_issue(
        self, model: type[BaseModel], error: Mapping[str, Any], prefix: KeyPath
    ) -> None:
        loc = LocInfo.walk(model, (*prefix, *error["loc"]))
        if any(_related(loc.data_path, p) for p in self.problem_paths):
            return
        if any(loc.data_path[: len(p)] == p for p in self.placeholders):
            return  # about a stand-in value, not one written in the file
        kind = str(error["type"])
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value_repr = None
        if prefix:
            hint: str | None = f"'{format_path(prefix)}' is absent and its defaults are not valid: add it"
        else:
            hint = validation_hint(kind, error, loc)
            if kind != "missing" and loc.data_path:
                value_repr = self._value_repr(error.get("input"), loc.data_path)
        written = self._written_path(loc.data_path)
        self.issue_at(self.position(written), written, value_repr, message, hint)

    def _written_path(self, path: KeyPath) -> KeyPath:
        """The path as written in the file: a deprecated key read under its new name gets its old one back."""
        for end in range(len(path), 0, -1):
            old = self.renamed.get(path[:end])
            if old is not None:
                return (*old, *path[end:])
        return path

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


class _Sentinel:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


NOT_A_REFERENCE: Final = _Sentinel("<not a reference>")
"""What :meth:`DocumentLoader._reference` returns for an ordinary mapping."""
_MASKED: Final = _Sentinel(MASK)


def absolute(base_dir: Path, value: str) -> str:
    """``value`` as an absolute path: a relative one is relative to ``base_dir``."""
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))


def _related(a: KeyPath, b: KeyPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]
